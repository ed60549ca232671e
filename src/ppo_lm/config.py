"""Configuration: one tree of dataclasses, loaded from YAML (``yaml.safe_load`` semantics) plus dotted
command-line overrides, and validated field by field before anything heavy is loaded.

Every field has a type, a default and a one-line docstring (the ``#:`` comment above it), which the README's
config reference mirrors. Errors name the field, the file and the line: ``cfg.yaml:7: ppo.lr_rate: unknown key
(did you mean 'lr'?)``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError, closest_name

# --------------------------------------------------------------------------------------------- schema


RANGES = ("> 0", ">= 0", ">= 2", "[0, 1]", "(0, 1]", "[0, 1)")


def ranged(default, rule: str):
    """A config field whose value must satisfy ``rule`` (one of :data:`RANGES`); null passes. The rule sits on
    the field, so the checks and the generated config reference read it from one place."""
    assert rule in RANGES, rule
    return field(default=default, metadata={"range": rule})


def range_problem(value, rule: str) -> str | None:
    """What is wrong with ``value`` under ``rule``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    low, high = {"> 0": (0, None), ">= 0": (0, None), ">= 2": (2, None), "[0, 1]": (0, 1), "(0, 1]": (0, 1),
                 "[0, 1)": (0, 1)}[rule]
    if value < low or (high is not None and value > high) or (rule == "[0, 1)" and value >= 1):
        return f"must be {'in ' + rule if high is not None else rule}, got {value}"
    if value == 0 and rule in ("> 0", "(0, 1]"):
        return "must be > 0" if rule == "(0, 1]" else f"must be > 0, got {value}"
    return None


