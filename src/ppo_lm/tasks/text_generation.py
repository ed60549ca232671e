"""Text generation: steerable story continuation. The policy continues the opening of a real TinyStories story
and is rewarded for a positive tone (the VADER sentiment scorer, optionally plus a reward model trained by
``ppo-lm reward-model``). The other metrics watch what such steering can break: KL to the starting model,
distinct-1/2 (diversity) and the perplexity of the continuations under the starting model (fluency); the
bounds that ``make results`` checks are in :data:`BOUNDS`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

NAME = "text_generation"
SUMMARY = "continue a story opening in a positive tone; reward = sentiment; metrics = reward, KL, distinct-n, perplexity"
#: ``tinystories``: the openings of TinyStories stories (for the 260K model); ``imdb``: the first words of IMDB movie
#: reviews, half of them negative, continued as plain text (the classic RLHF demonstration).
SOURCES = ("tinystories", "imdb")
#: Words of an IMDB review kept as its opening.
IMDB_WORDS = 8
#: After PPO, diversity and fluency must stay within these bounds relative to the starting model.
BOUNDS = {"distinct_2": ("min_ratio", 0.8), "reference_perplexity": ("max_ratio", 1.5)}


def opening(text: str, words: int = 12) -> str:
    """The story's first sentence, or its first ``words`` words when that sentence is longer."""
    first = re.split(r"(?<=[.!?])\s+", text.strip())[0]
    tokens = first.split()
    return " ".join(tokens[:words]) if len(tokens) > words else first


def review_opening(review: str, words: int = IMDB_WORDS) -> str:
    """The first ``words`` words of a review, its ``<br />`` line breaks read as spaces."""
    return " ".join(re.sub(r"<br\s*/?>", " ", review).split()[:words])


def build(assets: Path, source: str) -> dict[str, list[dict]]:
    from . import read_jsonl

    if source == "imdb":
        reviews = read_jsonl(assets / "imdb" / "reviews.jsonl")
        random.Random(1).shuffle(reviews)
        records = [{"prompt": review_opening(r["review"]), "review_sentiment": r["sentiment"]} for r in reviews]
        return {"train.jsonl": records[200:], "heldout.jsonl": records[:200]}

    stories = [r["text"] for r in read_jsonl(assets / "tinystories_text" / "tinystories_train_head.jsonl")]
    order = list(range(len(stories)))
    random.Random(1).shuffle(order)
    records = [{"prompt": opening(stories[i])} for i in order]
    return {"train.jsonl": records[300:], "heldout.jsonl": records[:300]}


def metrics(completions: list[str], fields: dict[str, list]) -> dict[str, float]:
    """Share of continuations whose VADER compound score is positive (> 0.05, VADER's own threshold)."""
    from ..rewards.builtin import Sentiment

    scores = Sentiment()([], completions, fields)
    return {"positive_fraction": (scores > 0.05).float().mean().item() if len(completions) else 0.0}
