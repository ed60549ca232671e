"""End-to-end PPO on a tiny model: learning, determinism, saving, LoRA."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppo_lm.models import load_causal_lm, load_policy, make_reference
from ppo_lm.trainer import train

from conftest import LEARNING_SEED, prompt_records, tiny_config, without_timing


@pytest.mark.slow
@pytest.mark.learning
def test_reward_rises_on_a_verifiable_task(tiny_model_dir, tmp_path, learned):
    """reward = fraction of the token 'a' in the response; a random-init model starts near 1/13.

    Measured (scripts/learning_spread.py, 2026-12-02, seeds 0-4 x ATEN_CPU_CAPABILITY default/avx2/avx512 on
    a 2-core AMD EPYC, docs/results/learning-spread.json): the rise from the first 3 to the last 5 iterations
    was 0.57-0.87 (mean 0.78; the lowest on AVX512); the AVX512 host of issue 16 saw 0.36 with the last 3. The
    batch reward swings by +-0.2 between iterations, so the end is averaged over 5, and the bar, 0.3, is about
    half the lowest rise measured: a policy that does not learn stays within +-0.05 of its start."""
    cfg = tiny_config(tiny_model_dir, tmp_path, train={"iterations": 30, "seed": LEARNING_SEED})
    result = train(cfg, records=prompt_records())
    rewards = [m["reward_mean"] for m in result.metrics]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert first < 0.3, rewards
    learned(last - first, 0.3, rewards)
    assert all(torch.isfinite(torch.tensor(m["kl"])) for m in result.metrics)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 31))
    required = {"iteration", "reward_mean", "reward_std", "kl", "entropy", "policy_loss", "value_loss", "clipfrac",
                "approx_kl", "explained_variance", "response_length", "time_rollout_s", "time_generate_s",
                "time_score_s", "time_train_s", "tokens_per_s"}
    assert required <= set(rows[0])
    assert (tmp_path / "training.png").stat().st_size > 1000


def test_training_is_deterministic_on_cpu(tiny_model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = tiny_config(tiny_model_dir, tmp_path / name, train={"iterations": 3, "save_final": False})
        result = train(cfg, records=prompt_records())
        metrics = without_timing(result.metrics)
        for m in result.metrics:  # generation is timed inside the rollout and not counted twice
            assert 0 < m["time_generate_s"] < m["time_rollout_s"]
            assert m["time_iteration_s"] == pytest.approx(m["time_rollout_s"] + m["time_score_s"] + m["time_train_s"])
        runs.append((metrics, {k: v.clone() for k, v in result.policy.state_dict().items()}))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[1][1][k]), k


def test_saved_policy_loads_with_plain_transformers(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, train={"iterations": 2})
    result = train(cfg, records=prompt_records())
    final = tmp_path / "final"
    assert (final / "model.safetensors").exists() and (final / "value_head.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    for k, v in model.state_dict().items():
        assert torch.equal(v, result.policy.lm.state_dict()[k]), k
    enc = tok(["a b c"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_lora_keeps_one_copy_and_disabled_adapters_are_the_reference(tiny_model_dir, tmp_path):
    base = load_causal_lm(str(tiny_model_dir))
    base_numel = sum(p.numel() for p in base.parameters())
    cfg = tiny_config(tiny_model_dir, tmp_path, model={"name_or_path": str(tiny_model_dir),
                                                        "lora": {"enabled": True, "r": 4, "alpha": 8}},
                      ppo={"lr": 5e-2, "num_minibatches": 2, "kl": {"coef": 0.01}}, train={"iterations": 3})
    policy = load_policy(cfg.model)
    assert make_reference(policy).shares_weights  # no frozen copy: the reference is the policy with adapters off
    lora_numel = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    head_numel = sum(p.numel() for p in policy.value_head.parameters())
    assert sum(p.numel() for p in policy.parameters()) == base_numel + lora_numel + head_numel
    assert all(not p.requires_grad for n, p in policy.lm.named_parameters() if "lora_" not in n)

    result = train(cfg, records=prompt_records())
    trained = result.policy
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with trained.adapters_disabled() as ref_view:
            ref_logits = ref_view(input_ids=ids, attention_mask=mask).logits
        base_logits = base(input_ids=ids, attention_mask=mask).logits
        policy_logits = trained.lm(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ref_logits, base_logits)  # exactly the reference
    assert not torch.allclose(policy_logits, base_logits)  # and the adapters did learn something
    # the merged model is saved for plain transformers
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids, attention_mask=mask).logits, policy_logits, atol=1e-5)


def test_lora_on_the_last_layers_only(tiny_model_dir):
    """lora.last_layers: adapters in the last N blocks only (every linear module there, or those named in
    target_modules), so that no gradient flows below them; more layers than the model has is one clear error."""
    from ppo_lm.config import LoraConfig
    from ppo_lm.errors import UserError
    from ppo_lm.models import apply_lora

    def adapted(**lora):
        model = apply_lora(load_causal_lm(str(tiny_model_dir)), LoraConfig(enabled=True, **lora), "CAUSAL_LM")
        return sorted({n.split(".lora_")[0].removeprefix("base_model.model.") for n, p in model.named_parameters()
                       if p.requires_grad})

    assert adapted(last_layers=1) == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
                                      "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert adapted(last_layers=1, target_modules=["c_attn"]) == ["transformer.h.1.attn.c_attn"]
    assert len(adapted(last_layers=2)) == len(adapted()) == 8  # all the layers: as without the option
    with pytest.raises(UserError, match="is 3, but the model has 2 layers"):
        adapted(last_layers=3)
    with pytest.raises(UserError, match="no module of the last 1 layers matches"):
        adapted(last_layers=1, target_modules=["nothing"])


def test_separate_critic_model(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, model={"name_or_path": str(tiny_model_dir),
                                                        "critic": str(tiny_model_dir)}, train={"iterations": 2})
    result = train(cfg, records=prompt_records())
    assert result.policy.critic is not None
    assert all(torch.isfinite(torch.tensor(m["value_loss"])) for m in result.metrics)


def test_value_lr_puts_the_value_side_in_its_own_parameter_group(tiny_model_dir, tmp_path):
    from ppo_lm.config import ModelConfig
    from ppo_lm.models import parameter_groups, trainable_parameters

    for critic in (None, str(tiny_model_dir)):
        policy = load_policy(ModelConfig(name_or_path=str(tiny_model_dir), critic=critic))
        (one,) = parameter_groups(policy, 1e-5, None)
        assert one["lr"] == 1e-5 and len(one["params"]) == len(trainable_parameters(policy))
        main, value = parameter_groups(policy, 1e-5, 3e-4)
        assert (main["lr"], value["lr"]) == (1e-5, 3e-4)
        expected_value = {id(p) for p in policy.value_head.parameters()}
        if critic:
            expected_value |= {id(p) for p in policy.critic.parameters()}
        assert {id(p) for p in value["params"]} == expected_value
        assert {id(p) for p in main["params"]} | expected_value == {id(p) for p in trainable_parameters(policy)}
        assert not {id(p) for p in main["params"]} & expected_value


def test_value_lr_moves_the_value_head_faster_than_the_policy_lr_can(tiny_model_dir, tmp_path):
    """16 AdamW steps at lr 1e-5 move a weight by at most ~1.6e-4; the value head at value_lr 1e-2 moves far more."""
    steps = {"lr": 1e-5, "epochs": 4, "num_minibatches": 4}
    slow = train(tiny_config(tiny_model_dir, tmp_path / "a", ppo=steps, train={"iterations": 1}), records=prompt_records())
    fast = train(tiny_config(tiny_model_dir, tmp_path / "b", ppo={**steps, "value_lr": 1e-2}, train={"iterations": 1}),
                 records=prompt_records())
    assert slow.policy.value_head.summary.bias.abs().item() < 2e-4
    assert fast.policy.value_head.summary.bias.abs().item() > 1e-2
