"""PPO in a text environment, measured: ppo_lm/guess-number (secret 1..8, 6 turns) on a small random-init GPT-2
over the game's words, one token per turn. Per seed: the greedy success rate on 64 held-out secrets before
training and after 200 iterations of 64 episodes, and the training curve. Writes docs/results/envs.json and
docs/images/env-guess-number.png (the curve of every seed); tests/test_envs.py's learning test runs the same
configuration (:func:`config`).

    python scripts/env_results.py [--seeds 0 1 2 3 4] [--iterations 200]
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The game's words: what the toy tokenizer knows (the numbers 1..8 and the words of the environment's texts).
WORDS = [str(i) for i in range(1, 9)] + \
    "I am thinking of a number from to . Guess it : reply with one will say higher or lower Reply Correct !".split()


def build_model(out: Path) -> Path:
    """A random-init 2-layer GPT-2, 64 wide, over :data:`WORDS` (seed 0: the same model for every run)."""
    from ppo_lm import toy

    tok = toy.word_tokenizer(WORDS)
    return toy.save_model(toy.gpt2(tok, n_layer=2, n_embd=64, n_head=2, n_positions=128, seed=0), tok, out)


def config(model_dir: Path, out: Path, seed: int, iterations: int = 200):
    from ppo_lm.config import config_from_dict

    return config_from_dict({
        "model": {"name_or_path": str(model_dir)},
        "env": {"id": "ppo_lm/guess-number", "kwargs": {"high": 8}, "max_turns": 6, "max_tokens": 64,
                "eval_episodes": 64},
        "rollout": {"batch_size": 64, "max_new_tokens": 1},
        "ppo": {"lr": 3e-3, "num_minibatches": 2, "kl": {"coef": 0.01}},
        "train": {"output_dir": str(out), "iterations": iterations, "eval_every": iterations // 4, "progress": False,
                  "log_samples": 0, "save_final": False, "seed": seed}})


def held_out_success(cfg, model_dir: Path) -> float:
    """Greedy success rate of the model in ``model_dir`` on the config's held-out episodes."""
    from ppo_lm import evaluate

    return evaluate.evaluate_env(cfg, str(model_dir), greedy=True)["success_rate"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--iterations", type=int, default=200)
    args = parser.parse_args()

    import torch
    from rich.console import Console

    from ppo_lm.stats import format_interval, mean_interval
    from ppo_lm.trainer import train

    torch.set_num_threads(min(2, torch.get_num_threads()))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model")
        before = held_out_success(config(model_dir, Path(tmp) / "x", 0, args.iterations), model_dir)
        for seed in args.seeds:
            start = time.time()
            result = train(config(model_dir, Path(tmp) / f"run{seed}", seed, args.iterations),
                           console=Console(file=io.StringIO()))
            rewards = [m["reward_mean"] for m in result.metrics]
            runs.append({"seed": seed, "seconds": round(time.time() - start, 1),
                         "held_out_success_after": result.metrics[-1]["eval/success_rate"],
                         "train_success_first20": sum(rewards[:20]) / 20,
                         "train_success_last20": sum(rewards[-20:]) / 20,
                         "turns_first": result.metrics[0]["turns_mean"], "turns_last": result.metrics[-1]["turns_mean"],
                         "curve": [round(r, 4) for r in rewards]})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}), flush=True)
    after = [r["held_out_success_after"] for r in runs]
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, kernel path "
                   f"{torch.backends.cpu.get_cpu_capability()}", "torch": torch.__version__,
        "command": "python scripts/env_results.py " + " ".join(sys.argv[1:]),
        "held_out_success_before": before, "held_out_success_after": format_interval(after),
        "held_out_success_after_mean": mean_interval(after)[0],
        "train_rise": format_interval([r["train_success_last20"] - r["train_success_first20"] for r in runs]),
        "runs": runs}
    (ROOT / "docs" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "docs" / "results" / "envs.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(runs, before, ROOT / "docs" / "images" / "env-guess-number.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    return 0


def plot(runs: list[dict], before: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r in runs:
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], linewidth=1, alpha=0.8, label=f"seed {r['seed']}")
    ax.axhline(before, color="grey", linestyle="--", linewidth=1, label="held-out, before (greedy)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("success rate (training episodes)")
    ax.set_title("ppo_lm/guess-number, 1..8 in 6 turns, small GPT-2")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
