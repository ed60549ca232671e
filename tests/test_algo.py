"""Unit tests for ppo_lm.algo with hand-computed expected values.

Every expected value below is written as arithmetic that can be checked on paper; none is produced by
calling the function under test (the GAE differential test uses an independent per-row python loop).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from ppo_lm import algo
from ppo_lm.algo import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_k1,
    kl_k3,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)

F64 = torch.float64


def t64(data) -> torch.Tensor:
    return torch.tensor(data, dtype=F64)


# ---------------------------------------------------------------------------------------------- masks


def test_masked_sum_total_and_dims():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert_close(masked_sum(x, mask), torch.tensor(1.0 + 2.0 + 5.0 + 6.0 + 7.0))
    assert_close(masked_sum(x, mask, dim=1), torch.tensor([1.0 + 2.0, 5.0 + 6.0 + 7.0]))
    assert_close(masked_sum(x, mask, dim=0), torch.tensor([1.0 + 5.0, 2.0 + 6.0, 7.0, 0.0]))
    # a bool mask behaves like a 0/1 mask
    assert_close(masked_sum(x, mask.bool()), torch.tensor(21.0))


def test_masked_mean_total_dims_and_all_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert_close(masked_mean(x, mask), torch.tensor((1.0 + 2.0 + 5.0 + 6.0 + 7.0) / 5))
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([(1.0 + 2.0) / 2, (5.0 + 6.0 + 7.0) / 3]))
    # an all-masked row gives 0, not NaN
    row_masked = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    assert_close(masked_mean(x, row_masked, dim=1), torch.tensor([1.5, 0.0]))
    # an all-masked input gives 0, not NaN
    assert_close(masked_mean(x, torch.zeros_like(mask)), torch.tensor(0.0))
    # T=1
    assert_close(masked_mean(torch.tensor([[3.0], [5.0]]), torch.tensor([[1], [0]])), torch.tensor(3.0))


def test_masked_var_bessel_by_hand():
    # masked values 1, 2, 4 (100 is padding): mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9
    x = torch.tensor([[1.0, 2.0, 4.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    ss = (1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2
    assert_close(masked_var(x, mask), t64(ss / (3 - 1)))  # numpy ddof=1: 7/3
    assert_close(masked_var(x, mask, unbiased=False), t64(ss / 3))  # ddof=0: 14/9
    assert_close(masked_var(x, mask), t64(7 / 3))


def test_masked_var_across_rows_single_and_empty():
    # values 1, 2 (row 0) and 3 (row 1) pooled: mean 2, unbiased var (1 + 0 + 1) / 2 = 1
    x = torch.tensor([[1.0, 2.0, 50.0, 50.0], [3.0, 9.0, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    assert_close(masked_var(x, mask), t64(1.0))
    assert_close(masked_var(x, mask, unbiased=False), t64(2.0 / 3.0))
    # a single real token: variance 0, not NaN/inf
    assert_close(masked_var(x, torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]])), t64(0.0))
    # nothing real: 0, not NaN
    assert_close(masked_var(x, torch.zeros(2, 4)), t64(0.0))


def test_masked_whiten_by_hand_and_padding_zero():
    x = torch.tensor([[1.0, 2.0, 4.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    mean, std = 7 / 3, math.sqrt(7 / 3)
    w = masked_whiten(x, mask)
    expected = t64([[(1 - mean) / std, (2 - mean) / std, (4 - mean) / std, 0.0]])
    assert_close(w, expected)
    assert_close(masked_mean(w, mask), t64(0.0))
    assert_close(masked_var(w, mask), t64(1.0))


def test_masked_whiten_random_mean0_var1_and_outside_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=F64) * 3.0 + 5.0
    lengths = torch.tensor([6, 3, 0, 1])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    w = masked_whiten(x, mask)
    assert_close(masked_mean(w, mask), t64(0.0))
    assert_close(masked_var(w, mask), t64(1.0))
    assert torch.all(w[mask == 0] == 0)
    assert torch.all(w[2] == 0)  # the all-masked row


def test_masked_whiten_no_shift_keeps_mean():
    x = torch.tensor([[1.0, 2.0, 4.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    mean, std = 7 / 3, math.sqrt(7 / 3)
    w = masked_whiten(x, mask, shift_mean=False)
    expected = t64([[(1 - mean) / std + mean, (2 - mean) / std + mean, (4 - mean) / std + mean, 0.0]])
    assert_close(w, expected)
    assert_close(masked_mean(w, mask), t64(mean))  # mean kept
    assert_close(masked_var(w, mask), t64(1.0))  # still unit variance
    assert w[0, 3] == 0


# ------------------------------------------------------------------------------------------ logprobs


def test_logprobs_from_logits_hand_log_softmax():
    # position 0: logits (1, 2, 3), token 0; position 1: logits (0, 0, log 2) = probs (1/4, 1/4, 1/2), token 2
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]]])
    tokens = torch.tensor([[0, 2]])
    lse0 = math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0))
    expected = torch.tensor([[1.0 - lse0, math.log(0.5)]])
    out = logprobs_from_logits(logits, tokens)
    assert out.shape == (1, 2) and out.dtype == torch.float32
    assert_close(out, expected)
    # other tokens of position 1: log(1/4)
    assert_close(logprobs_from_logits(logits, torch.tensor([[1, 0]]))[0, 1], torch.tensor(math.log(0.25)))


def test_logprobs_from_logits_temperature_2():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]]])
    tokens = torch.tensor([[0, 2]])
    # logits / 2 = (0.5, 1, 1.5) and (0, 0, log(2)/2) -> probs of token 2 = sqrt2 / (2 + sqrt2)
    lse0 = math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5))
    expected = torch.tensor([[0.5 - lse0, math.log(math.sqrt(2.0) / (2.0 + math.sqrt(2.0)))]])
    assert_close(logprobs_from_logits(logits, tokens, temperature=2.0), expected)


def test_logprobs_from_logits_bf16_input_is_upcast():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]], dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, torch.tensor([[3]]))
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([[math.log(0.25)]]))


def test_logprobs_gradient_by_hand():
    # d log p(k) / d z_v = 1[v = k] - p_v; probs (1/4, 1/4, 1/2), token 2, upstream gradient 3
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)]]], requires_grad=True)
    (3.0 * logprobs_from_logits(logits, torch.tensor([[2]]))).sum().backward()
    assert_close(logits.grad, torch.tensor([[[-0.75, -0.75, 1.5]]]))
    # temperature 2: z = logits / 2, so the gradient is halved: probs of (0, 0, log2 / 2) are
    # (1, 1, sqrt2) / (2 + sqrt2); token 0
    logits.grad = None
    logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0).sum().backward()
    p = torch.tensor([1.0, 1.0, math.sqrt(2.0)]) / (2.0 + math.sqrt(2.0))
    assert_close(logits.grad, ((torch.tensor([1.0, 0.0, 0.0]) - p) / 2.0).view(1, 1, 3))


def test_logprobs_gradient_matches_autograd_of_the_definition():
    from ppo_lm.algo import _TokenLogprob

    torch.manual_seed(0)
    z = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([[1, 1, 6], [0, 3, 3]])
    assert torch.autograd.gradcheck(lambda x: _TokenLogprob.apply(x, tokens), (z,))
    g = torch.randn(2, 3, dtype=torch.float64)
    (_TokenLogprob.apply(z, tokens) * g).sum().backward()
    ours, z.grad = z.grad, None
    ((torch.log_softmax(z, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)) * g).sum().backward()
    assert_close(ours, z.grad)


def test_logprobs_gradient_reaches_bf16_logits():
    logits = torch.zeros(1, 1, 4, dtype=torch.bfloat16, requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[3]])).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    assert_close(logits.grad.float(), torch.tensor([[[-0.25, -0.25, -0.25, 0.75]]]))


def test_logprobs_and_entropy_together():
    from ppo_lm.algo import logprobs_and_entropy

    # probs (1/4, 1/4, 1/2): H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2; log p(token 2) = -ln 2
    lp, h = logprobs_and_entropy(torch.tensor([[[0.0, 0.0, math.log(2.0)]]]), torch.tensor([[2]]))
    assert_close(lp, torch.tensor([[-math.log(2.0)]]))
    assert_close(h, torch.tensor([[1.5 * math.log(2.0)]]))
    # a masked entry (-inf) contributes 0, not NaN: (0, -inf, 0) is a fair coin
    lp, h = logprobs_and_entropy(torch.tensor([[[0.0, -math.inf, 0.0]]]), torch.tensor([[0]]))
    assert_close(h, torch.tensor([[math.log(2.0)]]))
    # the same numbers as the two functions apart, at a temperature, from bf16 logits
    torch.manual_seed(0)
    logits, tokens = (3 * torch.randn(4, 5, 50)).bfloat16(), torch.randint(50, (4, 5))
    lp, h = logprobs_and_entropy(logits, tokens, temperature=0.7)
    assert lp.dtype == h.dtype == torch.float32
    assert_close(lp, logprobs_from_logits(logits, tokens, temperature=0.7))
    assert_close(h, entropy_from_logits(logits, temperature=0.7))


def test_entropy_uniform_is_log_v():
    logits = torch.zeros(2, 3, 5)
    assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(5.0)))
    assert_close(entropy_from_logits(logits, temperature=2.0), torch.full((2, 3), math.log(5.0)))
    # a constant shift does not change a distribution
    assert_close(entropy_from_logits(logits + 7.0), torch.full((2, 3), math.log(5.0)))


def test_entropy_by_hand_two_tokens_and_temperature():
    # logits (0, log 3): p = (1/4, 3/4), H = -(1/4 log 1/4 + 3/4 log 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert_close(entropy_from_logits(logits), torch.tensor([[h]]))
    # temperature 2: z = (0, log(3)/2), p = (1, sqrt3) / (1 + sqrt3)
    p0, p1 = 1 / (1 + math.sqrt(3.0)), math.sqrt(3.0) / (1 + math.sqrt(3.0))
    h2 = -(p0 * math.log(p0) + p1 * math.log(p1))
    assert_close(entropy_from_logits(logits, temperature=2.0), torch.tensor([[h2]]))


def test_entropy_one_hot_ish_near_zero():
    logits = torch.tensor([[[100.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 60.0, 0.0]]])
    h = entropy_from_logits(logits)
    assert h.shape == (2, 1)
    assert torch.all(h >= 0) and torch.all(h < 1e-5)
    # a very negative but finite mask value for a vocab entry is harmless
    big_neg = torch.finfo(torch.float32).min
    masked = torch.tensor([[[0.0, 0.0, big_neg]]])
    assert_close(entropy_from_logits(masked), torch.tensor([[math.log(2.0)]]))


def test_entropy_with_minus_inf_masked_vocab():
    logits = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    assert_close(entropy_from_logits(logits), torch.tensor([[math.log(2.0)]]))


# ------------------------------------------------------------------------------------------------ KL


def test_kl_k1_values_and_sign():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    assert_close(kl_k1(logprobs, ref), torch.tensor([[-1.0 - (-1.5), -2.0 - (-1.0), 0.0]]))
    k1 = kl_k1(logprobs, ref)
    assert k1[0, 0] > 0  # policy more likely than the reference: positive
    assert k1[0, 1] < 0  # less likely: k1 is negative (it is only unbiased, not pointwise >= 0)


def test_kl_k3_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.7]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -0.7]], dtype=F64)
    # r = q / p = exp(ref - logprobs): exp(-0.5), exp(1), 1 ; k3 = (r - 1) - log r
    r0, r1 = math.exp(-0.5), math.exp(1.0)
    expected = t64([[(r0 - 1) - (-0.5), (r1 - 1) - 1.0, 0.0]])
    assert_close(kl_k3(logprobs, ref), expected)
    assert_close(kl_k3(logprobs, ref)[0, 1], t64(math.e - 2.0))


def test_kl_k3_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(8, 16, generator=g) * 3
    b = torch.randn(8, 16, generator=g) * 3
    assert torch.all(kl_k3(a, b) >= 0)
    assert_close(kl_k3(a, a), torch.zeros(8, 16))


# -------------------------------------------------------------------------------------------- rewards


def test_per_token_rewards_score_at_last_real_token():
    c = 0.5
    scores = torch.tensor([2.0, -1.0, 5.0, 3.0])
    kl = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4],
            [0.5, -0.2, 0.7, 0.8],
            [0.9, 0.9, 0.9, 0.9],
            [0.3, 0.6, 0.6, 0.6],
        ]
    )
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    expected = torch.tensor(
        [
            [-c * 0.1, -c * 0.2 + 2.0, 0.0, 0.0],  # EOS at index 1, padding 0
            [-c * 0.5, -c * -0.2, -c * 0.7, -c * 0.8 + -1.0],  # full row: score at the last index
            [0.0, 0.0, 0.0, 0.0],  # no real token: no score, no penalty
            [-c * 0.3 + 3.0, 0.0, 0.0, 0.0],  # one real token
        ]
    )
    out = per_token_rewards(scores, kl, mask, kl_coef=c)
    assert_close(out, expected)
    assert_close(per_token_rewards(scores, kl, mask.bool(), kl_coef=c), expected)


def test_per_token_rewards_t1_and_zero_coef():
    out = per_token_rewards(torch.tensor([1.0]), torch.tensor([[0.2]]), torch.tensor([[1]]), kl_coef=0.1)
    assert_close(out, torch.tensor([[1.0 - 0.1 * 0.2]]))
    out = per_token_rewards(
        torch.tensor([4.0]), torch.tensor([[0.2, 0.3, 0.4]]), torch.tensor([[1, 1, 0]]), kl_coef=0.0
    )
    assert_close(out, torch.tensor([[0.0, 4.0, 0.0]]))


# ----------------------------------------------------------------------------------------------- GAE


def test_gae_by_hand():
    g, l = 0.9, 0.5
    # row 0: two real tokens then padding with garbage in rewards/values; row 1: full; row 2: empty
    rewards = t64([[0.3, 1.0, 7.0, 7.0], [0.1, -0.2, 0.4, 2.0], [5.0, 5.0, 5.0, 5.0]])
    values = t64([[0.5, 0.8, 9.0, 9.0], [0.2, 0.3, -0.1, 0.6], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])

    # row 0: the value after the last real token is 0 (episode ended)
    a01 = 1.0 + g * 0.0 - 0.8
    a00 = (0.3 + g * 0.8 - 0.5) + g * l * a01
    # row 1
    d3 = 2.0 + g * 0.0 - 0.6
    d2 = 0.4 + g * 0.6 - (-0.1)
    d1 = -0.2 + g * (-0.1) - 0.3
    d0 = 0.1 + g * 0.3 - 0.2
    a13 = d3
    a12 = d2 + g * l * a13
    a11 = d1 + g * l * a12
    a10 = d0 + g * l * a11
    exp_adv = t64([[a00, a01, 0.0, 0.0], [a10, a11, a12, a13], [0.0, 0.0, 0.0, 0.0]])
    exp_ret = t64(
        [
            [a00 + 0.5, a01 + 0.8, 0.0, 0.0],
            [a10 + 0.2, a11 + 0.3, a12 - 0.1, a13 + 0.6],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    adv, ret = gae(rewards, values, mask, gamma=g, lam=l)
    assert_close(adv, exp_adv)
    assert_close(ret, exp_ret)


def test_gae_t1():
    adv, ret = gae(t64([[2.0], [3.0]]), t64([[0.5], [1.0]]), torch.tensor([[1], [0]]), gamma=0.99, lam=0.95)
    assert_close(adv, t64([[2.0 - 0.5], [0.0]]))
    assert_close(ret, t64([[2.0], [0.0]]))


def _reference_gae(rewards, values, lengths, gamma, lam):
    """Plain python GAE that only ever looks at the real tokens of each row."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(lengths[b])
        r = [float(v) for v in rewards[b, :n]]
        v = [float(x) for x in values[b, :n]]
        running = 0.0
        for t in range(n - 1, -1, -1):
            next_v = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_v - v[t]
            running = delta + gamma * lam * running
            adv[b][t] = running
            ret[b][t] = running + v[t]
    return t64(adv), t64(ret)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_per_row_loop_random(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    rewards = torch.randn(B, T, generator=g, dtype=F64)
    values = torch.randn(B, T, generator=g, dtype=F64)  # garbage after EOS too
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 0  # make sure a full and an empty row are present
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    for gamma, lam in [(0.99, 0.95), (0.9, 0.5), (1.0, 1.0), (1.0, 0.0)]:
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
        ref_adv, ref_ret = _reference_gae(rewards, values, lengths, gamma, lam)
        assert_close(adv, ref_adv)
        assert_close(ret, ref_ret)
        assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_gamma1_lam1_returns_are_reward_to_go():
    g = torch.Generator().manual_seed(3)
    B, T = 4, 5
    rewards = torch.randn(B, T, generator=g, dtype=F64)
    values = torch.randn(B, T, generator=g, dtype=F64)
    lengths = [5, 3, 1, 0]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    expected = torch.zeros(B, T, dtype=F64)
    for b, n in enumerate(lengths):
        for t in range(n):
            expected[b, t] = sum(float(rewards[b, k]) for k in range(t, n))
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(ret, expected)
    assert_close(adv, (expected - values) * mask)
    # and by hand for one row: rewards (1, 2, 3) -> reward-to-go (6, 5, 3)
    _, ret = gae(t64([[1.0, 2.0, 3.0, 4.0]]), t64([[0.7, -0.3, 0.2, 9.0]]), torch.tensor([[1, 1, 1, 0]]), 1.0, 1.0)
    assert_close(ret, t64([[6.0, 5.0, 3.0, 0.0]]))


# -------------------------------------------------------------------------------------------- losses


def _policy_case():
    eps = 0.2
    old = t64([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    ratios = [1.5, 0.5, 0.5, 1.5, 3.0]
    logprobs = (old + t64([[math.log(r) for r in ratios]])).requires_grad_(True)
    adv = t64([[1.0, -2.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return eps, old, logprobs, adv, mask


def test_policy_loss_clipped_branches_value_and_stats():
    eps, old, logprobs, adv, mask = _policy_case()
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_range=eps)
    # per token -min(rA, clip(r)A) = max(-rA, -clip(r)A):
    #  0: A=+1, r=1.5 > 1+eps -> clipped: -1 * 1.2
    #  1: A=-2, r=0.5 < 1-eps -> clipped: 2 * 0.8
    #  2: A=+1, r=0.5 < 1-eps -> unclipped (pessimistic): -1 * 0.5
    #  3: A=-1, r=1.5 > 1+eps -> unclipped: 1 * 1.5
    #  4: padding
    per_token = [-1.0 * (1 + eps), 2.0 * (1 - eps), -1.0 * 0.5, 1.0 * 1.5]
    assert_close(loss, t64(sum(per_token) / 4))
    assert_close(loss, t64(0.35))
    assert_close(stats.clipfrac, torch.tensor(2 / 4))
    # approx_kl = mean of k3 = (r - 1) - log r over real tokens
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 0.5, 1.5)]
    assert_close(stats.approx_kl, t64(sum(k3) / 4))
    assert_close(stats.ratio_mean, t64((1.5 + 0.5 + 0.5 + 1.5) / 4))


def test_policy_loss_gradient_zero_in_clipped_region():
    eps, old, logprobs, adv, mask = _policy_case()
    loss, _ = policy_loss(logprobs, old, adv, mask, clip_range=eps)
    loss.backward()
    # d/dlogp of -A r / N is -A r / N where not clipped; 0 in the clipped region and on padding
    expected = t64([[0.0, 0.0, -1.0 * 0.5 / 4, -(-1.0) * 1.5 / 4, 0.0]])
    assert_close(logprobs.grad, expected)


def test_policy_loss_inside_trust_region_and_ratio_one():
    eps = 0.2
    old = t64([[-2.0, -2.0, -2.0]])
    logprobs = (old + t64([[math.log(1.1), math.log(0.9), 0.0]])).requires_grad_(True)
    adv = t64([[2.0, -3.0, 0.5]])
    mask = torch.tensor([[1, 1, 1]])
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_range=eps)
    assert_close(loss, t64((-2.0 * 1.1 + 3.0 * 0.9 - 0.5 * 1.0) / 3))
    assert_close(stats.clipfrac, torch.tensor(0.0))
    assert_close(stats.ratio_mean, t64((1.1 + 0.9 + 1.0) / 3))
    loss.backward()
    assert_close(logprobs.grad, t64([[-2.0 * 1.1 / 3, 3.0 * 0.9 / 3, -0.5 * 1.0 / 3]]))
    # on-policy (ratio 1 everywhere): approx_kl 0, loss = -mean(A)
    loss, stats = policy_loss(old, old, adv, mask, clip_range=eps)
    assert_close(loss, t64(-(2.0 - 3.0 + 0.5) / 3))
    assert_close(stats.approx_kl, t64(0.0))


def test_value_loss_clipped_unclipped_half_and_clipfrac():
    eps = 0.2
    old_values = t64([[1.0, 1.0, 0.0, 0.0]])
    values = t64([[1.5, 1.5, 0.1, 10.0]]).requires_grad_(True)
    returns = t64([[2.0, 1.0, 1.0, -10.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # token 0: v_clip = 1.2; (1.5-2)^2 = 0.25 < (1.2-2)^2 = 0.64 -> clipped branch
    # token 1: v_clip = 1.2; (1.5-1)^2 = 0.25 > (1.2-1)^2 = 0.04 -> unclipped branch
    # token 2: inside the clip range: both (0.1-1)^2 = 0.81
    # token 3: padding
    loss, stats = value_loss(values, old_values, returns, mask, clip_range=eps)
    assert_close(loss, t64(0.5 * (0.64 + 0.25 + 0.81) / 3))
    assert_close(stats.clipfrac, torch.tensor(1 / 3))
    loss.backward()
    # grad of 0.5 (v - R)^2 / N is (v - R) / N where unclipped; 0 where the clipped value saturates
    assert_close(values.grad, t64([[0.0, (1.5 - 1.0) / 3, (0.1 - 1.0) / 3, 0.0]]))


def test_value_loss_unclipped_only_and_t1():
    # nothing moved beyond the clip range: plain 0.5 * MSE
    old_values = t64([[0.0, 1.0]])
    values = t64([[0.1, 0.9]])
    returns = t64([[1.0, 3.0]])
    loss, stats = value_loss(values, old_values, returns, torch.tensor([[1, 1]]), clip_range=0.5)
    assert_close(loss, t64(0.5 * ((0.1 - 1.0) ** 2 + (0.9 - 3.0) ** 2) / 2))
    assert_close(stats.clipfrac, torch.tensor(0.0))
    # T=1, clipped downwards: v=0 moved -1 from old=1, R=2: clip -> 0.8, err max((0-2)^2, (0.8-2)^2) = 4
    loss, stats = value_loss(t64([[0.0]]), t64([[1.0]]), t64([[2.0]]), torch.tensor([[1]]), clip_range=0.2)
    assert_close(loss, t64(0.5 * 4.0))
    assert_close(stats.clipfrac, torch.tensor(0.0))
    # T=1, v=0 moved -1 from old=1, R=-1: clip -> 0.8, max((0+1)^2, (0.8+1)^2) = 3.24 (clipped branch)
    loss, stats = value_loss(t64([[0.0]]), t64([[1.0]]), t64([[-1.0]]), torch.tensor([[1]]), clip_range=0.2)
    assert_close(loss, t64(0.5 * 1.8**2))
    assert_close(stats.clipfrac, torch.tensor(1.0))


def test_explained_variance_perfect_constant_and_by_hand():
    returns = t64([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert_close(explained_variance(returns.clone(), returns, mask), t64(1.0))
    # a constant critic: Var[R - c] = Var[R] -> 0
    assert_close(explained_variance(t64([[5.0, 5.0, 5.0, -7.0]]), returns, mask), t64(0.0))
    # values (1, 2, 4): R - v = (0, 0, -1), unbiased var = ((1/3)^2 + (1/3)^2 + (2/3)^2) / 2 = 1/3; Var[R] = 1
    assert_close(explained_variance(t64([[1.0, 2.0, 4.0, 0.0]]), returns, mask), t64(1.0 - 1.0 / 3.0))


# ----------------------------------------------------------------------------------- KL controllers


def test_fixed_kl_controller_unchanged():
    c = FixedKLController(0.05)
    for kl, n in [(0.0, 64), (100.0, 64), (1e-3, 1)]:
        c.update(kl, n)
    assert c.value == 0.05
    c2 = FixedKLController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == 0.05


def test_adaptive_kl_controller_hand_updates_with_clip():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    expected = 0.1
    c.update(6.6, 256)  # error 6.6/6 - 1 = 0.1 (inside the clip)
    expected *= 1 + 0.1 * 256 / 10000
    assert c.value == pytest.approx(expected, rel=1e-12)
    c.update(12.0, 512)  # error 1.0 -> clipped to +0.2
    expected *= 1 + 0.2 * 512 / 10000
    assert c.value == pytest.approx(expected, rel=1e-12)
    c.update(0.0, 100)  # error -1.0 -> clipped to -0.2
    expected *= 1 - 0.2 * 100 / 10000
    assert c.value == pytest.approx(expected, rel=1e-12)
    c.update(3.0, 1000)  # error -0.5 -> clipped to -0.2
    expected *= 1 - 0.2 * 1000 / 10000
    assert c.value == pytest.approx(expected, rel=1e-12)
    c.update(6.0, 5000)  # at target: unchanged
    assert c.value == pytest.approx(expected, rel=1e-12)
    c.update(5.4, 2000)  # error -0.1 (inside the clip)
    expected *= 1 - 0.1 * 2000 / 10000
    assert c.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_kl_controller_state_dict_round_trip():
    c = AdaptiveKLController(0.2, target=4.0, horizon=1000)
    c.update(5.0, 100)
    state = c.state_dict()
    c2 = AdaptiveKLController(0.9, target=4.0, horizon=1000)
    c2.load_state_dict(state)
    assert c2.value == c.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 1000))
    c.update(2.0, 50)
    c2.update(2.0, 50)
    assert c2.value == c.value


def test_masked_moments_over_processes_by_hand():
    """x = [1, 2, 3 | 4 (masked out)]: mean 2, unbiased var 1. With a ``reduce`` that sums over two processes
    holding [1, 2] and [3]: the same moments as the whole batch on one process."""
    x, m = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[1, 1, 1, 0]])
    mean, var = algo.masked_moments(x, m)
    assert mean.item() == pytest.approx(2.0) and var.item() == pytest.approx(1.0)
    other = torch.tensor([1.0, 3.0], dtype=torch.float64)  # process 2's (n, sum x) = (1, 3) ...
    calls = []

    def reduce(t):  # ... and its sum of squares about the global mean 2: (3 - 2)^2 = 1
        calls.append(t)
        return t + (other if len(calls) == 1 else torch.tensor(1.0, dtype=torch.float64))

    mean, var = algo.masked_moments(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]), reduce)
    assert mean.item() == pytest.approx(2.0) and var.item() == pytest.approx(1.0)


def test_token_mean_by_hand():
    x, m = torch.tensor([[2.0, 4.0, 6.0]]), torch.tensor([[1, 1, 0]])
    assert algo.token_mean(x, m).item() == pytest.approx(3.0)  # (2 + 4) / 2
    assert algo.token_mean(x, m, n_tokens=4.0).item() == pytest.approx(1.5)  # (2 + 4) / 4
    loss, _ = algo.value_loss(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 1.0]]),
                              torch.tensor([[1, 1]]), clip_range=0.2, n_tokens=8.0)
    assert loss.item() == pytest.approx(0.5 * 4.0 / 8.0)  # 0.5 x (2^2 + 0) / 8


def test_process_seeds_and_one_process_helpers():
    from types import SimpleNamespace

    from ppo_lm import distributed as dist

    assert dist.process_seed(7, 0) == 7  # a 1-process run keeps its seed
    assert len({dist.process_seed(7, r) for r in range(8)}) == 8 and dist.process_seed(7, 1) == dist.process_seed(7, 1)
    one = SimpleNamespace(num_processes=1)
    x = torch.tensor([1.0, 2.0])
    assert dist.global_sum(one, x) is x and dist.global_mean(one, 0.25) == 0.25 and dist.any_process(one, True)
    assert dist.summer(one) is None and dist.gather_list(one, [1]) == [1]
