"""The task registry: data recipes on small fake asset folders the tests write, hand-computed metrics, and a
pipeline that prepares a task's data itself."""

import dataclasses
import json
import random

import pytest

from ppo_lm import tasks
from ppo_lm.config import load_config
from ppo_lm.errors import ConfigError, UserError
from ppo_lm.tasks import qa, sentiment_analysis, text_generation

from conftest import WORDS
from test_cli import ppo_lm

STORY = ("Lily had a red ball. She gave the ball to Tom. Tom smiled at Lily. Then Lily and Tom played all day. "
         "Tom was happy.")


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def fake_assets(tmp_path):
    """The layout of ../shared/assets, with a few hand-made rows per file."""
    root = tmp_path / "assets"
    rng = random.Random(0)
    sents = [{"sentence": " ".join(rng.choice(WORDS) for _ in range(4)), "label": i % 2} for i in range(520)]
    write_jsonl(root / "sst2" / "train.jsonl", sents)
    write_jsonl(root / "sst2" / "test_dev.jsonl", sents[:20])
    names = ["Lily", "Tom", "Ben", "Sue"]
    stories = [{"text": STORY.replace("Lily", names[i % 4]).replace("Tom", names[(i + 1) % 4])} for i in range(800)]
    write_jsonl(root / "tinystories_text" / "tinystories_train_head.jsonl", stories)
    write_jsonl(root / "squad_v2_dev_subset" / "dev_subset.jsonl", [
        {"context": "The cat sat. The dog ran to the park. It rained.", "question": "Where did the dog run?",
         "answers": [{"text": "the park", "answer_start": 30}, {"text": "park", "answer_start": 34}],
         "is_impossible": False, "title": "Dogs"},
        {"context": "Nothing here.", "question": "Who?", "answers": [], "is_impossible": True, "title": "Normans"},
    ] * 100)
    write_jsonl(root / "imdb" / "reviews.jsonl", [
        {"review": f"Review {i} was<br /><br />a film I saw {i} times.", "sentiment": "positive", "label": 1}
        for i in range(250)])
    return root


def test_qa_questions_blank_a_name_the_context_mentions():
    (questions,) = qa.stories_records([STORY], random.Random(0))
    assert questions, "the story names Lily and Tom in consecutive sentences"
    for q in questions:
        context = q["prompt"].split("\nFill in the blank: ")[0]
        blanked = q["prompt"].split("\nFill in the blank: ")[1].removesuffix("\nAnswer:")
        assert q["answers"][0] in context and "___" in blanked and q["response"] == " " + q["answers"][0]
    # sentence 3 ("Then Lily and Tom played all day.") may only blank a name that sentences 1-2 mention
    assert questions[1]["prompt"].startswith("Story: Lily had a red ball. She gave the ball to Tom. Tom smiled")


def test_squad_records_keep_the_answer_sentence_and_skip_unanswerable():
    rows = [{"context": "The cat sat. The dog ran to the park. It rained.", "question": "Where did the dog run? ",
             "answers": [{"text": "the park", "answer_start": 30}, {"text": "park", "answer_start": 34}],
             "is_impossible": False},
            {"context": "x", "question": "y", "answers": [], "is_impossible": True}]
    (rec,) = qa.squad_records(rows)
    assert rec["prompt"] == "Context: The dog ran to the park.\nQuestion: Where did the dog run?\nAnswer:"
    assert rec["answers"] == ["park", "the park"] and rec["response"] == " the park"


def test_qa_metrics_by_hand():
    completions = ["Lily", " the Tom.", "Ben", "big red dog"]
    answers = [["Lily"], ["Tom"], ["Sam"], ["red dog", "cat"]]
    m = qa.metrics(completions, {"answers": answers})
    assert m["exact_match"] == pytest.approx(2 / 4)  # "the Tom." normalises to "tom"
    # F1 of "big red dog" vs "red dog": precision 2/3, recall 1 -> 0.8
    assert m["f1"] == pytest.approx((1 + 1 + 0 + 0.8) / 4)


