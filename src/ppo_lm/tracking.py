"""Where metrics go: a JSONL file always (one object per iteration), TensorBoard / W&B / MLflow through
accelerate's trackers when asked, phase timers, and PNG plots."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch


class PhaseTimer:
    """Wall-clock seconds per named phase; waits for the GPU so the numbers mean what they say."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> None:
        self.seconds = {}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information readable
    return value


class MetricsLog:
    """Appends one JSON object per iteration to ``metrics.jsonl`` and forwards it to accelerate's trackers."""

    def __init__(self, path: str | Path, accelerator=None):
        self.path = Path(path)
        self.accelerator = accelerator

    def log(self, metrics: dict, step: int) -> None:
        row = {k: _jsonable(v) for k, v in metrics.items()}
        if self.accelerator is None or self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(rows: list[dict], out_png: str | Path, keys: tuple[str, ...] = ("reward_mean", "kl"),
                 title: str | None = None) -> Path:
    """One panel per key, metric against iteration; written as PNG (headless backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = tuple(k for k in keys if any(k in r for r in rows))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=1.5)
        if key == "reward_mean" and all("reward_std" in r for r in rows):
            lo = [r["reward_mean"] - r["reward_std"] for r in rows]
            hi = [r["reward_mean"] + r["reward_std"] for r in rows]
            ax.fill_between([r["iteration"] for r in rows], lo, hi, alpha=0.2)
        ax.set_xlabel("iteration")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def flat_config(d: dict, prefix: str = "") -> dict:
    """A nested config as the flat ``{"section.key": scalar}`` mapping that trackers take."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class progress_bar:
    """A rich progress bar that shows the latest reward and KL; ``with progress_bar(...) as advance`` gives a
    function of one iteration's metrics. Silent when disabled."""

    def __init__(self, console, total: int, enabled: bool, done: int = 0):
        self.console, self.total, self.enabled, self.done = console, total, enabled, done

    def __enter__(self):
        if not self.enabled:
            return lambda metrics: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]PPO"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.description}"), console=self.console, transient=False)
        self.progress.__enter__()
        task = self.progress.add_task("", total=self.total, completed=self.done)

        def advance(m: dict) -> None:
            desc = (f"reward {m['reward_mean']:+.3f}  kl {m['kl']:.3f}  entropy {m['entropy']:.2f}  "
                    f"{m['time_iteration_s']:.1f}s/it")
            self.progress.update(task, advance=1, description=desc)
        return advance

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
        return False


def print_samples(console, prompts: list[str], completions: list[str], rewards: list[float], k: int) -> None:
    """The first ``k`` (prompt, completion, reward) of a batch as a table."""
    from rich.table import Table

    table = Table(title="samples", show_lines=True)
    table.add_column("prompt", max_width=40)
    table.add_column("completion", max_width=60)
    table.add_column("reward", justify="right")
    for prompt, completion, reward in list(zip(prompts, completions, rewards))[:k]:
        table.add_row(prompt, completion, f"{reward:+.3f}")
    console.print(table)
