"""``ppo-lm bench``: time PPO iterations on the fixed configuration that ``../shared/peers/trl_ppo`` runs for
TRL's PPOTrainer, so the two can be compared side by side.

Configuration: a random-init policy ("tiny": a GPT-2 of 4 layers, 256 hidden, vocab 8192; "small": the GPT-2 124M
shape; "qwen-tiny" and "qwen0.5b": the Qwen2 architecture, see ``QWEN_SHAPES``) with the value head on its trunk;
reward = a random-init sequence classifier (1 label) of the same shape, as the peer; 64 prompts of 16 words per
iteration from 256 fixed synthetic prompts; 32 new tokens, never stopping at EOS; 4 epochs x 4 minibatches; lr 1e-5,
kl_coef 0.05 (k1), gamma 1, lambda 0.95, clip 0.2/0.2, vf_coef 0.1; fp32 weights (with bf16 autocast by default
for "qwen0.5b"). The models are built in a child process so that their construction does not count in peak RSS.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

# Same word list and prompt recipe as the peer scaffolding, so both see identical prompts.
WORDS = (
    "the a an of to in and or for with on at by from about into over under after before "
    "cat dog bird fish horse robot model agent student teacher doctor farmer pilot river "
    "mountain city village forest ocean desert garden kitchen library market station "
    "runs jumps writes reads builds paints sings thinks walks swims flies cooks learns "
    "red blue green small large quick slow happy sad bright dark quiet loud old new "
    "today tomorrow yesterday morning evening night always never often sometimes "
    "story poem question answer reason plan idea problem solution number letter word"
).split()

SHAPES = {
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=128),
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
}
# The Qwen2 architecture (the Llama family: grouped-query attention, a SwiGLU MLP, RMSNorm, rotary positions; tied
# embeddings). "qwen-tiny" is tiny's size in it (the SwiGLU width 688 gives the MLP tiny's parameter count,
# 3 x 256 x 688 ~ 8 x 256^2), so that CPU runs compare the two architectures and check the path that "qwen0.5b"
# (Qwen2.5-0.5B's shape, for a GPU) takes.
QWEN_SHAPES = {
    "qwen-tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True),
    "qwen0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=1024,
                     tie_word_embeddings=True),
}
SIZES = [*SHAPES, *QWEN_SHAPES]


def default_mixed_precision(size: str) -> str:
    """bf16 autocast for the GPU shape (as TRL's ``bf16=True``), fp32 for the others."""
    return "bf16" if size == "qwen0.5b" else "no"


def synthetic_prompts(n: int = 256, words_per_prompt: int = 16, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_prompt)) for _ in range(n)]