def test_sentiment_analysis_metrics_by_hand():
    m = sentiment_analysis.metrics([" positive", "Negative.", "maybe so", ""],
                                   {"label": ["positive", "positive", "negative", "negative"]})
    assert m == {"accuracy": pytest.approx(1 / 4), "valid_answer": pytest.approx(2 / 4)}


def test_text_generation_opening_and_positive_fraction():
    assert text_generation.opening("Tom ran. Then he sat.") == "Tom ran."
    assert text_generation.opening(" ".join(["w"] * 20) + ".") == " ".join(["w"] * 12)
    m = text_generation.metrics(["I love this, it is wonderful", "it is terrible", "a chair"], {})
    assert m["positive_fraction"] == pytest.approx(1 / 3)


def test_prepare_writes_disjoint_splits(fake_assets, tmp_path):
    counts = tasks.prepare("sentiment_analysis", fake_assets, tmp_path / "sa")
    assert counts == {"sft.jsonl": 500, "train.jsonl": 20, "heldout.jsonl": 20}
    sft_rows = [json.loads(x) for x in (tmp_path / "sa" / "sft.jsonl").read_text().splitlines()]
    assert sft_rows[0]["response"] in (" positive", " negative") and sft_rows[0]["prompt"].startswith("Review: ")

    counts = tasks.prepare("qa", fake_assets, tmp_path / "qa")
    assert all(n > 0 for n in counts.values())
    read = lambda f: [json.loads(x) for x in (tmp_path / "qa" / f).read_text().splitlines()]  # noqa: E731
    assert len(read("heldout.jsonl")) == counts["heldout.jsonl"]
    assert all(set(r) == {"prompt", "response", "answers"} for r in read("train.jsonl"))

    counts = tasks.prepare("qa", fake_assets, tmp_path / "squad", source="squad")
    # split by paragraph: all 100 answerable questions share one context, so all of them are held out together
    assert counts == {"sft.jsonl": 0, "train.jsonl": 0, "heldout.jsonl": 100}
    assert tasks.prepared(tmp_path / "squad", "qa", "squad") and not tasks.prepared(tmp_path / "squad", "qa", None)
    counts = tasks.prepare("text_generation", fake_assets, tmp_path / "tg")
    assert counts == {"train.jsonl": 500, "heldout.jsonl": 300}
    assert not list((tmp_path / "tg").glob(".*tmp*")), "no temporary files are left behind"


def test_prepare_refuses_bad_input(fake_assets, tmp_path):
    with pytest.raises(UserError, match="unknown task 'nope'"):
        tasks.prepare("nope", fake_assets, tmp_path)
    with pytest.raises(UserError, match="no source 'imdb'"):
        tasks.prepare("qa", fake_assets, tmp_path, source="imdb")
    with pytest.raises(UserError, match="no such directory"):
        tasks.prepare("qa", tmp_path / "missing", tmp_path)
    with pytest.raises(UserError, match="no such file: .*sst2"):
        tasks.prepare("sentiment_analysis", tmp_path, tmp_path / "out")


def test_malformed_asset_line_is_named(fake_assets, tmp_path):
    bad = fake_assets / "sst2" / "test_dev.jsonl"
    bad.write_text(bad.read_text() + "{not json\n")
    with pytest.raises(UserError, match=r"test_dev.jsonl:21: malformed JSON line"):
        tasks.prepare("sentiment_analysis", fake_assets, tmp_path / "sa")


def test_sentiment_metric_refuses_numeric_labels():
    from ppo_lm.evaluate import task_metrics

    cfg = load_config(None, ["model.name_or_path=m", "data.path=sst.jsonl", "task=sentiment_analysis"],
                      check_paths=False)
    with pytest.raises(UserError, match="sst.jsonl: task 'sentiment_analysis': field 'label' must hold the label word"):
        task_metrics(cfg, [" positive"], {"label": [1]})


def test_config_task_must_be_known(tmp_path):
    with pytest.raises(ConfigError, match="task: unknown task 'q_a' \\(did you mean 'qa'\\?\\)"):
        load_config(None, ["model.name_or_path=m", "data.path=d", "task=q_a"], check_paths=False)


