"""ppo-lm's GRPO against TRL 1.12.0's GRPOTrainer on a real application (issue 21): SST-2 sentiment on
SmolLM2-135M-Instruct, the same algorithm and settings on both sides (benchmarks/trl_grpo_sst2.py lists them):
ppo-lm runs examples/sentiment_analysis/smollm2/ppo.yaml with ``ppo.advantage_estimator=grpo``, 4 answers per
prompt, and the KL moved from the reward to a k3 loss term of weight 0.05 (``ppo.kl.coef=0
ppo.kl.loss_coef=0.05``), which is GRPO's (and TRL's only) way. TRL's GRPOConfig turns gradient checkpointing on by default and ppo-lm
leaves it off, so each side runs either way (``--arms``). For each seed the arms train one after the other (the
order reverses with each seed), each policy is evaluated greedily by ``ppo-lm eval`` on the first
``--eval-limit`` held-out sentences of SST-2 test_dev, and the peak RSS of each training process is read from the
kernel (``wait4``). Writes docs/results/grpo-vs-trl-sst2.json (replacing a run of the same arm and seed) and
prints one JSON line per run.

    python scripts/grpo_vs_trl_real.py [--trl-python /tmp/trl-peer/trl-venv/bin/python] [--arms ppo-lm-gc trl]
        [--seeds 0 1 2]
    python scripts/grpo_vs_trl_real.py --table    # the markdown table of docs/estimators.md, from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from estimators_real import CONFIG, DATA, ROOT, evaluate, interval, open_record

RECORD = ROOT / "docs" / "results" / "grpo-vs-trl-sst2.json"
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
#: each arm: the tool, and whether it trains with gradient checkpointing (TRL's GRPOConfig turns it on by default,
#: ppo-lm's model.gradient_checkpointing is off by default): the matched pairs are ppo-lm/trl-no-gc and ppo-lm-gc/trl
ARMS = {"ppo-lm": ("ppo-lm", False), "ppo-lm-gc": ("ppo-lm", True), "trl": ("trl", True),
        "trl-no-gc": ("trl", False)}


def run_measured(argv: list[str], log: Path) -> tuple[str, float, float]:
    """Run ``argv`` with its output in ``log``; its stdout, wall minutes and peak RSS (MiB, this process alone)."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    minutes = (time.perf_counter() - start) / 60
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed (exit {proc.returncode}); see {log}")
    return log.read_text(), minutes, usage.ru_maxrss / 1024


def ppo_lm_run(seed: int, run: Path, checkpointing: bool) -> dict:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["data"]["path"] = str(DATA / "train.jsonl")
    cfg["model"]["name_or_path"] = str(GGUF)
    cfg["model"]["gradient_checkpointing"] = checkpointing
    cfg["rollout"]["samples_per_prompt"] = 4
    cfg["ppo"].pop("value_lr", None)
    cfg["ppo"].update({"advantage_estimator": "grpo"})
    cfg["ppo"]["kl"] = {"coef": 0.0, "loss_coef": 0.05, "loss_estimator": "k3"}
    cfg["train"].update({"output_dir": str(run), "seed": seed, "progress": False, "log_samples": 0})
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    _, minutes, rss = run_measured([sys.executable, "-m", "ppo_lm.cli", "train", str(run / "config.yaml")],
                                   run / "train.log")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"train_minutes": round(minutes, 1), "peak_rss_mib": round(rss, 1),
            "seconds_per_iteration": round(sum(r["time_iteration_s"] for r in rows[1:]) / (len(rows) - 1), 1),
            "reward_curve": [round(r["reward_mean"], 4) for r in rows]}


def trl_run(seed: int, run: Path, python: str, checkpointing: bool) -> dict:
    from ppo_lm.gguf_source import as_folder

    run.mkdir(parents=True, exist_ok=True)
    stdout, minutes, rss = run_measured(
        [python, str(ROOT / "benchmarks" / "trl_grpo_sst2.py"), "--model", as_folder(GGUF, "model"),
         "--data", str(DATA / "train.jsonl"), "--out", str(run), "--seed", str(seed),
         *([] if checkpointing else ["--no-gradient-checkpointing"])], run / "train.log")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"train_minutes": round(minutes, 1), "peak_rss_mib": round(rss, 1),
            "seconds_per_iteration": result["seconds_per_iteration"], "reward_curve": result["reward_mean"],
            "versions": {k: result[k] for k in ("tool", "transformers", "peft", "torch")}}


def table(record: dict) -> str:
    lines = ["| run | seeds | held-out accuracy (zero-shot "
             f"{record['zero_shot']['accuracy']:.3f}) | each seed | KL to the start | train reward, last 5 "
             "iterations | s/iteration | peak RSS, highest run (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for arm, (tool, checkpointing) in ARMS.items():
        runs = sorted((r for r in record["runs"] if r["arm"] == arm), key=lambda r: r["seed"])
        if not runs:
            continue
        name = ("ppo-lm" if tool == "ppo-lm" else "TRL GRPOTrainer") + (
            ", gradient checkpointing" if checkpointing else "")
        lines.append(f"| {name} | {len(runs)} | {interval([r['accuracy'] for r in runs])} | "
                     + ", ".join(f"{r['accuracy']:.3f}" for r in runs)
                     + f" | {interval([r['kl_to_reference'] for r in runs])} | "
                     f"{interval([sum(r['reward_curve'][-5:]) / 5 for r in runs])} | "
                     f"{sum(r['seconds_per_iteration'] for r in runs) / len(runs):.1f} | "
                     f"{max(r['peak_rss_mib'] for r in runs):.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-python", default="/tmp/trl-peer/trl-venv/bin/python")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["ppo-lm-gc", "trl"],
                        help="what runs for each seed, in this order (reversed for odd seeds)")
    parser.add_argument("--eval-limit", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "runs" / "grpo_vs_trl_sst2"))
    parser.add_argument("--table", action="store_true", help="print the table of the recorded runs and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RECORD.read_text())))
        return 0
    out = Path(args.out)
    record = open_record(RECORD, args.eval_limit, "grpo_vs_trl_real.py")
    if "zero_shot" not in record:  # the same evaluation as scripts/estimators_real.py: its record's, if it has one
        other = ROOT / "docs" / "results" / "estimators-sst2.json"
        other = json.loads(other.read_text()) if other.exists() else {}
        record["zero_shot"] = (other["zero_shot"] if other.get("eval") == record["eval"]
                               else evaluate(str(GGUF), args.eval_limit, out / "zero-shot"))
    print(json.dumps({"zero_shot": record["zero_shot"]}), flush=True)
    for seed in args.seeds:
        for arm in (args.arms if seed % 2 == 0 else args.arms[::-1]):
            tool, checkpointing = ARMS[arm]
            run = out / f"{arm}-seed{seed}"
            trained = (ppo_lm_run(seed, run, checkpointing) if tool == "ppo-lm"
                       else trl_run(seed, run, args.trl_python, checkpointing))
            curve = trained["reward_curve"]
            row = {"arm": arm, "tool": tool, "gradient_checkpointing": checkpointing, "seed": seed, **trained,
                   "reward_first3": round(sum(curve[:3]) / 3, 3), "reward_last5": round(sum(curve[-5:]) / 5, 3),
                   **evaluate(str(run / "final"), args.eval_limit, run / "eval")}
            print(json.dumps({k: v for k, v in row.items() if k != "reward_curve"}), flush=True)
            record["runs"] = [r for r in record["runs"] if (r["arm"], r["seed"]) != (arm, seed)] + [row]
            RECORD.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
