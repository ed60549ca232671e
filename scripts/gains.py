"""A metric's change from before to after, over the seeds of one variant: what the result JSON files of
docs/results (qa-rloo-t07.json, ...) report, read back from the runs themselves.

Each run folder is one seed of ``ppo-lm pipeline`` (its ``eval/compare.json``) or a folder that
``ppo-lm eval --compare`` wrote into (``compare.json``). Several variants go side by side, each a ``NAME=GLOB``:

    python scripts/gains.py --metric answerable_f1 \
        gae='runs/results/qa_smollm2/avx512-seed*' rloo_t07='runs/qa_rloo/seed*'

Prints one JSON object: per variant, each run's before, after and change, and the mean change with its 95%
interval (Student t over the runs; ``ppo_lm.stats.mean_interval``). With the same seeds in two variants, also the
paired difference of their changes (``--pair A B``).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ppo_lm.stats import mean_interval  # noqa: E402


def compare_file(run: Path) -> Path:
    for candidate in (run / "eval" / "compare.json", run / "compare.json"):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"error: {run}: no eval/compare.json or compare.json (is the run finished?)")


def metric_row(path: Path, metric: str) -> dict:
    rows = {r["metric"]: r for r in json.loads(path.read_text())["rows"]}
    if metric not in rows:
        raise SystemExit(f"error: {path}: no metric {metric!r} (it has {', '.join(sorted(rows))})")
    return rows[metric]


def interval(values: list[float]) -> list[float] | None:
    return [round(v, 4) for v in mean_interval(values)] if len(values) > 1 else None


def variant(pattern: str, metric: str) -> dict:
    runs = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_dir())
    if not runs:
        raise SystemExit(f"error: {pattern}: matches no folder")
    out = []
    for run in runs:
        row = metric_row(compare_file(run), metric)
        out.append({"run": str(run), "before": row["before"], "after": row["after"], "change": row["change"]})
    return {"runs": out, "after_mean_95ci": interval([r["after"] for r in out]),
            "change_mean_95ci": interval([r["change"] for r in out])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metric", default="reward_mean", help="a metric row of compare.json")
    ap.add_argument("--pair", nargs=2, metavar=("A", "B"), help="also B's change minus A's, seed by seed")
    ap.add_argument("variants", nargs="+", metavar="NAME=GLOB")
    args = ap.parse_args(argv)
    result: dict = {"metric": args.metric, "variants": {}}
    for spec in args.variants:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise SystemExit(f"error: {spec!r}: expected NAME=GLOB")
        result["variants"][name] = variant(pattern, args.metric)
    if args.pair:
        a, b = (result["variants"].get(n) for n in args.pair)
        if a is None or b is None:
            raise SystemExit(f"error: --pair {' '.join(args.pair)}: not among the variants")
        if len(a["runs"]) != len(b["runs"]):
            raise SystemExit("error: --pair: the two variants have different numbers of runs")
        diffs = [y["change"] - x["change"] for x, y in zip(a["runs"], b["runs"])]
        result["paired_difference"] = {"per_run": [round(d, 4) for d in diffs], "mean_95ci": interval(diffs)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