def check_ranges(obj, fail, prefix: str = "") -> None:
    """Every ranged field of a config dataclass (nested sections and lists of them included): ``fail(key,
    what)`` on the first value out of its range."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, fail, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_ranges(item, fail, f"{key}.{i}.")
        elif "range" in f.metadata and value is not None and not isinstance(value, bool):
            problem = range_problem(value, f.metadata["range"])
            if problem:
                fail(key, problem)


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


@dataclass
class ModelConfig:
    #: Policy: a local transformers folder or a hub name (any AutoModelForCausalLM). Required.
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
    #: Field holding the prompt text.
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
    #: Prompts sampled per PPO iteration (one response each).
    batch_size: int = ranged(64, "> 0")
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
    #: (false: record them while sampling, which saves that forward).
    recompute_logprobs: bool = False
    #: Score given to responses that end without EOS instead of their reward (null = keep their reward).
    missing_eos_penalty: float | None = None


@dataclass
class RewardSourceConfig:
    #: Kind: model | python | sentiment | exact_match | f1 | keyword | length | format.
    type: Literal["model", "python", "sentiment", "exact_match", "f1", "keyword", "length", "format"] = "sentiment"
    #: Weight of this source in the sum.
    weight: float = 1.0
    #: model: folder or hub name of an AutoModelForSequenceClassification reward model.
    path: str | None = None
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
    #: Per-token KL estimator: k1 (log p - log q) or k3 ((r - 1) - log r).
    estimator: Literal["k1", "k3"] = "k1"
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
    #: The KL to the reference model: penalty, adaptive controller, guard.
    kl: KLConfig = field(default_factory=KLConfig)
    #: Whiten advantages over the real tokens of the batch.
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
    #: Print this many sample completions every log_samples_every iterations (0 = never).
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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: Application (qa | text_generation | sentiment_analysis) whose metric `ppo-lm eval` adds; null = none. An
    #: unknown name gets a "did you mean" suggestion. `ppo-lm train` does not use it.
    task: str | None = None

    @property
    def minibatch_size(self) -> int:
        return self.rollout.batch_size // self.ppo.num_minibatches

    @property
    def microbatch_size(self) -> int:
        return self.minibatch_size // self.ppo.gradient_accumulation_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------- the other pipeline stages


@dataclass
class OptimConfig:
    #: Passes over the training split.
    epochs: int = ranged(1, "> 0")
    #: Examples per optimiser step (split into gradient_accumulation_steps micro-batches). In pairwise mode an
    #: example is a pair.
    batch_size: int = ranged(16, "> 0")
    #: Micro-batches accumulated per optimiser step.
    gradient_accumulation_steps: int = ranged(1, "> 0")
    #: Learning rate (AdamW).
    lr: float = ranged(5e-5, "> 0")
    #: Learning-rate schedule: constant, linear or cosine.
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    #: Linear warm-up steps.
    warmup_steps: int = ranged(0, ">= 0")
    #: AdamW weight decay.
    weight_decay: float = ranged(0.0, ">= 0")
    #: Clip the gradient norm to this value (null = no clipping).
    max_grad_norm: float | None = ranged(1.0, "> 0")


@dataclass
class StageRunConfig:
    #: Where metrics.jsonl and final/ are written.
    output_dir: str = "runs/stage"
    #: Random seed (also decides the held-out split).
    seed: int = 0
    #: Mixed precision through accelerate: no, bf16 or fp16.
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    #: Force the CPU even when a GPU is present.
    cpu: bool = False
    #: Show the rich progress display.
    progress: bool = True


@dataclass
class SFTDataConfig:
    #: Demonstrations: .jsonl/.json/.csv/.parquet, a datasets folder or a hub name. Required.
    path: str = ""
    #: Split to read when the source has splits.
    split: str = "train"
    #: Field holding the prompt.
    prompt_field: str = "prompt"
    #: Field holding the response to imitate (the loss is on these tokens only).
    response_field: str = "response"
    #: Prompt + response are cut to this many tokens (the prompt is shortened first, from the left).
    max_length: int = ranged(512, "> 0")
    #: Wrap prompts in the tokenizer's chat template: "auto" (when it has one), "on" or "off".
    chat_template: Literal["auto", "on", "off"] = "auto"
    #: Fraction of the records held out for evaluation.
    eval_fraction: float = ranged(0.1, "[0, 1)")


@dataclass
class SFTConfig:
    """``ppo-lm sft``: supervised fine-tuning on (prompt, response) records."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: StageRunConfig = field(default_factory=lambda: StageRunConfig(output_dir="runs/sft"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RMDataConfig:
    #: Preference or labelled data: .jsonl/.json/.csv/.parquet, a datasets folder or a hub name. Required.
    path: str = ""
    #: Split to read when the source has splits.
    split: str = "train"
    #: "pairwise": (prompt, chosen, rejected) with a Bradley-Terry loss; "pointwise": (text, label) classification.
    mode: Literal["pairwise", "pointwise"] = "pairwise"
    #: pairwise: field with the shared prompt ("" or missing = none; chosen/rejected are then full texts).
    prompt_field: str = "prompt"
    #: pairwise: field with the preferred completion.
    chosen_field: str = "chosen"
    #: pairwise: field with the other completion.
    rejected_field: str = "rejected"
    #: pointwise: field with the text.
    text_field: str = "text"
    #: pointwise: field with the integer label (0 .. num_labels-1).
    label_field: str = "label"
    #: pointwise: number of classes (2 gives a reward of logit[1] - logit[0]).
    num_labels: int = ranged(2, ">= 2")
    #: Texts are cut to this many tokens (from the left, so the end of a dialogue is kept).
    max_length: int = ranged(512, "> 0")
    #: pairwise: read (prompt, completion) as a user/assistant exchange in the tokenizer's chat template: "auto"
    #: (when it has one), "on" or "off". Saved with the model, so PPO scores completions the same way.
    chat_template: Literal["auto", "on", "off"] = "auto"
    #: Fraction of the records held out for evaluation (pairwise accuracy / accuracy).
    eval_fraction: float = ranged(0.1, "[0, 1)")


