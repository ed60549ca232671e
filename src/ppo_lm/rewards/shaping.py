"""Reward shaping: what happens to the summed score of a completion before it becomes the reward at its last
token. A fixed score for a response that ran out of tokens without EOS, normalisation by running statistics,
clipping; each is a reward-section (or rollout-section) option."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def shape_scores(raw: Tensor, ended_with_eos: Tensor, *, missing_eos_penalty: float | None, normalize: bool,
                 clip: float | None, stats: RunningMoments) -> Tensor:
    """``raw`` ``[B]`` -> the shaped scores ``[B]``, in this order: responses that did not end with EOS get
    ``missing_eos_penalty`` (when set); with ``normalize`` the scores are standardised by ``stats``, updated with
    this batch first; with ``clip`` they are clamped to ``[-clip, clip]``."""
    scores = raw
    if missing_eos_penalty is not None:
        scores = torch.where(ended_with_eos, scores, torch.full_like(scores, missing_eos_penalty))
    if normalize:
        stats.update(scores)
        scores = (scores - stats.mean) / stats.std
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


class RunningMoments:
    """Running mean and standard deviation of scores (Chan et al. parallel update), for reward normalisation."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: Tensor) -> None:
        x = x.double()
        n, mean, var = x.numel(), x.mean().item(), x.var(unbiased=False).item() if x.numel() > 1 else 0.0
        delta, total = mean - self.mean, self.count + n
        self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
