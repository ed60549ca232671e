import importlib.util
import sys
from pathlib import Path

import pytest

from ppo_lm import toy
from ppo_lm.bench import model_flops, synthetic_prompts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peer_flops import peer_flops, trl_iteration_tflops  # noqa: E402  (the peer's FLOP model is lab code)


def test_model_flops_by_hand():
    tok = toy.word_tokenizer("a b c d e f g h i j".split())  # 13 tokens
    lm = toy.gpt2(tok, n_layer=1, n_embd=8, n_head=2, n_positions=16)
    # trunk parameters (embeddings excluded, head tied): c_attn 8*24+24, attn c_proj 8*8+8, c_fc 8*32+32,
    # mlp c_proj 32*8+8, two layer norms 2*16, final layer norm 16
    n = (8 * 24 + 24) + (8 * 8 + 8) + (8 * 32 + 32) + (32 * 8 + 8) + 2 * 16 + 16
    assert n == 888
    prompt, new, seq = 2, 3, 5
    fwd = (2 * n + 4 * 1 * seq * 8) * seq + 2 * 8 * 13 * new
    gen = sum(2 * n + 4 * 1 * (prompt + t) * 8 + 2 * 8 * 13 for t in range(new))
    flops = model_flops(lm, batch=2, prompt_len=prompt, new_tokens=new, epochs=1)
    # the reward model is taken to have the policy's trunk: one trunk pass per sequence
    trunk = (2 * n + 4 * 1 * seq * 8) * seq
    assert trunk == 9680
    # rollout: generation (which also yields the policy's logprobs and values) + the reference forward
    assert flops == {"train": 3 * fwd * 2 * 1, "rollout": 2 * (gen + fwd), "score": 2 * trunk}
    assert flops["train"] == 61824 and flops["rollout"] == 33088 and gen == 6240
    # a separate critic adds one trunk pass (no LM head) per sequence: (2n + 4 L S d) S = (1776 + 160) * 5 = 9680
    with_critic = model_flops(lm, batch=2, prompt_len=prompt, new_tokens=new, epochs=1, critic=True)
    assert with_critic == {"train": 3 * (fwd + trunk) * 2, "rollout": 2 * (gen + fwd + trunk), "score": 2 * trunk}
    assert with_critic["rollout"] == 52448
    # recomputing the old logprobs runs the policy over the full sequences once more
    again = model_flops(lm, batch=2, prompt_len=prompt, new_tokens=new, epochs=1, recompute_logprobs=True)
    assert again["rollout"] == 2 * (gen + 2 * fwd) == 53696
    # TRL's PPOTrainer: LM head on all 5 positions (2*8*13*5 = 1040), a value-model trunk in training; rollout =
    # generation + reference forward + value and reward trunks
    full = trunk + 1040
    trl = peer_flops(lm, batch=2, prompt_len=prompt, new_tokens=new, epochs=1)
    assert trl == {"train": 3 * (full + trunk) * 2, "rollout": 2 * (gen + full + 2 * trunk)}
    assert trl == {"train": 122400, "rollout": 72640}


