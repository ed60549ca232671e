"""The spread of every learning test over seeds and CPU kernel paths: what each test's threshold is set from.

Runs ``pytest -m learning`` once per (kernel path, seed) with ``ATEN_CPU_CAPABILITY`` and ``PPO_LM_TEST_SEED`` set;
each learning test appends the value it asserts on, and its threshold, to a log (tests/conftest.py ``learned``).
Prints one JSON object, per test: the values per kernel path, the lowest, the mean and the failures; also
written to docs/results/learning-spread.json.

    python scripts/learning_spread.py [--seeds 0 1 2 3 4] [--kernels default avx2 avx512] [--jobs 2] [-k EXPR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def capability(kernel: str) -> str:
    """The kernel path PyTorch actually takes under ``ATEN_CPU_CAPABILITY=kernel`` on this machine."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def one(kernel: str, seed: int, log: Path, threads: int, keyword: str | None) -> int:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel, "PPO_LM_TEST_SEED": str(seed), "PPO_LM_LEARNING_LOG": str(log),
           "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "learning", "-p", "no:cacheprovider", "--basetemp",
           str(log.with_suffix(".tmp")), *(["-k", keyword] if keyword else [])]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--kernels", nargs="+", default=["default", "avx2", "avx512"])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("-k", dest="keyword", help="only the learning tests matching this pytest -k expression")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "learning-spread.json"))
    args = ap.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(k, s, Path(tmp) / f"{k}-{s}.jsonl") for k in args.kernels for s in args.seeds]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda r: one(*r, threads, args.keyword), runs))
        rows = [json.loads(line) for *_, log in runs if log.exists() for line in log.read_text().splitlines()]
    tests: dict[str, dict] = {}
    for r in rows:
        t = tests.setdefault(r["test"], {"threshold": r["threshold"], "by_kernel": {}, "failures": []})
        t["by_kernel"].setdefault(r["kernel"], []).append(round(r["value"], 4))
        if not r["value"] > r["threshold"]:
            t["failures"].append({"kernel": r["kernel"], "seed": r["seed"], "value": r["value"]})
    for t in tests.values():
        values = [v for vs in t["by_kernel"].values() for v in vs]
        t.update(runs=len(values), lowest=min(values), mean=round(sum(values) / len(values), 4))
    report = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"{cpu_name()}", "seeds": args.seeds, "kernels": args.kernels, "tests": tests}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 1 if any(t["failures"] for t in tests.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
