"""The advantage estimators side by side on a real application (issue 21): SST-2 sentiment on SmolLM2-135M-Instruct
(examples/sentiment_analysis/smollm2/ppo.yaml: LoRA, bf16 autocast, 20 iterations of 32 responses, KL penalty in
the reward), the same run with each ``ppo.advantage_estimator``. The group estimators sample 4 answers for each of
8 prompts, the others one answer for each of 32. Each run's policy is evaluated greedily on the first
``--eval-limit`` held-out sentences of SST-2 test_dev, like the zero-shot model once. Adds its runs to
docs/results/estimators-sst2.json (replacing a run of the same estimator and seed) and prints one JSON line per
run.

    python scripts/estimators_real.py [--estimators gae grpo] [--seeds 0 1] [--eval-limit 300]
    python scripts/estimators_real.py --table    # the markdown table of docs/estimators.md, from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "sentiment_analysis" / "smollm2" / "ppo.yaml"
DATA = ROOT / "runs" / "data" / "sentiment_analysis_smollm2"
GROUPS = {"grpo", "dr_grpo", "rloo"}


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ppo_lm.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"ppo-lm {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def evaluate(model: str, limit: int, out: Path) -> dict:
    stdout = cli("eval", str(CONFIG), f"data.path={DATA / 'heldout.jsonl'}", "--model", model, "--reference",
                 str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"), "--limit", str(limit), "--greedy",
                 "--output-dir", str(out))
    result = json.loads(stdout.strip().splitlines()[-1])
    return {k: result[k] for k in ("accuracy", "valid_answer", "kl_to_reference") if k in result}


def open_record(path: Path, eval_limit: int, script: str) -> dict:
    """The JSON record at ``path`` for this run of ``script``, with the SST-2 data prepared: started over when its
    evaluation set differs (runs measured on another set are not comparable); date, machine and command updated."""
    import torch

    if not (DATA / "train.jsonl").exists():
        cli("prepare", "sentiment_analysis", "--source", "sst2_chat", "--out", str(DATA))
    eval_set = f"first {eval_limit} of SST-2 test_dev, greedy"
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("eval") != eval_set:
        record = {"eval": eval_set, "runs": []}
    record.update({"date": datetime.date.today().isoformat(),
                   "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                              f"{torch.backends.cpu.get_cpu_capability()}"})
    record.setdefault("commands", []).append(f"python scripts/{script} " + " ".join(sys.argv[1:]))
    return record


def interval(values: list[float]) -> str:
    """Mean and 95% t-interval half-width of ``values`` (the range alone for one value)."""
    import statistics

    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return f"{mean:.3f}"
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(n, 2.0)
    return f"{mean:.3f} ± {t * statistics.stdev(values) / n ** 0.5:.3f}"


def table(record: dict) -> str:
    order = ["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
    lines = ["| estimator | seeds | held-out accuracy (zero-shot "
             f"{record['zero_shot']['accuracy']:.3f}) | each seed | KL to the start | train reward, last 5 iterations "
             "| s/iteration |", "|---|---|---|---|---|---|---|"]
    for name in sorted({r["estimator"] for r in record["runs"]}, key=order.index):
        runs = sorted((r for r in record["runs"] if r["estimator"] == name), key=lambda r: r["seed"])
        lines.append(f"| `{name}` | {len(runs)} | {interval([r['accuracy'] for r in runs])} | "
                     + ", ".join(f"{r['accuracy']:.3f}" for r in runs)
                     + f" | {interval([r['kl_to_reference'] for r in runs])} | "
                     f"{interval([r['reward_last5'] for r in runs])} | "
                     f"{sum(r['seconds_per_iteration'] for r in runs) / len(runs):.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimators", nargs="+", default=["gae", "grpo"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-limit", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "runs" / "estimators_sst2"))
    parser.add_argument("--table", action="store_true", help="print the table of the recorded runs and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads((ROOT / "docs" / "results" / "estimators-sst2.json").read_text())))
        return 0
    out = Path(args.out)
    path = ROOT / "docs" / "results" / "estimators-sst2.json"
    record = open_record(path, args.eval_limit, "estimators_real.py")
    if "zero_shot" not in record:
        record["zero_shot"] = evaluate(str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"), args.eval_limit,
                                       out / "zero-shot")
    print(json.dumps({"zero_shot": record["zero_shot"]}), flush=True)
    base = yaml.safe_load(CONFIG.read_text())
    for estimator in args.estimators:
        for seed in args.seeds:
            run = out / f"{estimator}-seed{seed}"
            cfg = json.loads(json.dumps(base))
            cfg["data"]["path"] = str(DATA / "train.jsonl")
            cfg["model"]["name_or_path"] = str(ROOT / cfg["model"]["name_or_path"])
            cfg["ppo"]["advantage_estimator"] = estimator
            if estimator in GROUPS:
                cfg["rollout"]["samples_per_prompt"] = 4
            if estimator != "gae":
                cfg["ppo"].pop("value_lr", None)
            cfg["train"].update({"output_dir": str(run), "seed": seed, "progress": False, "log_samples": 0})
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            start = time.perf_counter()
            cli("train", str(run / "config.yaml"))
            minutes = (time.perf_counter() - start) / 60
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            row = {"estimator": estimator, "seed": seed, "train_minutes": round(minutes, 1),
                   "reward_first3": round(sum(r["reward_mean"] for r in rows[:3]) / 3, 3),
                   "reward_last5": round(sum(r["reward_mean"] for r in rows[-5:]) / 5, 3),
                   "seconds_per_iteration": round(sum(r["time_iteration_s"] for r in rows[1:]) / (len(rows) - 1), 1),
                   **evaluate(str(run / "final"), args.eval_limit, run / "eval")}
            print(json.dumps(row), flush=True)
            record["runs"] = [r for r in record["runs"] if (r["estimator"], r["seed"]) != (estimator, seed)] + [row]
            path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