@dataclass
class RewardModelConfig:
    """``ppo-lm reward-model``: a reward model from preferences (Bradley-Terry) or labels."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: StageRunConfig = field(default_factory=lambda: StageRunConfig(output_dir="runs/reward-model"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ renamed keys

#: Keys that moved, per section: old key -> its new dotted place in the section. Old configs keep working, with
#: a deprecation warning naming the new key.
RENAMED: dict[str, dict[str, str]] = {
    "ppo": {"kl_coef": "kl.coef", "kl_estimator": "kl.estimator", "adaptive_kl": "kl.adaptive",
            "kl_target": "kl.target", "kl_horizon": "kl.horizon", "kl_limit": "kl.limit",
            "kl_limit_action": "kl.limit_action", "target_kl": "early_stop_kl"},
}


class ConfigDeprecationWarning(FutureWarning):
    """A config key that was renamed: it still works, under its new name."""


def migrate_renamed(raw: dict, source: str = "config", defaults: dict | None = None) -> dict:
    """Move the renamed keys of ``raw`` (a nested config dict) to their new places, in place, warning once per
    key. Giving a key under both names, with different values, is an error. ``defaults`` (the schema's defaults
    as a dict) tells a new key set by the user from one only filled in with its default."""
    import warnings

    for section, renamed in RENAMED.items():
        node = raw.get(section)
        if not isinstance(node, dict):
            continue
        lines = getattr(node, "lines", {})
        for old in [k for k in node if k in renamed]:
            new = renamed[old]
            *parents, last = new.split(".")
            target, default = node, (defaults or {}).get(section, {})
            for part in parents:
                if not isinstance(target.get(part), dict):
                    target[part] = _Located()
                    target[part].lines = {}
                target, default = target[part], default.get(part, {}) if isinstance(default, dict) else {}
            line = lines.get(old)
            if last in target and target[last] != node[old] and target[last] != default.get(last, object()):
                raise _error(f"{section}.{old}", f"is the old name of {section}.{new}, which is also set; keep only "
                                                 f"{section}.{new}", source, line)
            target[last] = node.pop(old)
            if isinstance(target, _Located):
                target.lines[last] = line if line is not None else COMMAND_LINE
            place = "command line" if line == COMMAND_LINE else f"{source}:{line}" if line else source
            warnings.warn(f"{place}: {section}.{old} is deprecated; use {section}.{new}", ConfigDeprecationWarning,
                          stacklevel=2)
    return raw


# ------------------------------------------------------------------------------------ YAML with lines


COMMAND_LINE = 0  # the "line" of a value that came from a key=value override


class _Located(dict):
    """A mapping that remembers the source line of each of its keys."""

    lines: dict[str, int]


def _compose(text: str, source: str) -> Any:
    """Parse YAML like ``yaml.safe_load`` but keep the line number of every mapping key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)  # where the broken construct began
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("(yaml)", f"not valid YAML: {problem}", source, line) from None
    if node is None:
        return _Located()
    constructor = yaml.SafeLoader("")

    def build(n: yaml.Node) -> Any:
        if isinstance(n, yaml.MappingNode):
            out = _Located()
            out.lines = {}
            for k, v in n.value:
                key = constructor.construct_object(k, deep=True)
                out[str(key)] = build(v)
                out.lines[str(key)] = k.start_mark.line + 1
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(v) for v in n.value]
        return constructor.construct_object(n, deep=True)

    return build(node)


# ----------------------------------------------------------------------------------------- overrides


def apply_override(raw: dict, item: str) -> None:
    """Apply one command-line override ``key.path=value`` (the value read as YAML) to a raw config dict in place."""
    if "=" not in item:
        raise ConfigError(item, "override must look like key=value (e.g. ppo.lr=1e-5)", "command line")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(part, node, ".".join(parts[: i + 1]))]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = _Located()
            node[part].lines = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, key)] = value
    else:
        node[last] = value
        if isinstance(node, _Located):
            node.lines[last] = COMMAND_LINE


