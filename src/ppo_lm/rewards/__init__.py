"""Reward sources behind one protocol.

A reward function takes the prompts, the decoded completions and the batch's other dataset fields and returns
one float per completion::

    def reward(prompts: list[str], completions: list[str], fields: dict[str, list]) -> Tensor  # [B]

:func:`build_reward` turns the ``reward`` section of a config into one such function: the weighted sum of
its sources, each checked for NaN, wrong length and wrong type, with errors naming the source.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from .composite import WeightedSum
from .shaping import RunningMoments, shape_scores
from .builtin import BUILTIN


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], fields: dict) -> Tensor: ...


def build_source(src, *, device=None, key: str = "reward.sources.0") -> RewardFn:
    """One reward source from a :class:`~ppo_lm.config.RewardSourceConfig`; ``key`` names it in errors."""
    if src.type == "model":
        from .model import RewardModel

        return RewardModel(src.path, device=device, field=f"{key}.path")
    if src.type == "python":
        from .python import PythonReward

        return PythonReward(src.function, src.kwargs, field=f"{key}.function")
    return BUILTIN[src.type](src)


def build_reward(reward_cfg, *, device=None) -> WeightedSum:
    """The config's reward: the weighted sum of its sources."""
    sources = [(f"reward.sources.{i} ({s.type}{': ' + (s.function or s.path) if s.function or s.path else ''})",
                s.weight, build_source(s, device=device, key=f"reward.sources.{i}")) for i, s in enumerate(reward_cfg.sources)]
    return WeightedSum(sources)


__all__ = ["RewardFn", "build_reward", "build_source", "WeightedSum", "RunningMoments", "shape_scores"]