def test_task_metric_names_a_missing_field():
    from ppo_lm.evaluate import task_metrics

    cfg = load_config(None, ["model.name_or_path=m", "data.path=prompts.jsonl", "task=qa"], check_paths=False)
    with pytest.raises(UserError, match="prompts.jsonl: task 'qa' needs the field 'answers'"):
        task_metrics(cfg, ["x"], {"prompt": ["p"]})


def test_every_task_has_its_example_pipeline():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for task in tasks.TASKS.values():
        assert (root / task.example).is_file(), task.example


@pytest.mark.slow
def test_pipeline_prepares_its_task_and_reports_its_metric(tiny_model_dir, fake_assets, tmp_path):
    data = tmp_path / "data"
    (tmp_path / "sft.yaml").write_text(f"model: {{name_or_path: {tiny_model_dir}}}\n"
                                       f"data: {{path: {data / 'sft.jsonl'}}}\noptim: {{epochs: 1}}\n")
    (tmp_path / "ppo.yaml").write_text(
        f"task: sentiment_analysis\nmodel: {{name_or_path: {tiny_model_dir}, critic: policy}}\n"
        f"data: {{path: {data / 'train.jsonl'}}}\n"
        "rollout: {batch_size: 8, max_new_tokens: 4}\nreward: {sources: [{type: exact_match, field: label}]}\n"
        "ppo: {num_minibatches: 2}\ntrain: {iterations: 2, progress: false, log_samples: 0}\n")
    (tmp_path / "pipe.yaml").write_text(
        f"output_dir: {tmp_path / 'p'}\ntask: sentiment_analysis\nassets: {fake_assets}\ndata_dir: {data}\n"
        f"sft: {tmp_path / 'sft.yaml'}\nppo: {tmp_path / 'ppo.yaml'}\neval_data: {data / 'heldout.jsonl'}\n"
        "eval_limit: null\neval_greedy: true\n")
    first = ppo_lm("pipeline", tmp_path / "pipe.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    result = json.loads((tmp_path / "p" / "eval" / "compare.json").read_text())
    assert result["after"]["decoding"] == "greedy" and result["after"]["samples"] == 20
    assert {"accuracy", "valid_answer"} <= set(result["after"]) and result["reward_change_paired_sem"] >= 0
    assert len(result["after"]["scores"]) == 20
    # the model SFT started from is measured too, so that SFT's gain and PPO's are apart
    assert result["base"]["model"] == str(tiny_model_dir) and result["base"]["samples"] == 20
    accuracy = next(r for r in result["rows"] if r["metric"] == "accuracy")
    assert accuracy["base"] == result["base"]["accuracy"] and 0 <= result["after_preferred"] <= 1
    assert (tmp_path / "p" / "eval" / "compare.md").read_text().startswith("| metric | base | before | after |")
    again = ppo_lm("pipeline", tmp_path / "pipe.yaml", cwd=tmp_path)
    assert again.returncode == 0 and "[data] skipped" in again.stderr


def test_chat_model_sources_write_instructions_and_split_squad_by_article(fake_assets, tmp_path):
    counts = tasks.prepare("sentiment_analysis", fake_assets, tmp_path / "sa", source="sst2_chat")
    assert counts == {"train.jsonl": 520, "heldout.jsonl": 20}  # no SFT set: the instruction says what to answer
    row = json.loads((tmp_path / "sa" / "train.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith("Is the sentiment of this movie review positive or negative?")
    assert row["prompt"].endswith("\n\nReview: " + row["prompt"].split("Review: ")[1]) and row["label"] in ("positive", "negative")

    counts = tasks.prepare("qa", fake_assets, tmp_path / "qa", source="squad_chat")
    assert counts == {"sft.jsonl": 100, "train.jsonl": 100, "heldout.jsonl": 100}  # the Normans article is held out
    read = lambda f: [json.loads(x) for x in (tmp_path / "qa" / f).read_text().splitlines()]  # noqa: E731
    assert read("sft.jsonl")[0]["response"] == "park"  # the shortest gold answer is the demonstration
    assert {r["article"] for r in read("heldout.jsonl")} == {"Normans"}
    assert read("heldout.jsonl")[0]["answers"] == ["unanswerable"] and not read("heldout.jsonl")[0]["answerable"]
    train = read("train.jsonl")[0]
    assert train["answers"] == ["park", "the park"] and train["answerable"]
    assert "Text: The cat sat. The dog ran to the park. It rained.\n\nQuestion: Where did the dog run?" in train["prompt"]

    counts = tasks.prepare("text_generation", fake_assets, tmp_path / "tg", source="imdb")
    assert counts == {"train.jsonl": 50, "heldout.jsonl": 200}
    prompts = {json.loads(x)["prompt"] for f in ("train.jsonl", "heldout.jsonl")
               for x in (tmp_path / "tg" / f).read_text().splitlines()}
    assert "Review 7 was a film I saw 7" in prompts and len(prompts) == 250  # eight words, <br /> read as a space


def test_files_an_older_recipe_wrote_are_not_taken_for_prepared(fake_assets, tmp_path, monkeypatch):
    """With the assets at hand, prepared() builds the records again and compares their digest with the manifest's:
    a recipe that changed (here: one record more) or a manifest written before digests makes the files stale."""
    out = tmp_path / "qa"
    tasks.prepare("qa", fake_assets, out, source="squad_chat")
    assert tasks.prepared(out, "qa", "squad_chat", assets=fake_assets)
    recipe = tasks.TASKS["qa"]
    one_more = lambda assets, source: {k: v + [{"prompt": "new"}] for k, v in recipe.build(assets, source).items()}  # noqa: E731
    monkeypatch.setitem(tasks.TASKS, "qa", dataclasses.replace(recipe, build=one_more))
    assert not tasks.prepared(out, "qa", "squad_chat", assets=fake_assets)
    assert tasks.prepared(out, "qa", "squad_chat")  # without the assets, the files are trusted
    monkeypatch.setitem(tasks.TASKS, "qa", recipe)
    manifest = json.loads((out / tasks.MANIFEST).read_text())
    (out / tasks.MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "digest"}))
    assert not tasks.prepared(out, "qa", "squad_chat", assets=fake_assets)  # written before digests were kept


def test_squad_2_metrics_split_answerable_and_unanswerable_by_hand():
    m = qa.metrics(["the park", "big red dog", "Unanswerable.", "the dog"],
                   {"answers": [["park"], ["red dog"], ["unanswerable"], ["unanswerable"]],
                    "answerable": [True, True, False, False]})
    assert m["answerable_exact_match"] == pytest.approx(1 / 2)  # "the park" normalises to "park"
    assert m["answerable_f1"] == pytest.approx((1 + 0.8) / 2)  # "big red dog" vs "red dog": P 2/3, R 1
    assert m["unanswerable_accuracy"] == pytest.approx(1 / 2)
    assert m["exact_match"] == pytest.approx(2 / 4) and m["f1"] == pytest.approx((1 + 0.8 + 1 + 0) / 4)


def test_squad_chat_demonstrates_spans_only_and_keeps_unanswerable_to_a_quarter_of_the_ppo_prompts(fake_assets, tmp_path):
    rows = [{"context": "c", "question": "q", "title": "A", "is_impossible": i % 2 == 0,
             "answers": [] if i % 2 == 0 else [{"text": "c", "answer_start": 0}]} for i in range(80)]
    rows += [{**rows[0], "title": "Normans"}, {**rows[1], "title": "Normans"}]
    write_jsonl(fake_assets / "squad_v2_dev_subset" / "dev_subset.jsonl", rows)
    counts = tasks.prepare("qa", fake_assets, tmp_path / "qa", source="squad_chat")
    read = lambda f: [json.loads(x) for x in (tmp_path / "qa" / f).read_text().splitlines()]  # noqa: E731
    assert counts == {"sft.jsonl": 40, "train.jsonl": 53, "heldout.jsonl": 2}  # all 40 answerable in both; 40 + 13
    assert all(r["response"] == "c" for r in read("sft.jsonl"))  # no "unanswerable" demonstration
    assert sum(not r["answerable"] for r in read("train.jsonl")) == 13  # round(40 / 3): 13 of 53, about a quarter
    assert not {r["article"] for r in read("train.jsonl")} & {"Normans"}


HUMAN = "\n\nHuman: {}\n\nAssistant: {}"


def test_hh_dialogues_read_as_alternating_messages():
    from ppo_lm.tasks import dialogue

    text = HUMAN.format("hi there", "Hello!") + HUMAN.format("steal a car?", "No.")
    assert dialogue.conversation(text) == [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "steal a car?"}, {"role": "assistant", "content": "No."}]
    assert dialogue.conversation("preamble" + text) is None  # text before the first turn
    assert dialogue.conversation("\n\nAssistant: hi\n\nHuman: x") is None  # must start with the human
    assert dialogue.conversation(HUMAN.format("a", "")) is None  # an empty turn
    p = dialogue.pair({"chosen": text, "rejected": HUMAN.format("hi there", "Hello!") + HUMAN.format("steal a car?", "Sure.")})
    assert p == {"prompt": dialogue.conversation(text)[:-1], "chosen": "No.", "rejected": "Sure."}
    assert dialogue.pair({"chosen": text, "rejected": HUMAN.format("other", "Hello!") + HUMAN.format("steal a car?", "Sure.")}) is None
    assert dialogue.pair({"chosen": text, "rejected": text}) is None  # the same reply twice teaches nothing
    assert dialogue.metrics(["No.", " ", "I can not help"], {}) == {"empty_reply": pytest.approx(1 / 3),
                                                                   "reply_words": pytest.approx(5 / 3)}