def _index(part: str, seq: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(seq):
        raise ConfigError(key, f"no list item {part!r} (the list has {len(seq)} items)", "command line")
    return int(part)


# ----------------------------------------------------------------------------------- typed building


def _error(field: str, what: str, source: str, line: int | None) -> ConfigError:
    if line == COMMAND_LINE:
        return ConfigError(field, what, "command line")
    return ConfigError(field, what, source, line)


class _Builder:
    def __init__(self, source: str):
        self.source = source

    def where(self, lines: dict | None, key: str) -> int | None:
        return (lines or {}).get(key)

    def build(self, cls: type, raw: Any, prefix: str, line: int | None) -> Any:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise _error(prefix or "(top level)", f"expected a mapping, got {_describe(raw)}", self.source, line)
        lines = getattr(raw, "lines", None)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in raw.items():
            dotted = f"{prefix}.{key}" if prefix else key
            key_line = self.where(lines, key)
            if key not in names:
                close = closest_name(key, names)
                hint = f" (did you mean '{close}'?)" if close else f" (known keys: {', '.join(names)})"
                raise _error(dotted, f"unknown key{hint}", self.source, key_line)
            kwargs[key] = self.convert(hints[key], value, dotted, key_line)
        return cls(**kwargs)

    def convert(self, tp: Any, value: Any, dotted: str, line: int | None) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, dotted, line)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            errors = []
            for arg in (a for a in args if a is not type(None)):
                try:
                    return self.convert(arg, value, dotted, line)
                except ConfigError as e:
                    errors.append(e)
            if len(errors) == 1:
                raise errors[0]
            raise _error(dotted, f"expected {_type_name(tp)}, got {_describe(value)}", self.source, line)
        if origin is Literal:
            if isinstance(value, bool) and {"on", "off"} <= set(args):
                value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
            if value not in args:
                choices = ", ".join(str(a) for a in args)
                close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise _error(dotted, f"must be one of {choices}, got {value!r}{hint}", self.source, line)
            return value
        if origin is list:
            if not isinstance(value, list):
                raise _error(dotted, f"expected a list, got {_describe(value)}", self.source, line)
            return [self.convert(args[0], v, f"{dotted}.{i}", line) for i, v in enumerate(value)]
        if tp is dict or origin is dict:
            if not isinstance(value, dict):
                raise _error(dotted, f"expected a mapping, got {_describe(value)}", self.source, line)
            return dict(value)
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string; accept it as the number it is
                try:
                    return float(value)
                except ValueError:
                    pass
        elif tp is str:
            if isinstance(value, str):
                return value
        raise _error(dotted, f"expected {_type_name(tp)}, got {_describe(value)}", self.source, line)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "null"
    kind = {int: "an integer", float: "a number", str: "a string", list: "a list"}.get(type(value))
    if isinstance(value, dict):
        kind = "a mapping"
    return f"{value!r} ({kind})" if kind and not isinstance(value, (dict, list)) else (kind or type(value).__name__)


# ------------------------------------------------------------------------------------------ loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                check_paths: bool = True, schema: type = None):
    """Read a YAML config (or start from defaults when ``path`` is None), apply ``key=value`` overrides and
    validate everything. Raises :class:`ConfigError` naming the field, file and line."""
    source = str(path) if path is not None else "command line"
    raw: Any = _Located()
    raw.lines = {}
    if path is not None:
        raw = _read_yaml(path)
    schema = schema or Config
    defaults = dataclasses.asdict(schema())
    raw = _with_defaults(defaults, raw)
    for item in overrides:
        apply_override(raw, item)
    migrate_renamed(raw, source, defaults)
    cfg = _Builder(source).build(schema, raw, "", None)
    check = validate if schema is Config else validate_stage
    check(cfg, source=source, lines=_flatten_lines(raw), check_paths=check_paths)
    return cfg


