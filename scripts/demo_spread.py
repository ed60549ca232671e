"""How much the demo's numbers move with the CPU's rounding: ``ppo-lm demo`` from scratch (its model pre-trained
anew, in a cache of its own) under each ``ATEN_CPU_CAPABILITY``, then each number's range. Prints one JSON object,
also written to docs/results/demo-spread.json; the README's demo table quotes it.

    python scripts/demo_spread.py [--kernels default avx2 avx512] [--jobs 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from learning_spread import capability, cpu_name  # noqa: E402

KEYS = ("reward_first3", "reward_last3", "eval_reward_before", "eval_reward_after", "final_kl")


def one(kernel: str, threads: int) -> dict:
    out = ROOT / "runs" / "demo-spread" / kernel
    shutil.rmtree(out.parent / f"cache-{kernel}", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel, "OMP_NUM_THREADS": str(threads),
           "PPO_LM_CACHE": str(out.parent / f"cache-{kernel}")}
    subprocess.run([sys.executable, "-m", "ppo_lm.cli", "demo", "--output-dir", str(out)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    return {"kernel": capability(kernel), **json.loads((out / "summary.json").read_text())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", nargs="+", default=["default", "avx2", "avx512"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "demo-spread.json"))
    args = ap.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda k: one(k, threads), args.kernels))
    ranges = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in KEYS}
    report = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores, {cpu_name()}",
              "runs": runs, "ranges": ranges}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
