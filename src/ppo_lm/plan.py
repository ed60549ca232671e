"""``ppo-lm plan``: the memory a PPO config needs per device, from the models' configs alone (no weights read).

Each role is counted from its parameter count (the model built on the ``meta`` device) and the config:

- **policy**: weights; with LoRA, gradients and AdamW's two moments for the adapters only, otherwise for all
  weights (torch keeps AdamW's moments in the weights' dtype);
- **reference**: a frozen copy of the policy's weights, or nothing with LoRA (the adapters are switched off);
- **value**: a head on the policy (negligible), or a separate critic, trained like the policy;
- **reward**: each reward model's weights, frozen, in float32 (as the reward source loads them);
- **activations** of one training micro-batch: per token and layer about ``34 h`` bytes in 16-bit (Korthikanti
  et al. 2022, without the attention-score term, which SDPA kernels do not keep), twice that in float32; with
  gradient checkpointing the layer inputs only, plus one layer; the response logits in float32 (x3: logits,
  log-softmax and its gradient);
- **generation**: the KV cache of one generation batch over prompt + response.

Strategies over ``gpus`` devices, as ppo-lm runs them (examples/accelerate/): ``ddp`` (all replicated, plus DDP's
gradient buckets), ``zero2`` (DeepSpeed: gradients and optimiser states sharded), ``zero3`` (the trainable
weights too; the reference and reward models stay whole on every device, and the policy's weights are gathered
whole for each rollout, so generation's working set includes them), ``fsdp2`` (torch's ``fully_shard``: sharded
as ZeRO-3 and gathered the same way), ``zero3-offload`` (optimiser states and
weights in CPU memory, gathered onto the device for the rollout). A device also holds its runtime
(``overhead_gib``: about 1 GiB for a CUDA context).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config

GIB = 2 ** 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp2", "zero3-offload")


@dataclass
class Shape:
    """What the estimate needs to know of one model, read from its config."""

    params: int
    layers: int
    hidden: int
    vocab: int
    kv_width: int  #: key/value heads x head dim
    lora_params: int = 0  #: adapter parameters for the configured LoRA targets


def model_shape(path: str, kind: str, field: str, cfg: Config) -> Shape:
    """Count a model's parameters by building it on the ``meta`` device (no memory, no weights read)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .models import load_config_checked

    config = load_config_checked(path, kind="classifier" if kind == "classifier" else "causal", field=field,
                                 trust_remote_code=cfg.model.trust_remote_code)
    auto = {"causal": AutoModelForCausalLM, "classifier": AutoModelForSequenceClassification, "trunk": AutoModel}
    with torch.device("meta"):
        model = auto[kind].from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    get = lambda *names, default=None: next((getattr(text, n) for n in names if getattr(text, n, None)), default)  # noqa: E731
    hidden, heads = get("hidden_size", "n_embd", "d_model"), get("num_attention_heads", "n_head", default=1)
    kv_heads = get("num_key_value_heads", default=heads)
    head_dim = get("head_dim", default=hidden // heads)
    return Shape(params=sum(p.numel() for p in model.parameters()), layers=get("num_hidden_layers", "n_layer"),
                 hidden=hidden, vocab=get("vocab_size"), kv_width=kv_heads * head_dim,
                 lora_params=lora_parameters(model, cfg.model.lora) if kind == "causal" and cfg.model.lora.enabled
                 else 0)  # LoRA goes on the policy only (not on a critic or a reward model)


def lora_parameters(model, lora) -> int:
    """``r x (in + out)`` for every module LoRA adapts: the linear modules that ``lora.target_modules`` names
    ("all-linear": all but the output head; peft's default targets for the model type when none are set), in the
    last ``lora.last_layers`` blocks where that is set."""
    from .models import last_layers_linears, lora_targets

    targets = lora.target_modules
    if not targets:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        targets = DEFAULTS.get(model.config.model_type, [])
    names = last_layers_linears(model, lora.last_layers, targets) if lora.last_layers else lora_targets(model, targets)
    modules = dict(model.named_modules())
    return sum(lora.r * sum(modules[n].weight.shape) for n in names)


def roles(cfg: Config, policy: Shape, critic: Shape | None, rewards: list[Shape]) -> dict[str, dict[str, float]]:
    """Bytes per role, split into what each strategy shards: ``weights`` (trainable or frozen), ``grads``,
    ``optim``; ``frozen`` marks weights that are never trained."""
    b = BYTES[cfg.model.dtype]
    trainable = policy.lora_params or policy.params
    out = {"policy": {"weights": (policy.params + policy.lora_params) * b, "grads": trainable * b,
                      "optim": 2 * trainable * b},
           "reference": {"frozen": 0 if cfg.model.lora.enabled else policy.params * b}}
    if critic is not None:
        out["value"] = {"weights": critic.params * b, "grads": critic.params * b, "optim": 2 * critic.params * b}
    for i, r in enumerate(rewards):  # reward models are loaded in float32, whatever the policy's dtype
        out[f"reward.sources.{i}"] = {"frozen": r.params * 4}
    return out


def activations(cfg: Config, m: Shape, prompt_tokens: int | None = None) -> dict[str, float]:
    """Bytes of one training micro-batch's activations and of one generation batch's KV cache, for prompts of
    ``prompt_tokens`` (default ``data.max_prompt_tokens``, the longest a prompt can be) and full responses."""
    act_bytes = 2 if cfg.train.mixed_precision in ("bf16", "fp16") else BYTES[cfg.model.dtype]
    seq = (prompt_tokens or cfg.data.max_prompt_tokens) + cfg.rollout.max_new_tokens
    tokens = cfg.microbatch_size * seq
    per_layer = 34 * m.hidden * act_bytes / 2  # bytes per token and layer
    if cfg.model.gradient_checkpointing:
        train = tokens * (m.layers * m.hidden * act_bytes + per_layer)
    else:
        train = tokens * m.layers * per_layer
    logits = 3 * cfg.microbatch_size * cfg.rollout.max_new_tokens * m.vocab * 4
    gen_batch = cfg.rollout.generation_batch_size or cfg.rollout.batch_size
    kv = gen_batch * seq * m.layers * 2 * m.kv_width * BYTES[cfg.model.dtype]
    return {"training": train + logits, "generation": kv + gen_batch * m.vocab * 4}


def per_device(parts: dict[str, dict[str, float]], acts: dict[str, float], strategy: str, gpus: int) -> dict:
    """Bytes on each device under ``strategy``: the roles' sharded and replicated parts, and the larger of the
    training and generation working sets (they do not live at once). Under ZeRO-3 and FSDP2 the rollout gathers
    the trainable models' weights whole: the part of them a device does not hold counts in generation's set."""
    shard = {"ddp": set(), "zero2": {"grads", "optim"}, "zero3": {"grads", "optim", "weights"},
             "fsdp2": {"grads", "optim", "weights"}, "zero3-offload": {"grads", "weights"}}[strategy]
    offloaded = {"optim", "weights"} if strategy == "zero3-offload" else set()
    out, gathered = {}, 0.0
    for role, kinds in parts.items():
        out[role] = sum(0.0 if k in offloaded else v / gpus if k in shard else v for k, v in kinds.items())
        if strategy == "ddp" and gpus > 1:  # DDP's gradient buckets: a second copy of the gradients
            out[role] += kinds.get("grads", 0.0)
        if "weights" in shard:
            weights = kinds.get("weights", 0.0)
            gathered += weights - (0.0 if "weights" in offloaded else weights / gpus)
    out["activations"] = max(acts["training"], acts["generation"] + gathered)
    return out


def plan(cfg: Config, gpus: int, gpu_memory_gib: float, overhead_gib: float = 1.0,
         prompt_tokens: int | None = None) -> dict:
    """Every strategy's estimate per device (GiB, by role) and the recommendation: the least sharded strategy
    that fits in 90% of ``gpu_memory_gib``, or what to change when none does.
    ``prompt_tokens``: see :func:`activations`."""
    from .trainer import models_of

    found = models_of(cfg)
    policy = model_shape(*found[0], cfg)
    critic = None
    if cfg.model.critic:
        path = cfg.model.name_or_path if cfg.model.critic == "policy" else cfg.model.critic
        critic = model_shape(path, "trunk", "model.critic", cfg)
    rewards = [model_shape(path, kind, field, cfg) for path, kind, field in found if kind == "classifier"]
    parts, acts = roles(cfg, policy, critic, rewards), activations(cfg, policy, prompt_tokens)
    budget = 0.9 * gpu_memory_gib
    estimates = {}
    for strategy in STRATEGIES:
        by_role = {k: round(v / GIB, 3) for k, v in per_device(parts, acts, strategy, gpus).items()}
        total = round(sum(by_role.values()) + overhead_gib, 3)
        estimates[strategy] = {"total_gib": total, "fits": total <= budget, "by_role_gib": by_role}
    pick = next((s for s in STRATEGIES if estimates[s]["fits"]), None)
    if pick is not None:
        advice = (f"{pick}: {estimates[pick]['total_gib']:.1f} GiB of {gpu_memory_gib:g} GiB per device "
                  f"(launch with examples/accelerate/{pick}.yaml)")
    else:
        hints = [h for h, on in (("model.lora.enabled: true", not cfg.model.lora.enabled),
                                 ("model.gradient_checkpointing: true", not cfg.model.gradient_checkpointing),
                                 ("a larger ppo.gradient_accumulation_steps (smaller micro-batches)", True)) if on]
        advice = f"nothing fits in {gpu_memory_gib:g} GiB per device; try " + ", ".join(hints)
    return {"model": cfg.model.name_or_path, "policy_params": policy.params, "lora_params": policy.lora_params,
            "gpus": gpus, "gpu_memory_gib": gpu_memory_gib, "overhead_gib": overhead_gib,
            "prompt_tokens": prompt_tokens or cfg.data.max_prompt_tokens,
            "activations_gib": {k: round(v / GIB, 3) for k, v in acts.items()},
            "estimates": estimates, "recommendation": pick, "advice": advice}


def table(result: dict) -> str:
    """The estimates as a plain-text table, one row a strategy, one column a role."""
    roles_ = list(next(iter(result["estimates"].values()))["by_role_gib"])
    head = ["strategy", *roles_, "total GiB", "fits"]
    rows = [[s, *(f"{e['by_role_gib'][r]:.2f}" for r in roles_), f"{e['total_gib']:.2f}",
             "yes" if e["fits"] else "no"] for s, e in result["estimates"].items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), *map(line, rows)])
