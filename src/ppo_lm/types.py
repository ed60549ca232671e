"""The data that flows between the phases of one PPO iteration.

Shapes: ``B`` sequences, ``P`` prompt tokens (left-padded), ``T`` response tokens (right-padded).
Per-token tensors are ``[B, T]`` and index the *response* tokens; ``response_mask`` is True for real response
tokens up to and including EOS and False for the padding after it. In a multi-turn episode (a text environment,
:mod:`ppo_lm.envs`) the response is everything after the first observation: the policy's turns, whose tokens are
the actions (``response_mask``), and the environment's replies between them, which are context only
(``context_mask`` is True for both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """What the current policy produced for a batch of prompts (step 1 of the iteration)."""

    prompt_ids: Tensor  #: [B, P] long, left-padded prompt tokens
    prompt_mask: Tensor  #: [B, P] bool, True for real prompt tokens
    response_ids: Tensor  #: [B, T] long, sampled tokens, pad after EOS
    response_mask: Tensor  #: [B, T] bool, True up to and including EOS
    logprobs: Tensor  #: [B, T] float, log pi_old(token) at the sampling temperature, 0 after EOS
    ref_logprobs: Tensor  #: [B, T] float, log pi_ref(token) at the same temperature, 0 after EOS
    values: Tensor  #: [B, T] float, V_old(state before token), 0 after EOS
    entropy: Tensor  #: [B, T] float, entropy of pi_old at each response state, 0 after EOS
    ended_with_eos: Tensor  #: [B] bool, whether the response contains EOS
    prompts: list[str]  #: the B prompt texts the rewards see (the user message, without the chat template)
    completions: list[str]  #: the B decoded responses, without special tokens
    fields: dict = field(default_factory=dict)  #: other dataset columns of the batch, each a list of B values
    #: [B, T] float, log of each token's probability under the distribution it was drawn from (after top-k/top-p),
    #: 0 after EOS; None when not recorded
    sampling_logprobs: Tensor | None = None
    #: [B, T] bool, True for every real token after the prompt, the environment's replies included; None: the
    #: same as response_mask (one turn, no environment)
    context_mask: Tensor | None = None
    #: [B, T] float, an environment's reward for each turn at the turn's last token (0 elsewhere); None: one score
    #: per sequence, from the reward sources
    turn_rewards: Tensor | None = None

    def rows(self, idx: list[int]) -> "Rollout":
        """The rollout of the sequences ``idx`` (in that order)."""
        from dataclasses import fields as dataclass_fields, replace

        picked = {f.name: getattr(self, f.name) for f in dataclass_fields(self)}
        picked = {k: (v[idx] if isinstance(v, Tensor) else [v[i] for i in idx] if isinstance(v, list)
                      else None if v is None else {c: [vals[i] for i in idx] for c, vals in v.items()})
                  for k, v in picked.items()}
        return replace(self, **picked)

    @property
    def input_ids(self) -> Tensor:
        """[B, P + T] prompt and response, the sequence the policy is trained on."""
        import torch

        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """[B, P + T] bool."""
        import torch

        return torch.cat([self.prompt_mask, self.seen_mask], dim=1)

    @property
    def seen_mask(self) -> Tensor:
        """[B, T] bool, the response tokens the model attends to (context_mask, or response_mask without one)."""
        return self.response_mask if self.context_mask is None else self.context_mask


@dataclass(frozen=True, kw_only=True)
class ScoredRollout:
    """A rollout with its rewards and advantages (steps 2 and 3): everything the update needs."""

    rollout: Rollout
    scores: Tensor  #: [B] float, the sequence-level reward after normalisation/penalties
    raw_scores: Tensor  #: [B] float, the reward sources' weighted sum before any normalisation
    kl: Tensor  #: [B, T] float, the per-token KL estimate used in the penalty, 0 after EOS
    rewards: Tensor  #: [B, T] float, -kl_coef * kl plus the score at the last real token
    advantages: Tensor  #: [B, T] float, GAE advantages (whitened if configured), 0 after EOS
    returns: Tensor  #: [B, T] float, value targets, 0 after EOS
