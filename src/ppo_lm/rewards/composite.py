"""Combining reward sources: a checked weighted sum, and running statistics for normalisation."""

from __future__ import annotations


import torch
from torch import Tensor

from ..errors import RewardError


def check_scores(name: str, out, n: int) -> Tensor:
    """Turn a source's output into a float tensor ``[n]``, or raise :class:`RewardError` naming the source."""
    if isinstance(out, Tensor):
        scores = out.detach().float().cpu().reshape(-1) if out.dim() <= 1 or out.numel() == n else None
    else:
        try:
            scores = torch.tensor([float(x) for x in out], dtype=torch.float32)
        except (TypeError, ValueError):
            raise RewardError(f"must return a list or tensor of floats, got {type(out).__name__}", name) from None
    if scores is None or scores.numel() != n:
        got = tuple(out.shape) if isinstance(out, Tensor) else len(out)
        raise RewardError(f"returned {got} scores for {n} completions", name)
    bad = ~torch.isfinite(scores)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise RewardError(f"returned a non-finite score ({scores[i].item()}) for completion {i}", name)
    return scores


class WeightedSum:
    """``sum_i w_i * source_i(prompts, completions, fields)``; each source's output is checked."""

    def __init__(self, sources: list[tuple[str, float, object]]):
        self.sources = sources

    def __call__(self, prompts: list[str], completions: list[str], fields: dict) -> Tensor:
        return self.detailed(prompts, completions, fields)[0]

    def detailed(self, prompts, completions, fields) -> tuple[Tensor, dict[str, Tensor]]:
        """The total ``[B]`` and each source's raw scores, keyed by source name."""
        total = torch.zeros(len(completions))
        parts = {}
        for name, weight, fn in self.sources:
            try:
                out = fn(prompts, completions, fields)
            except RewardError:
                raise
            except Exception as e:  # a user's reward function failing is a user error, not our bug
                raise RewardError(f"raised {type(e).__name__}: {e}", name) from e
            parts[name] = check_scores(name, out, len(completions))
            total = total + weight * parts[name]
        return total, parts
