"""Reward sources behind one protocol.

A reward function takes the prompts, the decoded completions and the batch's other dataset fields and returns
one float per completion::

    def reward(prompts: list[str], completions: list[str], fields: dict[str, list]) -> Tensor  # [B]

A prompt that is a conversation reaches a reward as its last user turn; the whole conversation the policy answered
is in ``fields["prompt_messages"]`` (None for text prompts).

Each reward type is a class that owns its options: ``options`` names the keys of its ``reward.sources`` entry it
reads, ``check(src)`` yields ``(option, problem)`` for bad values, and ``from_config(src, device=, key=)`` builds
it. :data:`REWARD_TYPES` is the registry: adding a type is its file and one line there (plus a field in
:class:`~ppo_lm.config.RewardSourceConfig` if it brings a new option). :func:`build_reward` turns the ``reward``
section of a config into one function: the weighted sum of its sources, each checked for NaN, wrong length and
wrong type, with errors naming the source. Shaping after the sum (missing-EOS score, normalisation, clipping)
is :mod:`ppo_lm.rewards.shaping`.
"""

from __future__ import annotations

import math
from typing import Protocol

from torch import Tensor

from .builtin import F1, ExactMatch, Format, Keyword, Length, Sentiment
from .composite import WeightedSum
from .model import RewardModel
from .python import PythonReward
from .shaping import RunningMoments, shape_scores


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], fields: dict) -> Tensor: ...


#: ``reward.sources[].type`` -> the class of that reward type.
REWARD_TYPES: dict[str, type] = {
    "model": RewardModel,
    "python": PythonReward,
    "sentiment": Sentiment,
    "exact_match": ExactMatch,
    "f1": F1,
    "keyword": Keyword,
    "length": Length,
    "format": Format,
}

#: Keys of a source entry that every type has.
COMMON_KEYS = ("type", "weight")


def source_problems(src, defaults=None):
    """Yield ``(key, problem)`` for a ``reward.sources`` entry: its weight, its type's own checks, and an option
    set that its type does not read (``defaults``, an entry with every option at its default, tells which are
    set; ``None`` skips that check)."""
    if not math.isfinite(src.weight):
        yield "weight", f"must be a finite number, got {src.weight}"
    kind = REWARD_TYPES[src.type]
    if defaults is not None:
        for key, default in vars(defaults).items():
            if key not in COMMON_KEYS and key not in kind.options and getattr(src, key) != default:
                own = ", ".join(kind.options) or "none besides weight"
                yield key, f"is not an option of a {src.type!r} reward (its options: {own})"
    yield from kind.check(src)


def build_source(src, *, device=None, key: str = "reward.sources.0") -> RewardFn:
    """One reward source from a :class:`~ppo_lm.config.RewardSourceConfig`; ``key`` names it in errors."""
    return REWARD_TYPES[src.type].from_config(src, device=device, key=key)


def source_name(src, key: str) -> str:
    """How errors name a source: ``reward.sources.1 (python: my_rewards:politeness)``."""
    detail = src.function if src.type == "python" else src.path if src.type == "model" else None
    return f"{key} ({src.type}{': ' + detail if detail else ''})"


def build_reward(reward_cfg, *, device=None) -> WeightedSum:
    """The config's reward: the weighted sum of its sources."""
    keys = [f"reward.sources.{i}" for i in range(len(reward_cfg.sources))]
    return WeightedSum([(source_name(s, k), s.weight, build_source(s, device=device, key=k))
                        for s, k in zip(reward_cfg.sources, keys)])


__all__ = ["REWARD_TYPES", "RewardFn", "build_reward", "build_source", "source_problems", "WeightedSum",
           "RunningMoments", "shape_scores"]
