"""ppo-lm plan: the memory formulas by hand, the parameter count from the config, the command."""

import json

import pytest

from ppo_lm import plan
from ppo_lm.plan import Shape

from conftest import tiny_config
from test_cli import ppo_lm, write_config


def test_roles_activations_and_sharding_by_hand(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, data={"max_prompt_tokens": 8})  # micro-batch 8, 8 + 8 tokens
    m = Shape(params=1000, layers=2, hidden=8, vocab=10, kv_width=8)
    parts = plan.roles(cfg, m, None, [])
    assert parts == {"policy": {"weights": 4000, "grads": 4000, "optim": 8000}, "reference": {"frozen": 4000}}
    acts = plan.activations(cfg, m)
    # 128 tokens x 2 layers x 34*8*4/2 bytes + 3 x 8 rows x 8 tokens x 10 logits x 4 bytes
    assert acts["training"] == 128 * 2 * 544 + 7680
    # KV cache: 16 rows x 16 tokens x 2 layers x (k, v) x 8 x 4 bytes, and one step's logits
    assert acts["generation"] == 32768 + 640
    on = lambda strategy: plan.per_device(parts, acts, strategy, 2)  # noqa: E731
    # DDP on 2 devices: the gradient buckets hold a second copy of the gradients
    assert on("ddp") == {"policy": 16000 + 4000, "reference": 4000, "activations": 139264 + 7680}
    assert plan.per_device(parts, acts, "ddp", 1)["policy"] == 16000
    assert on("zero2")["policy"] == 4000 + 2000 + 4000 and on("zero2")["reference"] == 4000
    # ZeRO-3 shards the trainable weights; the reference stays whole, as ppo-lm loads it
    assert on("zero3")["policy"] == 2000 + 2000 + 4000 and on("zero3")["reference"] == 4000
    assert on("zero3-offload")["policy"] == 2000 and on("zero3-offload")["reference"] == 4000
    assert on("fsdp2") == on("zero3")  # FSDP2 shards and gathers as ZeRO-3 does
    # the rollout gathers the policy's weights whole: the half a device lacks (all of them, offloaded)
    sampling = {"training": 0.0, "generation": 100.0}
    assert plan.per_device(parts, sampling, "zero3", 2)["activations"] == 100 + 2000
    assert plan.per_device(parts, sampling, "zero3-offload", 2)["activations"] == 100 + 4000
    assert plan.per_device(parts, sampling, "zero2", 2)["activations"] == 100


def test_lora_bf16_and_checkpointing_change_what_is_counted(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, data={"max_prompt_tokens": 8},
                      model={"dtype": "bfloat16", "gradient_checkpointing": True,
                             "lora": {"enabled": True, "r": 4, "target_modules": ["c_attn"]}})
    m = Shape(params=1000, layers=2, hidden=8, vocab=10, kv_width=8, lora_params=64)
    parts = plan.roles(cfg, m, None, [])
    assert parts == {"policy": {"weights": 2128, "grads": 128, "optim": 256}, "reference": {"frozen": 0}}
    # checkpointing: the layer inputs (2 layers x 8 x 2 bytes a token) and one whole layer (34*8*2/2)
    assert plan.activations(cfg, m)["training"] == 128 * (2 * 8 * 2 + 272) + 7680


def test_lora_parameters_of_gpt2_attention():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ppo_lm.config import LoraConfig

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=20))
    lora = LoraConfig(enabled=True, r=4, target_modules=["c_attn"])
    assert plan.lora_parameters(model, lora) == 3 * 4 * (16 + 48)  # r x (in + out) for each c_attn
    # all-linear: c_attn 16->48, attn c_proj 16->16, c_fc 16->64, mlp c_proj 64->16 per block, not the output head
    per_block = 4 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))
    assert plan.lora_parameters(model, LoraConfig(enabled=True, r=4)) == 3 * per_block
    assert plan.lora_parameters(model, LoraConfig(enabled=True, r=4, last_layers=1)) == per_block


def test_plan_command(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = write_config(tmp_path, tiny_model_dir)
    done = ppo_lm("plan", cfg, "--gpus", "2", "--gpu-memory", "16", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert result["policy_params"] == sum(p.numel() for p in model.parameters())
    assert result["recommendation"] == "ddp" and set(result["estimates"]) == set(plan.STRATEGIES)
    small = ppo_lm("plan", cfg, "--gpu-memory", "0.5", cwd=tmp_path)
    assert small.returncode == 0 and "recommendation: nothing fits in 0.5 GiB" in small.stdout
    bad = ppo_lm("plan", cfg, "--gpus", "0", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == ("error: --gpus: needs --gpus >= 1 and --gpu-memory > 0 "
                                                          "(GiB per device)")
    missing = ppo_lm("plan", cfg, "model.name_or_path=./nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "model.name_or_path" in missing.stderr


def test_plan_counts_a_separate_critic_and_float32_reward_models(tiny_model_dir, tiny_reward_model_dir, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    cfg = tiny_config(tiny_model_dir, tmp_path, model={"critic": "policy", "dtype": "bfloat16"},
                      reward={"sources": [{"type": "model", "path": str(tiny_reward_model_dir)}]})
    assert set(plan.plan(cfg, gpus=1, gpu_memory_gib=8)["estimates"]["ddp"]["by_role_gib"]) == {
        "policy", "reference", "value", "reward.sources.0", "activations"}
    critic = plan.model_shape(str(tiny_model_dir), "trunk", "model.critic", cfg)
    reward = plan.model_shape(str(tiny_reward_model_dir), "classifier", "reward.sources.0.path", cfg)
    assert critic.params == sum(p.numel() for p in AutoModel.from_pretrained(tiny_model_dir).parameters())
    assert reward.params == sum(p.numel() for p in
                                AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir).parameters())
    parts = plan.roles(cfg, plan.model_shape(str(tiny_model_dir), "causal", "model.name_or_path", cfg), critic, [reward])
    assert parts["value"] == {"weights": 2 * critic.params, "grads": 2 * critic.params, "optim": 4 * critic.params}
    assert parts["reward.sources.0"] == {"frozen": 4 * reward.params}  # float32 whatever the policy's dtype
