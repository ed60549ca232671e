"""The estimator family (issue 21): the critic-free baselines, returns-to-go, the KL loss term, the loss
aggregations and the clip variants, with hand-computed values; each estimator learning on the verifiable task;
the config switch from the command line.

Every expected value is arithmetic that can be checked on paper, not a call of the function under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from ppo_lm import algo
from ppo_lm.cli import main
from ppo_lm.config import load_config
from ppo_lm.trainer import train

from conftest import LEARNING_SEED, keyword_config_file, prompt_records, tiny_config

F64 = torch.float64
S2 = 1 / math.sqrt(2)


def t64(data) -> torch.Tensor:
    return torch.tensor(data, dtype=F64)


# ---------------------------------------------------------------------------------------------- baselines


def test_grpo_normalises_within_each_group():
    # groups [1, 2] and [3, 5]: means 1.5 and 4, unbiased stds sqrt(0.5) and sqrt(2): every one is +-1/sqrt(2)
    assert_close(algo.grpo_baseline(t64([1, 2, 3, 5]), 2, eps=0.0), t64([-S2, S2, -S2, S2]))
    # a group whose responses all scored the same teaches nothing: 0, not NaN
    assert_close(algo.grpo_baseline(t64([2, 2, 0, 1]), 2), t64([0, 0, -0.5 / (S2 + 1e-4), 0.5 / (S2 + 1e-4)]))
    with pytest.raises(ValueError, match="groups of 3"):
        algo.grpo_baseline(t64([1, 2, 3, 4]), 3)


def test_dr_grpo_subtracts_the_group_mean_only():
    assert_close(algo.dr_grpo_baseline(t64([1, 2, 3, 5]), 2), t64([-0.5, 0.5, -1.0, 1.0]))


def test_rloo_subtracts_the_mean_of_the_others():
    # [1, 2, 6]: 1 - (2 + 6) / 2 = -3; 2 - (1 + 6) / 2 = -1.5; 6 - (1 + 2) / 2 = 4.5
    assert_close(algo.rloo_baseline(t64([1, 2, 6, 0, 0, 3]), 3), t64([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    with pytest.raises(ValueError, match="at least 2"):
        algo.rloo_baseline(t64([1, 2]), 1)


def test_returns_to_go_discounts_and_stops_at_the_mask():
    rewards = t64([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: G_1 = 2, G_0 = 1 + 0.5 * 2 = 2 (the 3 after EOS is ignored); row 1: 6, 5 + 3 = 8, 4 + 4 = 8
    assert_close(algo.returns_to_go(rewards, mask, 0.5), t64([[2, 2, 0], [8, 8, 6]]))
    assert_close(algo.returns_to_go(rewards, mask, 1.0), t64([[3, 2, 0], [15, 11, 6]]))


def test_critic_free_advantages_add_the_kl_penalty_per_token():
    scores, mask = t64([1, 3]), torch.tensor([[1, 1], [1, 0]])
    kl = t64([[0.2, 0.4], [0.0, 0.0]])
    # dr_grpo: sequence rewards [-1, 1]; row 0's tokens: -0.5 * 0.2 = -0.1 and -0.5 * 0.4 - 1 = -1.2, so the
    # returns-to-go are -1.3, -1.2; row 1: 1 at its only token
    adv, rewards = algo.critic_free_advantages("dr_grpo", scores, kl, mask, kl_coef=0.5, gamma=1.0, group_size=2)
    assert_close(rewards, t64([[-0.1, -1.2], [1.0, 0.0]]))
    assert_close(adv, t64([[-1.3, -1.2], [1.0, 0.0]]))
    # rloo with groups of 2: r - the other one = [-2, 2]
    adv, _ = algo.critic_free_advantages("rloo", scores, kl * 0, mask, kl_coef=0.5, gamma=1.0, group_size=2)
    assert_close(adv, t64([[-2, -2], [2, 0]]))


def test_reinforce_pp_whitens_over_the_batch():
    scores, mask = t64([1, 3]), torch.tensor([[1, 1], [1, 0]])
    adv, _ = algo.critic_free_advantages("reinforce_pp", scores, t64([[0, 0], [0, 0]]), mask, kl_coef=0.1,
                                         gamma=1.0, group_size=1)
    # returns-to-go [1, 1, 3] over the 3 real tokens: mean 5/3, unbiased var ((2/3)^2 * 2 + (4/3)^2) / 2 = 4/3
    sd = math.sqrt(4 / 3)
    assert_close(adv, t64([[-2 / 3 / sd, -2 / 3 / sd], [4 / 3 / sd, 0]]), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- KL, losses


def test_kl_k2_is_half_the_squared_log_ratio():
    assert_close(algo.kl_k2(t64([-1.0, -3.0]), t64([-2.0, -1.0])), t64([0.5, 2.0]))
    assert set(algo.KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_loss_aggregations():
    x = t64([[1, 2, 3], [4, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert_close(algo.aggregate(x, mask, "token_mean"), t64(10 / 4))  # (1 + 2 + 3 + 4) / 4 tokens
    assert_close(algo.aggregate(x, mask, "seq_mean_token_mean"), t64((2 + 4) / 2))  # means 2 and 4
    assert_close(algo.aggregate(x, mask, "seq_mean_token_sum"), t64((6 + 4) / 2))  # sums 6 and 4
    assert_close(algo.aggregate(x, mask, "seq_mean_token_sum_norm", norm=4), t64((6 / 4 + 4 / 4) / 2))
    # a piece of a larger minibatch divides by the minibatch's counts
    assert_close(algo.aggregate(x, mask, "seq_mean_token_sum", n_seqs=4), t64(10 / 4))
    assert_close(algo.aggregate(x, mask, "token_mean", n_tokens=8), t64(10 / 8))
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        algo.aggregate(x, mask, "mean")


def test_dr_grpos_constant_is_the_most_the_policy_can_write():
    """seq_mean_token_sum_norm divides by a constant: rollout.max_new_tokens for one response; over an
    environment's episode, its turns' tokens (max_turns x max_new_tokens), bounded by env.max_tokens."""
    from types import SimpleNamespace

    from ppo_lm.trainer import response_budget

    def cfg(max_new_tokens, max_turns, max_tokens):
        return SimpleNamespace(rollout=SimpleNamespace(max_new_tokens=max_new_tokens),
                               env=SimpleNamespace(max_turns=max_turns, max_tokens=max_tokens))

    assert response_budget(cfg(16, 6, 256), episodic=False) == 16
    assert response_budget(cfg(16, 6, 256), episodic=True) == 96  # 6 turns x 16 < 256
    assert response_budget(cfg(16, 6, 64), episodic=True) == 64  # the episode's bound comes first


def one_token_loss(log_ratio: float, advantage: float, **variants):
    return algo.policy_loss(t64([[log_ratio]]), t64([[0.0]]), t64([[advantage]]), torch.tensor([[1]]),
                            clip_range=0.2, **variants)


def test_clip_higher_widens_the_upper_clip_only():
    loss, stats = one_token_loss(math.log(1.5), 1.0)  # min(1.5, 1.2) * 1
    assert_close(loss, t64(-1.2))
    loss, _ = one_token_loss(math.log(1.5), 1.0, clip_range_high=0.28)  # min(1.5, 1.28)
    assert_close(loss, t64(-1.28))
    loss, _ = one_token_loss(math.log(0.5), -1.0, clip_range_high=0.28)  # lower side unchanged: max(0.5, 0.8)
    assert_close(loss, t64(0.8))


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    loss, stats = one_token_loss(math.log(5.0), -1.0)  # max(5 * 1, 1.2 * 1) = 5
    assert_close(loss, t64(5.0))
    assert stats.dual_clipfrac == 0
    loss, stats = one_token_loss(math.log(5.0), -1.0, dual_clip=3.0)  # min(5, 3 * 1)
    assert_close(loss, t64(3.0))
    assert stats.dual_clipfrac == 1
    loss, _ = one_token_loss(math.log(5.0), 1.0, dual_clip=3.0)  # a positive advantage is untouched: -1.2
    assert_close(loss, t64(-1.2))


def test_log_ratio_clamp():
    loss, stats = one_token_loss(math.log(5.0), -1.0, log_ratio_clamp=1.0)  # ratio e instead of 5
    assert_close(loss, t64(math.e))
    assert_close(stats.ratio_mean, t64(math.e))


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_follow_the_estimator(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {path: d.jsonl}\nreward: {sources: [{type: length}]}\n")
    cfg = load_config(path, check_paths=False)
    assert (cfg.samples_per_prompt, cfg.loss_aggregation) == (1, "token_mean")
    cfg = load_config(path, ["ppo.advantage_estimator=grpo"], check_paths=False)
    assert (cfg.samples_per_prompt, cfg.loss_aggregation) == (4, "token_mean")
    cfg = load_config(path, ["ppo.advantage_estimator=dr_grpo"], check_paths=False)
    assert cfg.loss_aggregation == "seq_mean_token_sum_norm"
    cfg = load_config(path, ["ppo.advantage_estimator=rloo", "rollout.samples_per_prompt=8"], check_paths=False)
    assert cfg.samples_per_prompt == 8


@pytest.mark.parametrize("overrides, message", [
    (["ppo.advantage_estimator=grpo", "rollout.samples_per_prompt=1"], "needs at least 2 per prompt, got 1"),
    (["ppo.advantage_estimator=rloo", "rollout.batch_size=30"], "must be divisible by rollout.samples_per_prompt"),
    (["ppo.advantage_estimator=grpo", "model.critic=policy"], "uses no critic"),
    (["ppo.advantage_estimator=ppo"], "must be one of gae, grpo"),
    (["ppo.loss_aggregation=mean"], "must be one of token_mean"),
    (["ppo.dual_clip=1"], "must be > 1"),
])
def test_bad_estimator_settings_are_one_line_exit_2(tmp_path, capsys, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {path: d.jsonl}\nreward: {sources: [{type: length}]}\n")
    assert main(["train", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.learning
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_each_estimator_learns_the_verifiable_task(estimator, tiny_model_dir, tmp_path, learned):
    """The task of test_trainer's GAE test (reward = share of the token 'a'), 30 iterations of 16 responses
    (4 prompts x 4 for the group estimators). Measured (scripts/learning_spread.py -k estimator, 2026-12-06,
    seeds 0-4 x ATEN_CPU_CAPABILITY default/avx2/avx512 on a 2-core x86_64): the rise from the first 3 to the
    last 5 iterations was at lowest 0.773 (grpo), 0.525 (dr_grpo), 0.500 (rloo), 0.669 (reinforce_pp), means
    0.78-0.83; the bar, 0.3, is that of the GAE test, 60% of the lowest rise seen."""
    cfg = tiny_config(tiny_model_dir, tmp_path, ppo={"advantage_estimator": estimator},
                      train={"iterations": 30, "seed": LEARNING_SEED, "save_final": True})
    result = train(cfg, records=prompt_records())
    rewards = [m["reward_mean"] for m in result.metrics]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    learned(last - first, 0.3, rewards)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert not {"value_loss", "explained_variance", "value_mean"} & set(row)  # no critic
    assert not {"kl_loss", "dual_clipfrac"} & set(row)  # options that are off
    assert row["samples_seen"] == 30 * 16
    assert result.policy.value_head is None
    assert not (tmp_path / "final" / "value_head.safetensors").exists()
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_cli_switch_trains_with_kl_loss_and_clip_variants(tiny_model_dir, tmp_path):
    """`ppo-lm train CFG ppo.advantage_estimator=...` with the KL as a loss term and every clip variant on."""
    cfg = keyword_config_file(tmp_path, tiny_model_dir)
    assert main(["train", str(cfg), "ppo.advantage_estimator=grpo", "ppo.kl.coef=0", "ppo.kl.loss_coef=0.1",
                 "ppo.kl.loss_estimator=k2", "ppo.clip_range_high=0.28", "ppo.dual_clip=3",
                 "ppo.log_ratio_clamp=20", "ppo.loss_aggregation=seq_mean_token_mean"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["kl_loss"]) and "dual_clipfrac" in r for r in rows)
    assert rows[0]["samples_seen"] == 8  # 2 prompts x 4