def build_models(root: str, size: str) -> None:
    """Policy and reward model folders for ``size`` (run in a child process)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from . import toy

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = toy.word_tokenizer(WORDS)
    ids = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if size in QWEN_SHAPES:
        from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

        shape = QWEN_SHAPES[size]
        torch.manual_seed(1)
        policy = Qwen2ForCausalLM(Qwen2Config(**shape, **ids))
        policy.generation_config.pad_token_id = tok.pad_token_id
        toy.save_model(policy, tok, Path(root) / "policy")
        torch.manual_seed(3)
        toy.save_model(Qwen2ForSequenceClassification(Qwen2Config(**shape, num_labels=1, **ids)), tok,
                       Path(root) / "reward")
        return
    shape = dict(SHAPES[size])
    policy = toy.gpt2(tok, seed=1, **shape)
    toy.save_model(policy, tok, Path(root) / "policy")
    config = GPT2Config(num_labels=1, **ids, **shape)
    torch.manual_seed(3)
    toy.save_model(GPT2ForSequenceClassification(config), tok, Path(root) / "reward")


def bench_config(root: str, out_dir: str, iterations: int, *, lora: bool, mixed_precision: str,
                 critic: bool = False, gradient_checkpointing: bool = False, recompute_logprobs: bool = False,
                 estimator: str = "gae", engine: str = "hf"):
    """The benchmark's config (``engine``: rollout.engine). A critic-free ``estimator`` samples 4 responses for each of 16 prompts and, like
    TRL's GRPOTrainer with ``beta`` 0.05 (benchmarks/bench_trl_grpo.py), has the KL as a k3 loss term of weight
    0.05 instead of the penalty in the reward."""
    from .config import config_from_dict

    critic_free = {} if estimator == "gae" else {
        "advantage_estimator": estimator, "kl": {"coef": 0.0, "loss_coef": 0.05, "loss_estimator": "k3"}}
    return config_from_dict({
        "model": {"name_or_path": f"{root}/policy", "lora": {"enabled": lora}, "dtype": "float32",
                  "critic": "policy" if critic else None, "gradient_checkpointing": gradient_checkpointing},
        "rollout": {"batch_size": 64, "max_new_tokens": 32, "stop_at_eos": False, "temperature": 1.0, "top_k": 0,
                    "top_p": 1.0, "recompute_logprobs": recompute_logprobs, "engine": engine},
        "reward": {"sources": [{"type": "model", "path": f"{root}/reward"}]},
        "ppo": {"epochs": 4, "num_minibatches": 4, "lr": 1e-5, "kl": {"coef": 0.05, "estimator": "k1"}, "gamma": 1.0,
                "gae_lambda": 0.95, "clip_range": 0.2, "clip_range_value": 0.2, "vf_coef": 0.1,
                "max_grad_norm": 1.0, **critic_free},
        "train": {"output_dir": out_dir, "iterations": iterations, "seed": 42, "progress": False, "log_samples": 0,
                  "save_final": False, "mixed_precision": mixed_precision},
    })


def matmul_peak_flops(dtype: torch.dtype, device: str = "cpu", seconds: float = 1.0, n: int = 2048) -> float:
    """Achieved FLOP/s of a square matmul in ``dtype``: the machine's practical peak for that dtype. The size
    grows from 256 towards ``n`` while one matmul of the next size would take at most ``seconds / 2``: where a
    dtype has no fast kernel (bf16 without AVX512 takes about 13 s for one 2048 matmul), the measurement still
    takes about ``seconds``."""
    size, took = 256, 0.0
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        a @ b  # untimed: kernel selection, a GPU's library start-up and the pending randn
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        if size * 2 > n or took * 8 > seconds / 2:
            break
        size *= 2
    n = size
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):  # best of five short trials: a busy neighbour lowers some of them
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            a @ b
            reps += 1
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best


def shape_flops(lm, prompt_len: int, new_tokens: int) -> dict:
    """Matmul FLOPs of the pieces one sequence goes through (2 FLOPs per multiply-add):

    * ``trunk``: a forward of the whole sequence through the transformer: 2 N per token (N = parameters outside
      the embeddings) + 4 L S d for the attention scores and their weighted sum over a context of S tokens;
      ``weights`` and ``attention`` are its two terms;
    * ``trained``: the part of ``weights`` whose weights get gradients (all of it, or the LoRA adapters' part when
      the base weights are frozen), and ``adapters`` the adapters' part (0 without LoRA);
    * ``head``: the LM head on one position, 2 d V (``head_trained``: whether its weight gets a gradient);
    * ``generate``: sampling the response one token at a time with a KV cache (the context grows).
    """
    cfg = lm.config
    d = cfg.hidden_size
    layers = cfg.num_hidden_layers
    head = lm.get_output_embeddings().weight
    embeddings = {id(m.weight) for m in lm.modules() if isinstance(m, torch.nn.Embedding)} | {id(head)}
    trunk = [p for p in lm.parameters() if id(p) not in embeddings]
    n_trunk = sum(p.numel() for p in trunk)
    n_trained = sum(p.numel() for p in trunk if p.requires_grad)
    # Under LoRA the base weights are frozen and what trains is the adapters; with full fine-tuning every trunk
    # weight trains and there are no adapters.
    n_adapters = n_trained if n_trained < n_trunk else 0
    seq = prompt_len + new_tokens
    weights, attention = 2 * n_trunk * seq, 4 * layers * seq * d * seq
    return {"trunk": weights + attention, "weights": weights, "attention": attention,
            "trained": 2 * n_trained * seq, "adapters": 2 * n_adapters * seq,
            "head": 2 * d * head.shape[0], "head_trained": head.requires_grad,
            "generate": sum(2 * n_trunk + 4 * layers * (prompt_len + t) * d + 2 * d * head.shape[0]
                            for t in range(new_tokens)),
            "seq": seq}


def model_flops(lm, *, batch: int, prompt_len: int, new_tokens: int, epochs: int, critic: bool = False,
                recompute_logprobs: bool = False) -> dict:
    """Matmul FLOPs of one ppo-lm PPO iteration, counted from the shapes:

    * the LM head runs only on the response positions (the prompt's logits are never computed);
    * training: ``epochs`` x (forward + backward) over every sequence. The backward of a weight matmul is one
      forward's worth for the input's gradient plus one for the weight's, the latter only where the weight trains
      (so with full fine-tuning backward = 2 x forward; with LoRA the frozen base weights cost one forward's worth);
      the attention matmuls have two inputs that need gradients (2 x);
    * rollout: generation (which also yields the old logprobs and the value head's inputs) plus the reference
      forward over the full sequences (without the LoRA adapters: the reference is the base model);
    * score: the reward model, taken to have the policy's trunk without adapters (as in the benchmark);
    * ``critic``: a separate critic trunk of the same shape, fully trained, adds one trunk pass per sequence to the
      rollout and ``epochs`` x (forward + backward) to training;
    * ``recompute_logprobs``: the policy runs over the full sequences once more in the rollout.
    """
    f = shape_flops(lm, prompt_len, new_tokens)
    head = f["head"] * new_tokens
    forward = f["trunk"] + head
    backward = f["weights"] + f["trained"] + 2 * f["attention"] + head * (1 + f["head_trained"])
    base_trunk = f["trunk"] - f["adapters"]
    critic_trunk = base_trunk if critic else 0
    return {"train": (forward + backward + 3 * critic_trunk) * batch * epochs,
            "rollout": batch * (f["generate"] + base_trunk + head + recompute_logprobs * forward + critic_trunk),
            "score": batch * base_trunk}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(size: str = "tiny", iterations: int = 4, *, lora: bool = False, mixed_precision: str | None = None,
        critic: bool = False, gradient_checkpointing: bool = False, recompute_logprobs: bool = False,
        estimator: str = "gae", engine: str = "hf") -> dict:
    """Time ``iterations`` PPO iterations of the benchmark configuration; print and return the JSON record.
    ``mixed_precision`` None: :func:`default_mixed_precision`."""
    from .models import base_model
    from .trainer import train

    iterations = max(2, iterations)
    mixed_precision = mixed_precision or default_mixed_precision(size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16))
    n = 2048 if device == "cpu" else 8192  # a GPU needs the larger product to reach its peak
    peaks = {name: matmul_peak_flops(dtype, device, n=n) for name, dtype in dtypes}
    if device == "cuda":  # the peak GPU memory is the run's, not the matmuls' above
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix=f"ppo-lm-bench-{size}-") as tmp:
        build_models_apart(tmp, size)
        cfg = bench_config(tmp, os.path.join(tmp, "run"), iterations, lora=lora, mixed_precision=mixed_precision,
                           critic=critic, gradient_checkpointing=gradient_checkpointing,
                           recompute_logprobs=recompute_logprobs, estimator=estimator, engine=engine)
        records = [{"prompt": p} for p in synthetic_prompts()]
        result = train(cfg, records=records)
        peak_rss = peak_rss_mib()  # before anything else allocates
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        n_params = sum(p.numel() for p in result.policy.lm.parameters())
        base = base_model(result.policy.lm)
        flops = model_flops(base, batch=64, prompt_len=16, new_tokens=32, epochs=4, critic=critic,
                            recompute_logprobs=recompute_logprobs or engine != "hf")
    # On a shared machine a slow spell during the first measurement would overstate the efficiency (even past
    # 100%): measure again after the run and keep the better of the two.
    peaks = {name: max(peaks[name], matmul_peak_flops(dtype, device, n=n)) for name, dtype in dtypes}
    settings = {"size": size, "estimator": estimator, "engine": engine, "lora": lora,
                "mixed_precision": mixed_precision, "critic": critic,
                "gradient_checkpointing": gradient_checkpointing, "recompute_logprobs": recompute_logprobs,
                "samples_per_prompt": cfg.samples_per_prompt, "policy_params": n_params, "iterations": iterations}
    out = record(settings, result.metrics, flops, peaks, device, peak_rss, peak_gpu)
    print(json.dumps(out), flush=True)
    return out


def build_models_apart(tmp: str, size: str) -> None:
    """:func:`build_models` in a spawned process, so that building leaves no memory in the measured one."""
    proc = multiprocessing.get_context("spawn").Process(target=build_models, args=(tmp, size))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"building the {size} benchmark models failed (exit code {proc.exitcode})")


def record(settings: dict, metrics: list[dict], flops: dict, peaks: dict, device: str, peak_rss: float,
           peak_gpu: float | None) -> dict:
    """The benchmark's JSON record: the settings, median times of the iterations after the first (warm-up),
    throughputs, FLOP rates against the measured matmul peaks, memory and the machine."""
    rows = metrics[1:]
    med = lambda key: round(statistics.median(r[key] for r in rows), 4)  # noqa: E731
    tokens = 64 * 32
    return {
        "tool": "ppo-lm", **settings, "prompts_per_iter": 64 // settings["samples_per_prompt"],
        "responses_per_iter": 64, "new_tokens": 32, "ppo_epochs": 4, "minibatches": 4,
        "seconds_per_iteration": med("time_iteration_s"), "rollout_s": med("time_rollout_s"),
        "generate_s": med("time_generate_s"), "score_s": med("time_score_s"), "train_s": med("time_train_s"),
        "tokens_per_s": round(tokens / med("time_iteration_s"), 1),
        "rollout_tokens_per_s": round(tokens / med("time_rollout_s"), 1),
        "generated_tokens_per_s": round(tokens / med("time_generate_s"), 1),
        "peak_rss_mib": round(peak_rss, 1),
        "train_tflops": round(flops["train"] / 1e12, 3),
        "train_gflops_per_s": round(flops["train"] / med("time_train_s") / 1e9, 1),
        "matmul_peak_fp32_gflops_per_s": round(peaks["fp32"] / 1e9, 1),
        "matmul_peak_bf16_gflops_per_s": round(peaks["bf16"] / 1e9, 1),
        "train_mfu_vs_fp32_peak": round(flops["train"] / med("time_train_s") / peaks["fp32"], 3),
        "train_mfu_vs_bf16_peak": round(flops["train"] / med("time_train_s") / peaks["bf16"], 3),
        "rollout_gflops_per_s": round(flops["rollout"] / med("time_rollout_s") / 1e9, 1),
        "iteration_tflops": round(sum(flops.values()) / 1e12, 3),
        "warmup_iteration_s": round(metrics[0]["time_iteration_s"], 3),
        "iteration_s": [round(r["time_iteration_s"], 3) for r in metrics],
        "reward_mean": [round(r["reward_mean"], 4) for r in metrics],
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "peak_gpu_mib": peak_gpu and round(peak_gpu, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
