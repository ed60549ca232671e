"""The real runs behind docs/tuning.md: the same application trained with a good and a bad setting side by side,
one figure per failure mode (docs/tuning/*.png) and the numbers quoted in the guide (docs/tuning/runs.json).

Needs the prepared data and SFT models that ``make results`` leaves in runs/ (or makes them itself).
About 10 minutes on 2 CPU cores:

    python scripts/tuning_runs.py [--only kl collapse critic]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ppo_lm.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ppo_lm.cli"]

#: scenario -> (example PPO config, panels, [(label, run name, overrides)])
SCENARIOS = {
    "kl": ("examples/text_generation/ppo.yaml", ["reward_mean", "kl", "distinct_2", "entropy"], [
        ("lr 3e-4, kl_coef 0.1", "tg_lr3e-4_kl0.1", ["ppo.lr=3e-4", "ppo.kl.coef=0.1"]),
        ("lr 3e-4, kl_coef 0.3", "tg_lr3e-4_kl0.3", ["ppo.lr=3e-4", "ppo.kl.coef=0.3"]),
        ("lr 1e-4, kl_coef 0.2 (example)", "tg_example", []),
    ]),
    "collapse": ("examples/sentiment_analysis/ppo.yaml", ["reward_mean", "entropy", "clipfrac", "kl"], [
        ("lr 3e-3, kl_coef 0.02", "sa_lr3e-3", ["ppo.lr=3e-3", "ppo.kl.coef=0.02", "train.iterations=40"]),
        ("lr 2e-4 (example)", "sa_example", ["train.iterations=40"]),
    ]),
    "critic": ("examples/qa/ppo.yaml", ["reward_mean", "kl", "value_loss", "explained_variance"], [
        ("value head on the policy trunk", "qa_shared_trunk", ["model.critic=null", "train.iterations=40"]),
        ("the same, value_lr 30x lr", "qa_shared_value_lr", ["model.critic=null", "ppo.value_lr=3e-3",
                                                             "train.iterations=40"]),
        ("separate critic (example)", "qa_example", ["train.iterations=40"]),
    ]),
}
#: Where each scenario's starting model comes from (SFT output of the application's pipeline, if it has one).
START = {"collapse": ("sentiment_analysis", True), "critic": ("qa", True), "kl": ("text_generation", False)}


def sh(cmd: list[str]) -> None:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def ensure_start(task: str, has_sft: bool) -> list[str]:
    data = ROOT / "runs" / "data" / task
    if not (data / "train.jsonl").exists():
        sh([*CLI, "prepare", task, "--out", str(data)])
    if not has_sft:
        return []
    final = ROOT / "runs" / task / "sft" / "final"
    if not (final / "config.json").exists():
        sh([*CLI, "sft", f"examples/{task}/sft.yaml", f"train.output_dir={final.parent}"])
    return [f"model.name_or_path={final.relative_to(ROOT)}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = ROOT / "docs" / "tuning"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "runs.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name in args.only:
        config, panels, variants = SCENARIOS[name]
        start = ensure_start(*START[name])
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
        summary[name] = {}
        for label, run_name, overrides in variants:
            run = Path("runs") / "tuning" / run_name
            sh([*CLI, "train", config, *start, *overrides, f"train.output_dir={run}", "train.progress=false",
                "train.save_final=false", "train.checkpoint_every=0"])
            rows = read_metrics(ROOT / run)
            tail = rows[-5:]
            summary[name][label] = {"command": " ".join(["ppo-lm train", config, *start, *overrides]),
                                    **{k: round(sum(r[k] for r in tail) / len(tail), 4) for k in panels},
                                    "reward_first5": round(sum(r["reward_mean"] for r in rows[:5]) / len(rows[:5]), 4)}
            for ax, key in zip(axes, panels):
                ax.plot([r["iteration"] for r in rows], [r[key] for r in rows], label=label)
                ax.set_title(key)
                ax.set_xlabel("iteration")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=90)
        plt.close(fig)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary[name], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
