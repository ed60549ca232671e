"""Sentiment analysis: the policy reads a sentence and answers with a label word, ``positive`` or ``negative``.

Data (SST-2, sentence level, from the assets folder): a small demonstration set teaches the answer format (SFT);
PPO then learns from a reward of 1 for the correct label on the rest of the training sentences; accuracy is measured
on SST-2 ``test_dev.jsonl``, which neither stage sees.
"""

from __future__ import annotations

import random
from pathlib import Path

NAME = "sentiment_analysis"
SUMMARY = "read a sentence, answer 'positive' or 'negative'; reward = correct label; metric = accuracy"
#: ``sst2``: "Review: ...\nSentiment:" completion prompts and 500 SFT demonstrations, for a base model;
#: ``sst2_chat``: the same sentences as an instruction, for a chat model's template (no SFT set: the instruction says
#: what to answer).
SOURCES = ("sst2", "sst2_chat")
LABELS = {0: "negative", 1: "positive"}
#: Demonstrations in the SFT set: enough to learn the answer format, few enough that PPO has something to add.
N_SFT = 500


def prompt(text: str) -> str:
    return f"Review: {text}\nSentiment:"


def instruction(text: str) -> str:
    return ("Is the sentiment of this movie review positive or negative? Answer with one word: positive or "
            f"negative.\n\nReview: {text}")


def build(assets: Path, source: str) -> dict[str, list[dict]]:
    from . import read_jsonl

    train = read_jsonl(assets / "sst2" / "train.jsonl")
    test = read_jsonl(assets / "sst2" / "test_dev.jsonl")
    random.Random(0).shuffle(train)
    if source == "sst2_chat":
        return {"train.jsonl": [{"prompt": instruction(r["sentence"]), "label": LABELS[r["label"]]} for r in train],
                "heldout.jsonl": [{"prompt": instruction(r["sentence"]), "label": LABELS[r["label"]]} for r in test]}
    demos, rest = train[:N_SFT], train[N_SFT:]
    return {
        "sft.jsonl": [{"prompt": prompt(r["sentence"]), "response": " " + LABELS[r["label"]]} for r in demos],
        "train.jsonl": [{"prompt": prompt(r["sentence"]), "label": LABELS[r["label"]]} for r in rest],
        "heldout.jsonl": [{"prompt": prompt(r["sentence"]), "label": LABELS[r["label"]]} for r in test],
    }


def answer(completion: str) -> str:
    words = completion.strip().lower().split()
    return words[0].strip(".,!") if words else ""


def metrics(completions: list[str], fields: dict[str, list]) -> dict[str, float]:
    """accuracy: the first word of the answer is the gold label; valid: it is one of the label words."""
    answers = [answer(c) for c in completions]
    if not all(isinstance(g, str) for g in fields["label"]):
        raise TypeError("field 'label' must hold the label word ('positive' or 'negative'), not a number or null")
    n = max(1, len(answers))
    return {"accuracy": sum(a == gold for a, gold in zip(answers, fields["label"])) / n,
            "valid_answer": sum(a in LABELS.values() for a in answers) / n}