def test_hh_recipe_files_hold_out_their_prompts_from_every_stage(fake_assets, tmp_path, monkeypatch):
    from ppo_lm.tasks import dialogue

    rows = [{"chosen": HUMAN.format(f"question {i // 2}", "No."), "rejected": HUMAN.format(f"question {i // 2}", "Yes.")}
            for i in range(60)]  # every prompt twice: a held-out prompt's twin must not reach training
    rows.append({"chosen": "broken", "rejected": "broken"})
    write_jsonl(fake_assets / "hh_rlhf_harmless_base" / "test_dev.jsonl", rows)
    monkeypatch.setattr(dialogue, "N_HELDOUT", 10)
    monkeypatch.setattr(dialogue, "N_SFT", 5)
    counts = tasks.prepare("dialogue", fake_assets, tmp_path / "d")
    read = lambda f: [json.loads(x) for x in (tmp_path / "d" / f).read_text().splitlines()]  # noqa: E731
    held = {json.dumps(r["messages"]) for r in read("heldout.jsonl")}
    assert counts["heldout.jsonl"] == counts["pairs_heldout.jsonl"] == 10 and counts["sft.jsonl"] == 5
    assert counts["pairs.jsonl"] == counts["train.jsonl"] <= 50
    train = [json.dumps(r["messages"]) for r in read("train.jsonl")]
    train += [json.dumps(r["prompt"]) for r in read("pairs.jsonl")] + [json.dumps(r["messages"][:-1]) for r in read("sft.jsonl")]
    assert not held & set(train)
    assert read("sft.jsonl")[0]["messages"][-1] == {"role": "assistant", "content": "No."}
    assert read("pairs_heldout.jsonl")[0]["rejected"] == "Yes."


def test_compare_reports_how_often_the_reward_prefers_the_after_model():
    import torch

    from ppo_lm.evaluate import preference

    share, sem = preference(torch.tensor([1.0, -2.0, 0.0, 3.0]))  # wins 1, 0, 0.5, 1
    assert share == pytest.approx(2.5 / 4)
    assert sem == pytest.approx(torch.tensor([1.0, 0.0, 0.5, 1.0]).std().item() / 2)
    assert preference(torch.tensor([])) == (0.0, 0.0)
    assert preference(torch.tensor([1.0] * 13 + [-1.0] * 7))[0] == 0.65  # exact: not float32's 0.6499999762
