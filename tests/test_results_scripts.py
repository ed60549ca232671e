"""The scripts behind docs/RESULTS.md, on hand-made runs: the results page's wording (scripts/make_results.py: the
intervals, the goals and whether a gain holds are read from the runs' numbers, and one run is never given an
interval), and the breakdown of what the models get wrong (scripts/errors.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_results():
    return script("make_results")


@pytest.fixture
def qa_section(make_results, tmp_path, monkeypatch):
    """``section`` for qa_smollm2 on runs made here, with their prepared-data counts in ``tmp_path``."""
    (tmp_path / "PREPARED.json").write_text(json.dumps({"records": {
        "train.jsonl": 40, "heldout.jsonl": 8, "sft.jsonl": 20, "pairs.jsonl": 0, "pairs_heldout.jsonl": 0}}))
    monkeypatch.setattr(make_results, "data_dir", lambda app: tmp_path)
    return lambda runs, zh=False: make_results.section("qa_smollm2", runs, "results/", zh=zh)


def run(cap: str, seed: int, before: float, after: float, seconds=(60.0, 120.0, 30.0)) -> dict:
    """One finished run of qa_smollm2 as ``load_runs`` gives it: answerable F1 ``before`` -> ``after`` PPO."""
    examples = lambda reward: [{"prompt": "Text: ... Question: who?", "completion": "Rollo", "reward": reward}]  # noqa
    side = lambda f1, reward: {"samples": 8, "decoding": "greedy", "answerable_f1": f1, "examples": examples(reward)}
    return {"cap": cap, "seed": seed, "dir": Path("/nonexistent"),
            "compare": {"before": side(before, 0.0), "after": side(after, 1.0), "after_preferred": 0.5},
            "summary": {"seconds": dict(zip(("sft", "ppo", "eval"), seconds)), "ppo": {"kl_last": 0.1}}}


def test_one_run_has_its_value_and_no_interval(qa_section):
    text, ok = qa_section([run("AVX512", 0, 0.30, 0.50)])
    assert "for seed 0 under `ATEN_CPU_CAPABILITY` = avx512 (one run, 3.5 min)." in text
    assert "Goal: answerable_f1 after PPO at least 0.45: 0.500 in the one run: **met**." in text
    assert "- AVX512: +0.200 over one seed (an interval needs more: `make results SEEDS=3`)" in text
    assert "| answerable_f1 | 0.300 | 0.500 | +0.200 |" in text
    assert "Minutes per stage (seed 0): sft 1.0; ppo 2.0; eval 0.5." in text
    assert "[" not in text.split("Goal:")[1].split("\n")[0]  # no interval of one value
    assert ok  # the goal is met and one seed cannot say the gain does not hold


def test_three_seeds_interval_goal_and_gain(qa_section):
    # gains 0.05, 0.10, 0.15: mean 0.10, s = 0.05, t(0.975, 2) = 4.3027 -> half-width 0.1242
    # after 0.35, 0.40, 0.45: mean 0.40 [0.276, 0.524]; the goal (>= 0.45) is met by the third run alone
    text, ok = qa_section([run("AVX512", s, 0.30, a) for s, a in enumerate((0.35, 0.40, 0.45))])
    assert "(3 runs, 3.5 min each on average)" in text
    assert "| answerable_f1 | 0.300 | 0.400 | +0.100 [-0.024, +0.224] |" in text
    assert ("Goal: answerable_f1 after PPO at least 0.45: 0.400 [0.276, 0.524] over 3 runs, 0.350 to 0.450: "
            "**NOT met** (met in 1 of 3 runs).") in text
    assert "- AVX512: +0.100 [-0.024, +0.224] over 3 seeds: does NOT hold" in text
    assert "with this recipe the seed moves it as much as PPO does" in text  # one kernel path: only the seed varies
    assert "Minutes per stage (seeds 0, 1, 2): sft 1.0, 1.0, 1.0; ppo 2.0, 2.0, 2.0; eval 0.5, 0.5, 0.5." in text
    assert not ok


def test_a_gain_that_holds_and_a_goal_met_everywhere(qa_section):
    # gains 0.20, 0.21, 0.22: mean 0.21, s = 0.01 -> [+0.185, +0.235]
    text, ok = qa_section([run("AVX512", s, 0.30, a) for s, a in enumerate((0.50, 0.51, 0.52))])
    assert "- AVX512: +0.210 [+0.185, +0.235] over 3 seeds: holds" in text
    assert "**met** in every run." in text
    assert "not shown to hold" not in text
    assert ok


def test_two_kernel_paths_name_the_rounding_and_each_run(qa_section):
    text, ok = qa_section([run("AVX512", 0, 0.30, 0.40, (60, 60, 60)), run("AVX2", 0, 0.30, 0.25, (120, 120, 120))])
    assert "under `ATEN_CPU_CAPABILITY` = avx2 and avx512 (2 runs, 4.5 min each on average)" in text
    assert "- AVX2: -0.050 over one seed" in text and "- AVX512: +0.100 over one seed" in text
    assert "Minutes per stage (avx512 seed 0, avx2 seed 0): sft 1.0, 2.0; ppo 1.0, 2.0; eval 1.0, 2.0." in text
    assert "| AVX2 | 0 | 0.300 | 0.250 | -0.050 | 0.10 | 6.0 |" in text
    assert not ok  # neither run meets the goal


def test_samples_and_the_chinese_page(qa_section):
    runs = [run("AVX512", s, 0.30, a) for s, a in enumerate((0.35, 0.40, 0.45))]
    text, _ = qa_section(runs)
    assert "Held-out answers improved by PPO (seed 0; the end of each prompt):" in text
    assert "| Text: ... Question: who? | Rollo | Rollo | 0.00 -> 1.00 |" in text
    zh, ok_zh = qa_section(runs, zh=True)
    assert "目标：PPO 之后的 answerable_f1至少 0.45：3 次运行为 0.400 [0.276, 0.524]" in zh
    assert "**未达到**（3 次中 1 次达到）" in zh
    assert "在这个配方下，种子对它的影响与 PPO 一样大" in zh
    assert not ok_zh


def compare_file(folder: Path, before: list[str], after: list[str]) -> Path:
    """A run folder whose eval/compare.json holds these answers before and after PPO."""
    side = lambda answers: {"examples": [{"completion": a, "reward": 0.0} for a in answers]}  # noqa: E731
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "compare.json").write_text(json.dumps({"before": side(before), "after": side(after)}))
    return folder


def test_errors_sorts_each_answerable_qa_answer(tmp_path):
    errors = script("errors")
    text = "Rollo led the Normans to Normandy in 911."
    prompt = f'Answer the question with a short span.\n\nText: {text}\n\nQuestion: q?'
    records = [{"prompt": prompt, "answers": ["Rollo"], "answerable": True},
               {"prompt": prompt, "answers": ["in 911"], "answerable": True},
               {"prompt": prompt, "answers": ["Rollo"], "answerable": True},
               {"prompt": prompt, "answers": ["unanswerable"], "answerable": False}]
    assert errors.paragraph(prompt) == text
    # SFT: " Rollo" exact; "911" against "in 911" F1 2/3 (partial); "Normandy" is in the text (a wrong span); the
    # unanswerable question is not counted. PPO: "Rollo" exact (unchanged once stripped), "the Normans" a wrong
    # span, "William" in no paragraph: two of the three answerable answers changed.
    run = compare_file(tmp_path, [" Rollo", "911", "Normandy", "x"], ["Rollo", "the Normans", "William", "x"])
    out = errors.breakdown(run, records)
    assert out["before"] == {"exact": 1, "partial": 1, "wrong_span": 1, "not_a_span": 0}
    assert out["after"] == {"exact": 1, "partial": 0, "wrong_span": 1, "not_a_span": 1, "changed_by_ppo": 2}
    assert "base" not in out


def test_errors_counts_gold_label_against_answer_for_sentiment(tmp_path):
    errors = script("errors")
    records = [{"prompt": "p", "label": label} for label in ("negative", "negative", "positive", "positive")]
    run = compare_file(tmp_path, ["positive", "Positive.", " positive", "maybe"],
                       ["negative", "positive", "positive", "negative"])
    out = errors.breakdown(run, records)
    assert out["before"] == {"negative->positive": 2, "positive->other": 1, "positive->positive": 1}
    # "Positive." -> "positive" is a change of text, so three of the four answers changed
    assert out["after"] == {"negative->negative": 1, "negative->positive": 1, "positive->negative": 1,
                            "positive->positive": 1, "changed_by_ppo": 3}


def write_compare(folder: Path, before: float, after: float) -> None:
    folder.mkdir(parents=True)
    (folder / "compare.json").write_text(json.dumps({"rows": [
        {"metric": "answerable_f1", "before": before, "after": after, "change": after - before}]}))


def test_gains_reads_each_run_and_gives_the_interval_and_the_paired_difference(tmp_path, capsys):
    """Changes 0.1, 0.2, 0.3: mean 0.2, s = 0.1, t(0.975, 2) = 4.303, half-width 4.303 * 0.1 / sqrt(3) = 0.2484.
    The other variant's changes 0.1, 0.1, 0.1 (zero spread); paired differences 0.0, 0.1, 0.2: the same interval."""
    for seed, (before, after) in enumerate([(0.3, 0.4), (0.3, 0.5), (0.2, 0.5)]):
        write_compare(tmp_path / "a" / f"seed{seed}", before, after)
        write_compare(tmp_path / "b" / f"seed{seed}" / "eval", before, before + 0.1)  # a pipeline run's layout
    (tmp_path / "a" / "seed0.log").write_text("not a run")  # files a glob also matches are not runs
    gains = script("gains")
    assert gains.main(["--metric", "answerable_f1", "--pair", "b", "a",
                       f"a={tmp_path}/a/seed*", f"b={tmp_path}/b/seed*"]) == 0
    out = json.loads(capsys.readouterr().out)
    a = out["variants"]["a"]
    assert [round(r["change"], 6) for r in a["runs"]] == [0.1, 0.2, 0.3]
    assert a["change_mean_95ci"] == pytest.approx([0.2, 0.2 - 0.2484, 0.2 + 0.2484], abs=1e-4)
    assert out["variants"]["b"]["change_mean_95ci"] == pytest.approx([0.1, 0.1, 0.1], abs=1e-4)
    assert out["paired_difference"]["per_run"] == pytest.approx([0.0, 0.1, 0.2])
    assert out["paired_difference"]["mean_95ci"] == pytest.approx([0.1, 0.1 - 0.2484, 0.1 + 0.2484], abs=1e-4)


def test_gains_names_what_is_missing(tmp_path):
    gains = script("gains")
    with pytest.raises(SystemExit, match="matches no folder"):
        gains.main([f"a={tmp_path}/none*"])
    write_compare(tmp_path / "run", 0.1, 0.2)
    with pytest.raises(SystemExit, match="no metric 'f1'"):
        gains.main(["--metric", "f1", f"a={tmp_path}/run"])
    with pytest.raises(SystemExit, match="expected NAME=GLOB"):
        gains.main([str(tmp_path / "run")])
