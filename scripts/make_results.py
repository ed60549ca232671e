"""``make results``: run the three applications end to end on the real data in ../shared/assets, over several
seeds and two CPU kernel paths, and write docs/RESULTS.md (per application: the before/after means with a 95%
interval over the runs, whether the gain holds under each kernel path, and every run).

Each run is ``ppo-lm pipeline examples/<task>/pipeline.yaml seed=S output_dir=runs/results/<task>/<kernel>-seed<S>``
started from scratch under ``ATEN_CPU_CAPABILITY=<kernel>``; the data are prepared once per task. The numbers in
RESULTS.md are read back from the runs' own files; nothing is typed in by hand.

    python scripts/make_results.py [--tasks ...] [--seeds 0 1 2] [--kernels avx512 avx2] [--jobs 2]
    python scripts/make_results.py --report-only   # rewrite RESULTS.md from the runs already there
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from learning_spread import capability  # noqa: E402
from ppo_lm.stats import format_interval, mean_interval  # noqa: E402
from ppo_lm.tasks import TASKS, text_generation  # noqa: E402

#: The metrics shown per application (the eval reports more; all of it is in runs/<task>/eval/compare.json).
SHOWN = {
    "sentiment_analysis": ["reward_mean", "accuracy", "valid_answer", "kl_to_reference"],
    "qa": ["reward_mean", "exact_match", "f1", "kl_to_reference", "reference_perplexity"],
    "text_generation": ["reward_mean", "reward[reward.sources.0 (sentiment)]", "positive_fraction",
                        "kl_to_reference", "distinct_1", "distinct_2", "reference_perplexity"],
}
#: The metric that says whether the application improved.
PRIMARY = {"sentiment_analysis": "accuracy", "qa": "exact_match", "text_generation": "reward_mean"}
#: ATEN_CPU_CAPABILITY values tried in this order; the first two that the machine resolves to different kernel
#: paths are used (a machine without AVX512 runs avx2 and default).
KERNELS = ("avx512", "avx2", "default")
WHAT = {
    "sentiment_analysis": "The policy reads an SST-2 sentence and answers `positive` or `negative`. SFT on {sft} "
                          "labelled demonstrations teaches the format; PPO then learns from a reward of 1 for the "
                          "correct label on the other {train} training sentences. Held out: SST-2 `test_dev.jsonl` "
                          "({heldout} sentences), greedy answers.",
    "qa": "Reading comprehension over real TinyStories text (Children's Book Test style): the context is up to three "
          "sentences of a story, the question the next sentence with a character's name blanked out, the answer "
          "that name. SFT on {sft} questions from 400 stories; PPO (reward: exact match) on {train} questions from "
          "the other stories; held out: {heldout} questions from 300 further stories, greedy answers.",
    "text_generation": "The policy continues the opening of a real TinyStories story and is steered toward a positive "
                       "tone: reward = VADER sentiment + 0.2 x a reward model that the pipeline first trains on SST-2 "
                       "(pointwise). Held out: the openings of 300 stories not used in training, sampled at "
                       "temperature 1. The before/after KL and perplexity are measured against the starting model.",
}




def pick_kernels(asked: list[str] | None) -> list[tuple[str, str]]:
    """(ATEN_CPU_CAPABILITY value, the path it resolves to), distinct paths only."""
    picked: dict[str, str] = {}
    for kernel in asked or KERNELS:
        picked.setdefault(capability(kernel), kernel)
        if not asked and len(picked) == 2:
            break
    return [(kernel, cap) for cap, kernel in picked.items()]


def run_dir(task: str, cap: str, seed: int) -> Path:
    return ROOT / "runs" / "results" / task / f"{cap.lower()}-seed{seed}"


def run_one(task: str, kernel: str, cap: str, seed: int, assets: str, threads: int) -> float:
    out = run_dir(task, cap, seed)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ppo_lm.cli", "pipeline", TASKS[task].example, f"assets={assets}", f"seed={seed}",
           f"output_dir={out.relative_to(ROOT)}"]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel, "OMP_NUM_THREADS": str(threads)}
    print(f"$ ATEN_CPU_CAPABILITY={kernel} " + " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    out.mkdir(parents=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def load_runs(task: str) -> list[dict]:
    runs = []
    for d in sorted((ROOT / "runs" / "results" / task).glob("*-seed*")):
        if not (d / "eval" / "compare.json").exists():
            continue
        cap, seed = d.name.rsplit("-seed", 1)
        runs.append({"cap": cap.upper(), "seed": int(seed), "dir": d,
                     "compare": json.loads((d / "eval" / "compare.json").read_text()),
                     "summary": json.loads((d / "summary.json").read_text())})
    return runs


def section(task: str, runs: list[dict]) -> tuple[str, bool]:
    primary = PRIMARY[task]
    counts = json.loads((ROOT / "runs" / "data" / task / "PREPARED.json").read_text())["records"]
    what = WHAT[task].format(**{k.removesuffix(".jsonl"): v for k, v in counts.items()})
    after0 = runs[0]["compare"]["after"]
    caps = sorted({r["cap"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    minutes = sum(sum(r["summary"]["seconds"].values()) for r in runs) / 60 / len(runs)
    lines = [f"## {task}", "", what, "",
             f"Command: `ppo-lm pipeline {TASKS[task].example} seed=S` for seeds {', '.join(map(str, seeds))} under "
             f"`ATEN_CPU_CAPABILITY` = {' and '.join(c.lower() for c in caps)} ({len(runs)} runs, "
             f"{minutes:.1f} min each on average).", "",
             f"| metric ({after0['samples']} held-out prompts, {after0['decoding']}; mean over the {len(runs)} runs) "
             "| before PPO | after PPO | change, mean [95% interval] |", "|---|---|---|---|"]
    for m in SHOWN[task]:
        if all(m in r["compare"]["before"] and m in r["compare"]["after"] for r in runs):
            before = [r["compare"]["before"][m] for r in runs]
            after = [r["compare"]["after"][m] for r in runs]
            change = format_interval([a - b for a, b in zip(after, before)])
            lines.append(f"| {m} | {sum(before) / len(runs):.3f} | {sum(after) / len(runs):.3f} | {change} |")
    ok = True
    lines += ["", f"The gain in {primary} under each kernel path (mean over seeds, 95% interval; it holds when the "
                  "interval is above zero):", ""]
    for cap in caps:
        gains = [r["compare"]["after"][primary] - r["compare"]["before"][primary] for r in runs if r["cap"] == cap]
        holds = len(gains) > 1 and mean_interval(gains)[1] > 0
        ok &= holds
        lines.append(f"- {cap}: {format_interval(gains) if len(gains) > 1 else f'{gains[0]:+.3f}'} over "
                     f"{len(gains)} seeds: {'holds' if holds else 'does NOT hold'}")
    if not ok:
        gains = [r["compare"]["after"][primary] - r["compare"]["before"][primary] for r in runs]
        lines += ["", f"So this gain is **not shown to hold** on each kernel path: it is positive in "
                      f"{sum(g > 0 for g in gains)} of {len(gains)} runs ({min(gains):+.3f} to {max(gains):+.3f}), and "
                      f"over all {len(gains)} runs it is {format_interval(gains)}; with this recipe the CPU's "
                      "rounding and the seed move it as much as PPO does. It needs more seeds, or a stronger recipe, "
                      "before it counts as a result."]
    if task == "text_generation":
        checks = []
        for metric, (kind, bound) in text_generation.BOUNDS.items():
            ratios = [r["compare"]["after"][metric] / r["compare"]["before"][metric] for r in runs]
            passed = all(x >= bound for x in ratios) if kind == "min_ratio" else all(x <= bound for x in ratios)
            ok &= passed
            checks.append(f"{metric} after/before {min(ratios):.2f}–{max(ratios):.2f} over the runs "
                          f"({'>=' if kind == 'min_ratio' else '<='} {bound} in every run: {'met' if passed else 'NOT met'})")
        lines += ["", "Bounds on diversity and fluency: " + "; ".join(checks) + "."]
    lines += ["", "Every run:", "", f"| kernel | seed | {primary} before | after | change | final PPO KL | minutes |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        b, a = r["compare"]["before"][primary], r["compare"]["after"][primary]
        kl = r["summary"].get("ppo", {}).get("kl_last")
        lines.append(f"| {r['cap']} | {r['seed']} | {b:.3f} | {a:.3f} | {a - b:+.3f} | "
                     f"{kl:.2f} | {sum(r['summary']['seconds'].values()) / 60:.1f} |" if kl is not None else "")
    first = runs[0]
    lines += ["", f"PPO curve ({first['cap']}, seed {first['seed']}): ![{task}](results/{task}-training.png)", ""]
    (ROOT / "docs" / "results").mkdir(parents=True, exist_ok=True)
    if (first["dir"] / "ppo" / "training.png").exists():
        shutil.copy(first["dir"] / "ppo" / "training.png", ROOT / "docs" / "results" / f"{task}-training.png")
    return "\n".join(lines), ok


def run_all(args) -> None:
    """Prepare each task's data once, then run every (task, kernel path, seed), ``args.jobs`` at a time."""
    from ppo_lm import tasks
    from ppo_lm.pipeline import load_pipeline_config

    kernels = pick_kernels(args.kernels)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    for task in args.tasks:  # data first, once: the runs then share it
        p = load_pipeline_config(str(ROOT / TASKS[task].example), [f"assets={args.assets}"])
        shutil.rmtree(ROOT / p.data_dir, ignore_errors=True)
        tasks.prepare(task, ROOT / args.assets, ROOT / p.data_dir)
    jobs = [(t, k, c, s) for t in args.tasks for s in args.seeds for k, c in kernels]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(run_one, t, k, c, s, args.assets, threads) for t, k, c, s in jobs]:
            f.result()