def test_model_flops_by_hand_with_lora():
    from peft import LoraConfig, get_peft_model

    from ppo_lm.models import base_model

    tok = toy.word_tokenizer("a b c d e f g h i j".split())  # 13 tokens
    lm = get_peft_model(toy.gpt2(tok, n_layer=1, n_embd=8, n_head=2, n_positions=16),
                        LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    lm = base_model(lm)
    # adapters on c_attn (8 -> 24): A 2x8 + B 24x2 = 64 parameters; the 888 base trunk parameters and the tied
    # head are frozen. Per token the forward runs all 952, the backward the input gradients of all 952 and the
    # weight gradients of the 64; the frozen head only passes the gradient to its input.
    prompt, new, seq = 2, 3, 5
    weights, adapters, attention, head = 2 * 952 * seq, 2 * 64 * seq, 4 * 1 * seq * 8 * seq, 2 * 8 * 13 * new
    forward = weights + attention + head
    backward = weights + adapters + 2 * attention + head
    assert (forward, backward) == (10944, 12384)
    flops = model_flops(lm, batch=2, prompt_len=prompt, new_tokens=new, epochs=1)
    # generation runs the adapters (sum over t of 2*952 + 4*(2+t)*8 + 208); the reference and the reward model are
    # the base model: the 9680-FLOP trunk of the test above
    gen = 3 * (2 * 952 + 208) + 32 * (2 + 3 + 4)
    assert flops == {"train": 2 * (forward + backward), "rollout": 2 * (gen + 9680 + head), "score": 2 * 9680}
    assert flops == {"train": 46656, "rollout": 33856, "score": 19360}
    # TRL trains the whole model without adapters: the same count as without LoRA
    assert peer_flops(lm, batch=2, prompt_len=prompt, new_tokens=new, epochs=1) == {"train": 122400,
                                                                                   "rollout": 72640}


def test_trl_flops_from_a_saved_config_alone(tmp_path):
    """bench_compare counts TRL's work from the peer's saved policy config, built on the meta device."""
    tok = toy.word_tokenizer("a b c d e f g h i j".split())
    lm = toy.gpt2(tok, n_layer=1, n_embd=8, n_head=2, n_positions=64)
    toy.save_model(lm, tok, tmp_path / "policy")
    counted = sum(peer_flops(lm, batch=64, prompt_len=16, new_tokens=32, epochs=4).values()) / 1e12
    assert trl_iteration_tflops(tmp_path / "policy") == round(counted, 3)


def test_bench_prompts_match_the_peer_recipe():
    prompts = synthetic_prompts()
    assert len(prompts) == 256 and all(len(p.split()) == 16 for p in prompts)
    assert prompts == synthetic_prompts()  # fixed


def _load(path: Path, name: str):
    """A script that is not on the import path (ours in benchmarks/, or the peer's), as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_prompts_equal_the_peers_when_present():
    assert _load(_peer_dir() / "make_models.py", "peer_make_models").synthetic_prompts() == synthetic_prompts()


def test_learning_parity_statistics_by_hand():
    compare = _load(Path(__file__).resolve().parents[1] / "benchmarks" / "learning_parity.py", "learning_parity").compare
    s = compare([0.8, 0.9], [0.7, 0.8, 0.9])
    assert s["trl"] == {"n": 2, "mean": 0.85, "sd": round(0.1 / 2**0.5, 4)}
    assert s["ppo_lm"] == {"n": 3, "mean": 0.8, "sd": 0.1}
    assert s["difference"] == -0.05
    low, high = s["difference_95ci"]
    assert -0.2 <= low < -0.05 < high <= 0.1  # inside the extremes any resample can reach
    assert compare([0.5, 0.5], [0.6, 0.6])["difference_95ci"] == [0.1, 0.1]


def _peer_dir() -> Path:
    from conftest import ASSETS

    peer = ASSETS.parent / "peers" / "trl_ppo"
    if not (peer / "bench_trl_ppo.py").exists():
        pytest.skip("../shared/peers/trl_ppo is not present")
    return peer


def test_peer_script_edits_each_match_once():
    """bench_compare edits a copy of the peer's script for a Qwen2 size, bf16 and a GPU: every edit must find its
    text exactly once in the real script, and the edited script must still be Python."""
    compare = _load(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compare.py", "bench_compare")
    text = (_peer_dir() / "bench_trl_ppo.py").read_text()
    assert compare.peer_patches("tiny", bf16=False, gpu=False) == {}
    assert set(compare.peer_patches("small", bf16=True, gpu=False)) == {"bf16=False,"}
    patches = compare.peer_patches("qwen0.5b", bf16=False, gpu=True)
    assert set(patches) == {'choices=["tiny", "small"]', "bf16=False,", "use_cpu=True,", '"peak_rss_mib": '}
    for old, new in patches.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    compile(text, "bench_trl_ppo.py", "exec")
    assert 'choices=["tiny", "small", "qwen0.5b"]' in text and "use_cpu=False," in text and "bf16=True," in text


def test_peer_models_in_the_qwen2_architecture(tmp_path):
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    shape = dict(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_models.py"
    subprocess.run([sys.executable, str(script), str(tmp_path), "qwen-test", json.dumps(shape)], cwd=_peer_dir(),
                   check=True, capture_output=True)
    root = tmp_path / "qwen-test"
    policy = AutoModelForCausalLM.from_pretrained(root / "policy")
    assert type(policy).__name__ == "Qwen2ForCausalLM" and policy.config.num_key_value_heads == 1
    for name in ("value", "reward"):
        model = AutoModelForSequenceClassification.from_pretrained(root / name)
        assert type(model).__name__ == "Qwen2ForSequenceClassification" and model.config.num_labels == 1
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    assert policy.config.pad_token_id == tok.pad_token_id
    assert len(tok(synthetic_prompts()[0], add_special_tokens=False)["input_ids"]) == 16  # the peer's prompt length


@pytest.mark.slow
def test_bench_runs_end_to_end_in_the_qwen2_architecture():
    """``ppo-lm bench --size qwen-tiny``: the path the GPU shape (qwen0.5b) takes, at tiny's size, on the CPU."""
    from ppo_lm import bench

    out = bench.run("qwen-tiny", iterations=2)
    # by hand: embeddings 8192 x 256 (tied head); per layer q 256x256 + 256, k and v 256x128 + 128 each,
    # o 256x256, SwiGLU 3 x 256 x 688, two RMSNorms 2 x 256; a final RMSNorm 256
    layer = (65536 + 256) + 2 * (32768 + 128) + 65536 + 3 * 256 * 688 + 512
    trunk = 4 * layer + 256
    assert out["policy_params"] == 8192 * 256 + trunk == 5001472
    # training: 4 epochs x 64 sequences x 3 x (trunk over 48 tokens + attention + the LM head on 32 positions)
    train = 4 * 64 * 3 * (2 * trunk * 48 + 4 * 4 * 48 * 256 * 48 + 2 * 256 * 8192 * 32)
    assert out["train_tflops"] == round(train / 1e12, 3) == 0.324
    assert out["mixed_precision"] == "no" and out["iterations"] == 2 and len(out["iteration_s"]) == 2
    assert 0 < out["generate_s"] <= out["rollout_s"]
    # the phases lie inside the iteration (each figure is rounded to 0.1 ms)
    assert out["rollout_s"] + out["score_s"] + out["train_s"] <= out["seconds_per_iteration"] + 3e-4
    assert out["generated_tokens_per_s"] == pytest.approx(64 * 32 / out["generate_s"], rel=1e-3)
    assert 0 < out["train_mfu_vs_fp32_peak"] < 2 and out["peak_rss_mib"] > 0
    assert (out["prompts_per_iter"], out["responses_per_iter"], out["samples_per_prompt"]) == (64, 64, 1)


def test_bench_record_counts_prompts_and_responses_apart():
    """A critic-free estimator's 64 responses are 16 prompts x 4, as bench_trl_grpo.py records TRL's."""
    from ppo_lm.bench import record

    rows = [{"time_iteration_s": 2.0, "time_rollout_s": 1.0, "time_generate_s": 0.5, "time_score_s": 0.1,
             "time_train_s": 0.8, "reward_mean": 0.0}] * 3
    out = record({"samples_per_prompt": 4}, rows, {"train": 1e12, "rollout": 1e11}, {"fp32": 1e11, "bf16": 2e11},
                 "cpu", 100.0, None)
    assert (out["prompts_per_iter"], out["responses_per_iter"]) == (16, 64)
    assert out["tokens_per_s"] == 64 * 32 / 2.0


def test_cli_offers_every_bench_size_and_its_default_precision():
    from ppo_lm import bench, cli

    parser = cli.build_parser()
    for size in bench.SIZES:
        args = parser.parse_args(["bench", "--size", size])
        assert args.size == size and args.mixed_precision is None  # resolved by bench.default_mixed_precision
    assert [bench.default_mixed_precision(s) for s in bench.SIZES] == ["no", "no", "no", "bf16"]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--size", "huge"])


def test_bench_config_of_a_critic_free_estimator_matches_trl_grpo_settings(tmp_path):
    """`ppo-lm bench --estimator grpo` is the configuration of benchmarks/bench_trl_grpo.py: 16 prompts x 4, the KL
    as a k3 loss term of weight 0.05 and none in the reward, token-mean loss."""
    from ppo_lm.bench import bench_config

    cfg = bench_config(str(tmp_path), str(tmp_path / "run"), 3, lora=False, mixed_precision="no", estimator="grpo")
    assert (cfg.rollout.batch_size, cfg.samples_per_prompt) == (64, 4)
    assert (cfg.ppo.kl.coef, cfg.ppo.kl.loss_coef, cfg.ppo.kl.loss_estimator) == (0.0, 0.05, "k3")
    assert (cfg.ppo.epochs, cfg.ppo.num_minibatches, cfg.loss_aggregation) == (4, 4, "token_mean")
    assert bench_config(str(tmp_path), str(tmp_path / "run"), 3, lora=False, mixed_precision="no").ppo.kl.coef == 0.05