def read_config(schema: type, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """``schema`` (a config dataclass) from the YAML file at ``path`` with ``key=value`` overrides applied: the same
    YAML rules and the same errors (field, file and line) for unknown keys and wrong types as every config, and no
    other checks (the caller validates what its schema means)."""
    raw = _read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    return _Builder(str(path)).build(schema, raw, "", None)


def _read_yaml(path: str | Path) -> _Located:
    """The mapping of sections in the YAML file at ``path``, each key with its line."""
    p, source = Path(path), str(path)
    if not p.is_file():
        raise ConfigError("config", f"no such file: {p}", str(p))
    raw = _compose(p.read_text(encoding="utf-8"), source)
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", f"expected a mapping of sections, got {_describe(raw)}", source, 1)
    return raw


def _with_defaults(defaults: Any, raw: Any) -> Any:
    """``raw`` with every section and field it leaves out filled from ``defaults`` (so overrides can reach into
    default lists such as ``reward.sources.0``). Lists in ``raw`` replace the default list whole."""
    if not isinstance(raw, dict) or not isinstance(defaults, dict):
        return raw
    out = _Located()
    out.lines = dict(getattr(raw, "lines", {}))
    for key, value in defaults.items():
        if key not in raw:
            out[key] = _located_copy(value)
    for key, value in raw.items():
        out[key] = _with_defaults(defaults[key], value) if key in defaults else value
    return out


def _located_copy(value: Any) -> Any:
    if isinstance(value, dict):
        out = _Located()
        out.lines = {}
        out.update({k: _located_copy(v) for k, v in value.items()})
        return out
    if isinstance(value, list):
        return [_located_copy(v) for v in value]
    return value


def config_from_dict(data: dict, *, check_paths: bool = False) -> Config:
    """Build and validate a :class:`Config` from a plain nested dict (library use)."""
    data = migrate_renamed(copy.deepcopy(data))
    cfg = _Builder("config").build(Config, data, "", None)
    validate(cfg, source="config", lines={}, check_paths=check_paths)
    return cfg


def _flatten_lines(raw: Any, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            dotted = f"{prefix}.{key}" if prefix else key
            if key in getattr(raw, "lines", {}):
                out[dotted] = raw.lines[key]
            out.update(_flatten_lines(value, dotted))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            out.update(_flatten_lines(value, f"{prefix}.{i}"))
    return out


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in {".jsonl", ".json", ".csv", ".parquet", ".txt"} \
        or name.count("/") > 1 or Path(name).exists()


def validate(cfg: Config, *, source: str = "config", lines: dict[str, int] | None = None,
             check_paths: bool = True) -> None:
    """Range and consistency checks. Raises :class:`ConfigError` on the first problem found."""
    lines = lines or {}

    def fail(key: str, what: str) -> None:
        raise _error(key, what, source, lines.get(key))

    if not cfg.model.name_or_path:
        fail("model.name_or_path", "is required (a transformers folder or a hub model name)")
    if cfg.task is not None:
        from . import tasks

        if cfg.task not in tasks.TASKS:
            fail("task", tasks.unknown(cfg.task))
    check_ranges(cfg, fail)
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
    if not cfg.reward.sources:
        fail("reward.sources", "needs at least one reward source")
    for i, src in enumerate(cfg.reward.sources):
        key = f"reward.sources.{i}"
        if not math.isfinite(src.weight):
            fail(f"{key}.weight", f"must be a finite number, got {src.weight}")
        if src.type == "model" and not src.path:
            fail(f"{key}.path", "a 'model' reward needs path: a sequence-classification model folder or hub name")
        if src.type == "python" and (not src.function or ":" not in src.function):
            fail(f"{key}.function", "a 'python' reward needs function: 'module:function'")
        if src.type == "keyword" and not src.words:
            fail(f"{key}.words", "a 'keyword' reward needs a non-empty list of words")
        if src.type == "format" and not src.pattern:
            fail(f"{key}.pattern", "a 'format' reward needs pattern: a regular expression")
        if src.type == "format" and src.pattern:
            import re
            try:
                re.compile(src.pattern)
            except re.error as e:
                fail(f"{key}.pattern", f"not a valid regular expression: {e}")
        if src.type == "length" and range_problem(src.target, "> 0"):
            fail(f"{key}.target", range_problem(src.target, "> 0"))
    if not check_paths:
        return
    checks = [("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer),
              ("model.critic", None if cfg.model.critic == "policy" else cfg.model.critic), ("data.path", cfg.data.path)]
    checks += [(f"reward.sources.{i}.path", s.path) for i, s in enumerate(cfg.reward.sources) if s.type == "model"]
    for key, value in checks:
        if value and _looks_local(value) and not Path(value).expanduser().exists():
            fail(key, f"no such file or directory: {value}")
    if not cfg.data.path:
        fail("data.path", "is required (a .jsonl/.csv/.parquet file, a datasets folder or a hub dataset name)")


def validate_stage(cfg, *, source: str = "config", lines: dict[str, int] | None = None,
                   check_paths: bool = True) -> None:
    """Checks for the SFT and reward-model configs."""
    lines = lines or {}

    def fail(key: str, what: str) -> None:
        raise _error(key, what, source, lines.get(key))

    if not cfg.model.name_or_path:
        fail("model.name_or_path", "is required (a transformers folder or a hub model name)")
    check_ranges(cfg, fail)
    o = cfg.optim
    if o.batch_size % o.gradient_accumulation_steps:
        fail("optim.gradient_accumulation_steps", f"optim.batch_size ({o.batch_size}) must be divisible by it")
    if not cfg.data.path:
        fail("data.path", "is required (a .jsonl/.csv/.parquet file, a datasets folder or a hub dataset name)")
    if check_paths:
        for key, value in [("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer),
                           ("data.path", cfg.data.path)]:
            if value and _looks_local(value) and not Path(value).expanduser().exists():
                fail(key, f"no such file or directory: {value}")