def header(total_minutes: float) -> list[str]:
    """The top of RESULTS.md: how the numbers were made, on which machine and date."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return [
        "# Results: the three applications, before and after PPO", "",
        "Written by `make results` (scripts/make_results.py); every number below is read from the runs it made. "
        "Re-run it to regenerate this file.", "",
        f"- Date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{device}; {total_minutes:.0f} min of runs in all (`--jobs` runs at a time, sharing the cores: a run's "
        "minutes below are longer than the same run alone).",
        "- Model: the real pretrained TinyStories Llama `stories260K` (260K parameters) from ../shared/assets "
        "(the example configs name it there; `--assets` moves only the data); "
        "data: the real public datasets there. Nothing here is in the repository.",
        "- Each application ran from scratch once per seed and CPU kernel path (`ATEN_CPU_CAPABILITY`; the rounding "
        "of the kernels changes the training trajectory, so a gain is only reported when it holds on each). The seed "
        "is every stage's `train.seed`; the data split is fixed. Before and after are decoded on the same held-out "
        "prompts with the same evaluation seed. A change is reported as the mean over the runs with a 95% Student-t "
        "interval (mean ± t·s/√n).",
        "- `kl_to_reference` is nats per response against the starting model: for greedy answers the exact KL of each "
        "next-token distribution along the answer, for sampled ones the k1 estimate on the samples.",
        "- What a 260K-parameter model cannot do: extractive QA on SQuAD 2.0 (`ppo-lm prepare qa --source squad`). "
        "After SFT it reaches a token F1 of about 0.01 on held-out questions, too little reward for PPO to learn "
        "from; that source is there for larger models.", "",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["sentiment_analysis", "qa", "text_generation"], choices=list(TASKS))
    ap.add_argument("--assets", default="../shared/assets")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, help="ATEN_CPU_CAPABILITY values (default: the first "
                    "two distinct paths of avx512, avx2, default on this machine)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each gets cores / jobs threads)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite RESULTS.md from the runs there")
    args = ap.parse_args()
    if not (ROOT / args.assets).is_dir():  # the pipelines run from the repository root
        print(f"error: --assets: no such directory: {args.assets} (make results needs the public data there)",
              file=sys.stderr)
        return 2
    if not args.report_only:
        run_all(args)
    sections, all_ok, total_minutes = [], True, 0.0
    for task in args.tasks:
        runs = load_runs(task)
        total_minutes += sum(sum(r["summary"]["seconds"].values()) for r in runs) / 60
        if not runs:
            print(f"error: no finished runs of {task} under runs/results/{task}", file=sys.stderr)
            return 1
        text, ok = section(task, runs)
        sections.append(text)
        all_ok &= ok
    (ROOT / "docs" / "RESULTS.md").write_text("\n".join(header(total_minutes) + sections))
    print(f"wrote docs/RESULTS.md; every gain holds under every kernel path: {all_ok}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
