"""The PPO loop for language models, readable top to bottom like the algorithm.

One iteration:

1. **collect** — sample a response per prompt with the current policy; keep old logprobs, values and
   reference logprobs of the sampled tokens (``rollout.collect``).
2. **score** — the reward sources score each completion; per-token reward = ``-kl_coef * KL`` on every
   token plus the score at the last real token.
3. **advantages** — GAE over the response tokens, then whitening.
4. **update** — ``ppo.epochs`` passes of shuffled minibatches: clipped surrogate + clipped value loss,
   gradient accumulation and clipping, learning-rate schedule.
5. **log** — one JSON line of metrics per iteration, trackers, progress display.

All device placement, mixed precision and gradient accumulation go through ``accelerate``, so
``accelerate launch`` (DDP, DeepSpeed, FSDP) runs the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from . import algo
from .config import Config
from .data import PromptDataset, PromptSampler, build_prompt_dataset, load_records
from . import checkpoint as ckpt
from .errors import RewardError, TrainingDiverged, UserError
from .evaluate import distinct_n
from .models import (PolicyWithValue, load_config_checked, load_policy, load_tokenizer, make_reference, parameter_groups,
                     save_policy, trainable_parameters)
from .rewards import RunningMoments, WeightedSum, build_reward
from .rollout import collect
from .tracking import MetricsLog, PhaseTimer, plot_metrics, read_metrics
from .types import Rollout, ScoredRollout


@dataclass
class TrainState:
    """Everything that changes from one iteration to the next (besides model and optimiser)."""

    iteration: int
    sampler: PromptSampler
    kl_controller: algo.FixedKLController
    reward_stats: RunningMoments = field(default_factory=RunningMoments)
    samples_seen: int = 0
    nonfinite_skips: int = 0  # updates skipped because a loss or gradient was NaN/inf, in total
    nonfinite_streak: int = 0  # ... in a row, up to now
    first_nonfinite: str | None = None  # which quantity went non-finite first in the current streak

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "sampler": self.sampler.state_dict(),
                "kl_controller": self.kl_controller.state_dict(), "reward_stats": self.reward_stats.state_dict(),
                "samples_seen": self.samples_seen, "nonfinite_skips": self.nonfinite_skips,
                "nonfinite_streak": self.nonfinite_streak, "first_nonfinite": self.first_nonfinite}

    def load_state_dict(self, d: dict) -> None:
        self.iteration, self.samples_seen = d["iteration"], d["samples_seen"]
        self.sampler.load_state_dict(d["sampler"])
        self.kl_controller.load_state_dict(d["kl_controller"])
        self.reward_stats.load_state_dict(d["reward_stats"])
        self.nonfinite_skips, self.nonfinite_streak = d["nonfinite_skips"], d["nonfinite_streak"]
        self.first_nonfinite = d["first_nonfinite"]


@dataclass
class TrainResult:
    policy: PolicyWithValue
    tokenizer: object
    metrics: list[dict]
    output_dir: Path
    interrupted: bool = False  #: stopped early by SIGINT/SIGTERM (a checkpoint was written)
    checkpoint: Path | None = None  #: the newest checkpoint written or resumed from


# ------------------------------------------------------------------------------------------ step 2+3


def score(rollout: Rollout, reward_fn: WeightedSum, state: TrainState, cfg: Config) -> ScoredRollout:
    """Steps 2 and 3: sequence scores -> per-token KL-penalised rewards -> GAE advantages and returns."""
    raw = reward_fn(rollout.prompts, rollout.completions, rollout.fields).to(rollout.values.device)
    scores = raw
    if cfg.rollout.missing_eos_penalty is not None:  # responses that ran out of tokens get a fixed score
        scores = torch.where(rollout.ended_with_eos, scores, torch.full_like(scores, cfg.rollout.missing_eos_penalty))
    if cfg.reward.normalize:
        state.reward_stats.update(scores)
        scores = (scores - state.reward_stats.mean) / state.reward_stats.std
    if cfg.reward.clip is not None:
        scores = scores.clamp(-cfg.reward.clip, cfg.reward.clip)

    mask = rollout.response_mask
    match cfg.ppo.kl_estimator:
        case "k1":
            kl = algo.kl_k1(rollout.logprobs, rollout.ref_logprobs)
        case "k3":
            kl = algo.kl_k3(rollout.logprobs, rollout.ref_logprobs)
    kl = kl * mask
    rewards = algo.per_token_rewards(scores, kl, mask, state.kl_controller.value)
    if cfg.ppo.whiten_rewards:
        rewards = algo.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = algo.gae(rewards, rollout.values, mask, cfg.ppo.gamma, cfg.ppo.gae_lambda)
    if cfg.ppo.whiten_advantages:
        advantages = algo.masked_whiten(advantages, mask)
    return ScoredRollout(rollout=rollout, scores=scores, raw_scores=raw, kl=kl, rewards=rewards,
                         advantages=advantages, returns=returns)


# -------------------------------------------------------------------------------------------- step 4


def _minibatch(scored: ScoredRollout, idx: torch.Tensor) -> dict:
    """Slice a minibatch and trim the padding it does not need: left prompt padding shared by all its rows
    and response columns after its longest response."""
    r = scored.rollout
    prompt_mask, response_mask = r.prompt_mask[idx], r.response_mask[idx]
    first = int(prompt_mask.any(0).float().argmax())  # first prompt column with any real token
    last = int(response_mask.any(0).nonzero().max()) + 1 if response_mask.any() else 1
    ids = torch.cat([r.prompt_ids[idx, first:], r.response_ids[idx, :last]], 1)
    mask = torch.cat([prompt_mask[:, first:], response_mask[:, :last]], 1)
    return dict(input_ids=ids, attention_mask=mask.long(), n_response=last, tokens=r.response_ids[idx, :last],
                response_mask=response_mask[:, :last], old_logprobs=r.logprobs[idx, :last],
                old_values=r.values[idx, :last], advantages=scored.advantages[idx, :last],
                returns=scored.returns[idx, :last])


def _attention_kernel(accelerator, seq_len: int):
    """On CPU in bf16, PyTorch's flash-attention backward is 1.6-2.6x slower than the plain math kernel for
    sequences up to 128 tokens, and faster beyond (scripts/sdpa_backward.py); pick the faster one."""
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16" and seq_len <= 128:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def _first_nonfinite(**quantities: torch.Tensor) -> str | None:
    """Name of the first quantity (in the order given, i.e. the order they are computed) with a NaN/inf."""
    for name, value in quantities.items():
        if value is not None and not torch.isfinite(value).all():
            return name
    return None


def update(policy, optimizer, scheduler, accelerator, scored: ScoredRollout, state: TrainState, cfg: Config,
           generator: torch.Generator) -> dict:
    """Step 4: ``ppo.epochs`` passes of shuffled minibatches over the scored rollout.

    An update whose loss or gradient is not finite is skipped (and counted); ``ppo.max_nonfinite_steps`` such
    updates in a row raise :class:`TrainingDiverged` naming the quantity that went non-finite first.
    """
    ppo = cfg.ppo
    params = trainable_parameters(policy)
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "loss", "clipfrac",
                                                      "value_clipfrac", "approx_kl", "ratio", "grad_norm")}
    n = scored.rollout.response_ids.shape[0]
    policy.train()
    for epoch in range(ppo.epochs):
        epoch_kl = []
        order = torch.randperm(n, generator=generator).to(scored.rollout.response_ids.device)
        for mb in order.split(cfg.minibatch_size):
            for micro in mb.split(cfg.microbatch_size):
                b = _minibatch(scored, micro)
                with accelerator.accumulate(policy), accelerator.autocast(), \
                        _attention_kernel(accelerator, b["input_ids"].shape[1]):
                    logits, values = policy(b["input_ids"], b["attention_mask"], b["n_response"])
                    logprobs = algo.logprobs_from_logits(logits, b["tokens"], cfg.rollout.temperature)
                    pg_loss, pg = algo.policy_loss(logprobs, b["old_logprobs"], b["advantages"], b["response_mask"],
                                                   clip_range=ppo.clip_range)
                    vf_loss, vf = algo.value_loss(values.float(), b["old_values"], b["returns"], b["response_mask"],
                                                  clip_range=ppo.clip_range_value)
                    loss = pg_loss + ppo.vf_coef * vf_loss
                    if ppo.ent_coef > 0:
                        entropy = algo.masked_mean(algo.entropy_from_logits(logits, cfg.rollout.temperature),
                                                   b["response_mask"])
                        loss = loss - ppo.ent_coef * entropy
                    bad = _first_nonfinite(logprobs=logprobs * b["response_mask"], values=values * b["response_mask"],
                                           advantages=b["advantages"], policy_loss=pg_loss, value_loss=vf_loss)
                    if bad is None:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            norm = accelerator.clip_grad_norm_(params, ppo.max_grad_norm or float("inf"))
                            bad = None if torch.isfinite(norm) else "gradient"
                            stats["grad_norm"].append(float(norm))
                    if bad is not None:  # never step on a NaN/inf: drop it, count it, give up after K in a row
                        overflow = _drop_update(accelerator, optimizer, bad)
                        _skip(state, bad, ppo.max_nonfinite_steps, counts_toward_limit=not overflow)
                        continue
                    state.nonfinite_streak, state.first_nonfinite = 0, None
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("loss", loss),
                                   ("clipfrac", pg.clipfrac), ("value_clipfrac", vf.clipfrac),
                                   ("approx_kl", pg.approx_kl), ("ratio", pg.ratio_mean)):
                    stats[key].append(float(value.detach()))
                epoch_kl.append(float(pg.approx_kl))
        if ppo.target_kl is not None and epoch_kl and sum(epoch_kl) / len(epoch_kl) > ppo.target_kl:
            break  # early stop: the policy has moved far enough from the one that sampled the data
    out = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
    out["epochs_run"] = epoch + 1
    return out


def _drop_update(accelerator, optimizer, quantity: str) -> bool:
    """Throw away an update with a non-finite value. Under fp16 loss scaling a non-finite gradient is the grad
    scaler's to handle: ``clip_grad_norm_`` has already unscaled it, so the scaler's ``step`` sees the inf, skips
    the parameter update and ``update`` shrinks the scale (dropping it by hand would leave the scaler unscaled
    and the next step's ``unscale_`` would raise). Returns whether it was such an overflow while the scale is
    still at least 1, which is the scaler finding its scale, not the run diverging."""
    scaler = getattr(accelerator, "scaler", None)
    overflow = quantity == "gradient" and scaler is not None
    if overflow:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return overflow and scaler.get_scale() >= 1.0


def _skip(state: TrainState, quantity: str, limit: int, *, counts_toward_limit: bool = True) -> None:
    state.nonfinite_skips += 1
    if not counts_toward_limit:
        return
    state.nonfinite_streak += 1
    state.first_nonfinite = state.first_nonfinite or quantity
    if state.nonfinite_streak >= limit:
        raise TrainingDiverged(
            f"{state.nonfinite_streak} updates in a row had a non-finite value (first: {state.first_nonfinite}, "
            f"at iteration {state.iteration}); lower ppo.lr, check the reward scale, or set reward.clip",
            "ppo.max_nonfinite_steps")


# --------------------------------------------------------------------------------------------- step 5


def iteration_metrics(scored: ScoredRollout, train_stats: dict, state: TrainState, seconds: dict,
                      lr: float) -> dict:
    r, mask = scored.rollout, scored.rollout.response_mask
    lengths = mask.sum(-1).float()
    kl_seq = scored.kl.sum(-1)  # KL of the whole response, the quantity the penalty controls
    k3_seq = (algo.kl_k3(r.logprobs, r.ref_logprobs) * mask).sum(-1)
    total_s = sum(seconds.get(phase, 0.0) for phase in ("rollout", "score", "train"))  # "generate" is in "rollout"
    return {
        "iteration": state.iteration,
        "reward_mean": scored.raw_scores.mean().item(),
        "reward_std": scored.raw_scores.std().item() if scored.raw_scores.numel() > 1 else 0.0,
        "score_mean": scored.scores.mean().item(),
        "kl": kl_seq.mean().item(),
        "kl_k3": k3_seq.mean().item(),
        "kl_coef": state.kl_controller.value,
        "non_score_reward": (-state.kl_controller.value * kl_seq).mean().item(),
        "entropy": algo.masked_mean(r.entropy, mask).item(),
        "policy_loss": train_stats["policy_loss"],
        "value_loss": train_stats["value_loss"],
        "clipfrac": train_stats["clipfrac"],
        "value_clipfrac": train_stats["value_clipfrac"],
        "approx_kl": train_stats["approx_kl"],
        "ratio": train_stats["ratio"],
        "grad_norm": train_stats["grad_norm"],
        "epochs_run": train_stats["epochs_run"],
        "explained_variance": algo.explained_variance(r.values, scored.returns, mask).item(),
        "value_mean": algo.masked_mean(r.values, mask).item(),
        "advantage_std": algo.masked_var(scored.advantages, mask).sqrt().item(),
        "response_length": lengths.mean().item(),
        "eos_fraction": r.ended_with_eos.float().mean().item(),
        "distinct_2": distinct_n(r.completions, 2),
        "lr": lr,
        "samples_seen": state.samples_seen,
        "nonfinite_skips": state.nonfinite_skips,
        "time_rollout_s": seconds.get("rollout", 0.0),
        "time_generate_s": seconds.get("generate", 0.0),  # part of the rollout: sampling alone
        "time_score_s": seconds.get("score", 0.0),
        "time_train_s": seconds.get("train", 0.0),
        "time_iteration_s": total_s,
        "tokens_per_s": lengths.sum().item() / total_s if total_s > 0 else 0.0,
    }


# ------------------------------------------------------------------------------------------ the loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output_dir(path: str | Path) -> Path:
    """Fail early if the output directory cannot be created or written; create nothing yet, so that a run
    refused for bad input leaves nothing behind."""
    out = Path(path).expanduser()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output directory is not writable: {out} ({existing} is not a writable directory)",
                        "train.output_dir")
    return out


def check_models(cfg: Config):
    """Every model the run will load (policy, critic, reward models) is checked from its files before the first
    weights are read; returns the policy's transformers config."""
    trust = cfg.model.trust_remote_code
    policy_config = load_config_checked(cfg.model.name_or_path, kind="causal", field="model.name_or_path",
                                        trust_remote_code=trust)
    if cfg.model.critic and cfg.model.critic != "policy":
        load_config_checked(cfg.model.critic, kind="causal", field="model.critic", trust_remote_code=trust)
    for i, source in enumerate(cfg.reward.sources):
        if source.type == "model":
            load_config_checked(source.path, kind="classifier", field=f"reward.sources.{i}.path",
                                trust_remote_code=trust)
    return policy_config


def make_reward(cfg: Config, reward_fn: Callable | None, device) -> WeightedSum:
    if reward_fn is None:
        return build_reward(cfg.reward, device=device)
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    return WeightedSum([(f"reward function {name}", 1.0, reward_fn)])


def train(cfg: Config, *, reward_fn: Callable | None = None, records: list[dict] | None = None,
          console=None) -> TrainResult:
    """Run PPO as configured. ``reward_fn`` (the reward protocol) replaces ``cfg.reward``; ``records``
    (a list of dicts) replaces ``cfg.data.path``. Returns the trained policy and the metrics."""
    from accelerate import Accelerator
    from rich.console import Console
    from transformers import get_scheduler

    from . import __version__

    console = console or Console(stderr=True, soft_wrap=True)
    warn = lambda m: console.print(f"[yellow]{m}[/]")  # noqa: E731
    out = check_output_dir(cfg.train.output_dir)
    seed_everything(cfg.train.seed)

    # --- 0. everything that can be wrong with the input is checked before a model is loaded
    model_config = check_models(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                               trust_remote_code=cfg.model.trust_remote_code, notice=warn,
                               field="model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    records = records if records is not None else load_records(cfg.data.path, cfg.data.split)
    data_cfg = _fit_context(cfg, model_config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset: PromptDataset = build_prompt_dataset(records, tokenizer, data_cfg, source=cfg.data.path or "records")
    for w in caught:
        warn(f"warning: {w.message}")
    resume_from = _find_resume_checkpoint(cfg, out, warn)
    accelerator = Accelerator(cpu=cfg.train.cpu, mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.ppo.gradient_accumulation_steps,
                              log_with=cfg.train.log_with or None, project_dir=str(out))
    reward = make_reward(cfg, reward_fn, accelerator.device)

    # --- models, optimiser, schedule
    policy = load_policy(cfg.model, notice=warn)
    ref = make_reference(policy)
    # fused AdamW: one kernel over all parameters instead of a loop (CPU and CUDA since torch 2.4)
    optimizer = torch.optim.AdamW(parameter_groups(policy, cfg.ppo.lr, cfg.ppo.value_lr), lr=cfg.ppo.lr,
                                  eps=cfg.ppo.adam_eps, weight_decay=cfg.ppo.weight_decay, fused=True)
    total_steps = cfg.train.iterations * cfg.ppo.epochs * cfg.ppo.num_minibatches
    scheduler = get_scheduler(cfg.ppo.lr_schedule, optimizer, num_warmup_steps=cfg.ppo.warmup_steps,
                              num_training_steps=total_steps)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    if ref is not None:
        ref.to(accelerator.device)
    unwrapped: PolicyWithValue = accelerator.unwrap_model(policy)

    kl_ctl = (algo.AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
              if cfg.ppo.adaptive_kl else algo.FixedKLController(cfg.ppo.kl_coef))
    state = TrainState(iteration=0, sampler=PromptSampler(len(dataset), seed=cfg.train.seed, shuffle=cfg.data.shuffle),
                       kl_controller=kl_ctl)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    metrics_path = out / "metrics.jsonl"
    history: list[dict] = []
    if resume_from is not None:
        history = _restore(resume_from, unwrapped, optimizer, scheduler, state, generator, metrics_path)
        console.print(f"resuming from {resume_from.path} (iteration {state.iteration})")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if resume_from is None:
            metrics_path.write_text("")
    if cfg.train.log_with:
        accelerator.init_trackers("ppo-lm", config=_flat(cfg.to_dict()))
    metrics_log = MetricsLog(metrics_path, accelerator)
    timer = PhaseTimer()
    world, rank = accelerator.num_processes, accelerator.process_index
    last_checkpoint = resume_from.path if resume_from else None

    def save_checkpoint() -> Path | None:
        accelerator.wait_for_everyone()
        path = None
        if accelerator.is_main_process:
            path = ckpt.save(out / "checkpoints", state.iteration,
                             model_state={k: p for k, p in unwrapped.named_parameters() if p.requires_grad},
                             optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
                             trainer_state=state.state_dict(), rng=ckpt.rng_state(generator),
                             config=cfg.to_dict(), version=__version__, keep=cfg.train.keep_checkpoints)
        return path

    interrupted = False
    with _StopOnSignal() as stop, \
            _progress(console, cfg.train.iterations, enabled=cfg.train.progress and accelerator.is_main_process,
                      done=state.iteration) as bar:
        while state.iteration < cfg.train.iterations:
            state.iteration += 1
            timer.reset()
            indices = state.sampler.next(cfg.rollout.batch_size * world)[rank::world]
            prompts, prompt_ids, fields = dataset.batch(indices)
            with timer("rollout"):  # step 1
                rollout = collect(unwrapped, ref, tokenizer, prompt_ids, prompts, fields, cfg.rollout,
                                  device=accelerator.device, forward_batch_size=cfg.minibatch_size,
                                  autocast=accelerator.autocast, timer=timer)
            with timer("score"):  # steps 2 and 3
                try:
                    scored = score(rollout, reward, state, cfg)
                except RewardError as e:
                    raise RewardError(f"{e.what} (iteration {state.iteration})", e.where) from e
            with timer("train"):  # step 4
                train_stats = update(policy, optimizer, scheduler, accelerator, scored, state, cfg, generator)
            state.samples_seen += len(indices) * world
            metrics = iteration_metrics(scored, train_stats, state, timer.seconds, scheduler.get_last_lr()[0])
            state.kl_controller.update(metrics["kl"], len(indices) * world)
            metrics_log.log(metrics, step=state.iteration)  # step 5
            history.append(metrics)
            bar(metrics)
            _check_kl(metrics["kl"], cfg, state, warn)
            if (cfg.train.log_samples and cfg.train.log_samples_every
                    and state.iteration % cfg.train.log_samples_every == 0 and accelerator.is_main_process):
                _print_samples(console, scored, cfg.train.log_samples)
            if stop.requested or (cfg.train.checkpoint_every and state.iteration % cfg.train.checkpoint_every == 0):
                last_checkpoint = save_checkpoint() or last_checkpoint
            if stop.requested and state.iteration < cfg.train.iterations:
                interrupted = True
                warn(f"stopped by {stop.requested} after iteration {state.iteration}; checkpoint: {last_checkpoint}")
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not interrupted:
        if history:
            plot_metrics(history, out / "training.png", keys=("reward_mean", "kl", "entropy", "value_loss"))
        if cfg.train.save_final:
            save_policy(unwrapped, tokenizer, out / "final")
    accelerator.end_training()
    return TrainResult(policy=unwrapped, tokenizer=tokenizer, metrics=history, output_dir=out,
                       interrupted=interrupted, checkpoint=last_checkpoint)


def _fit_context(cfg: Config, model_config):
    """Prompt + response must fit the model's context: lower the prompt budget to what is left after
    ``max_new_tokens`` (the usual ``prompt_overflow`` rule then truncates or refuses)."""
    context = next((getattr(model_config, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                    if isinstance(getattr(model_config, k, None), int)), None)
    if context is None or cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens <= context:
        return cfg.data
    room = context - cfg.rollout.max_new_tokens
    if room < 1:
        raise UserError(f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) leaves no room for a prompt in the "
                        f"model's context of {context} tokens", "rollout.max_new_tokens")
    return dataclasses.replace(cfg.data, max_prompt_tokens=room)


def _find_resume_checkpoint(cfg: Config, out: Path, warn) -> ckpt.Checkpoint | None:
    """With ``train.resume: auto``, the newest intact checkpoint whose config allows an exact resume."""
    if cfg.train.resume != "auto":
        return None
    found = ckpt.newest_valid(out / "checkpoints", warn)
    if found is None:
        warn(f"no complete checkpoint in {out / 'checkpoints'}; starting from scratch")
        return None
    saved = yaml.safe_load((found.path / "config.yaml").read_text())
    differ = ckpt.incompatible_fields(saved, cfg.to_dict())
    if differ:
        raise UserError(f"the config differs from the checkpoint's in {', '.join(differ)}, which breaks exact "
                        f"resume; restore those values or use a new train.output_dir", str(found.path))
    return found


def _restore(found: ckpt.Checkpoint, policy, optimizer, scheduler, state: TrainState, generator,
             metrics_path: Path) -> list[dict]:
    """Load a checkpoint into the live objects; cut metrics.jsonl back to the checkpoint's iteration."""
    data = ckpt.load(found.path)
    missing = set(data["model"]) ^ {k for k, p in policy.named_parameters() if p.requires_grad}
    if missing:
        raise UserError(f"checkpoint parameters do not match the model ({len(missing)} names differ, e.g. "
                        f"{sorted(missing)[0]})", str(found.path))
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in data["model"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    state.load_state_dict(data["state"])
    ckpt.set_rng_state(data["rng"], generator)
    rows = []
    if metrics_path.exists():
        import json

        rows = [r for r in read_metrics(metrics_path) if r.get("iteration", 0) <= state.iteration]
        tmp = metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(metrics_path)
    return rows


def _check_kl(kl: float, cfg: Config, state: TrainState, warn) -> None:
    if cfg.ppo.kl_limit is None or kl <= cfg.ppo.kl_limit:
        return
    message = (f"KL to the reference is {kl:.3f} nats per response at iteration {state.iteration}, over "
               f"ppo.kl_limit ({cfg.ppo.kl_limit}); raise ppo.kl_coef or lower ppo.lr")
    if cfg.ppo.kl_limit_action == "stop":
        raise TrainingDiverged(message, "ppo.kl_limit")
    warn(f"warning: {message}")


class _StopOnSignal:
    """SIGINT/SIGTERM ask the loop to finish the current iteration, checkpoint and return; a second signal
    interrupts at once."""

    def __enter__(self):
        import signal
        import threading

        self.requested: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.requested:  # second signal: give up now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class _progress:
    """A rich progress bar that shows the latest reward and KL; silent when disabled."""

    def __init__(self, console, total: int, enabled: bool, done: int = 0):
        self.console, self.total, self.enabled, self.done = console, total, enabled, done

    def __enter__(self):
        if not self.enabled:
            return lambda metrics: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]PPO"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.description}"), console=self.console, transient=False)
        self.progress.__enter__()
        task = self.progress.add_task("", total=self.total, completed=self.done)

        def advance(m: dict) -> None:
            desc = (f"reward {m['reward_mean']:+.3f}  kl {m['kl']:.3f}  entropy {m['entropy']:.2f}  "
                    f"{m['time_iteration_s']:.1f}s/it")
            self.progress.update(task, advance=1, description=desc)
        return advance

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
        return False


def _print_samples(console, scored: ScoredRollout, k: int) -> None:
    from rich.table import Table

    table = Table(title="samples", show_lines=True)
    table.add_column("prompt", max_width=40)
    table.add_column("completion", max_width=60)
    table.add_column("reward", justify="right")
    r = scored.rollout
    for i in range(min(k, len(r.prompts))):
        table.add_row(r.prompts[i], r.completions[i], f"{scored.raw_scores[i].item():+.3f}")
    console.print(table)


def config_replace(cfg: Config, **sections) -> Config:
    """A copy of ``cfg`` with some sections' fields replaced: ``config_replace(cfg, ppo={"lr": 1e-4})``."""
    updates = {name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(cfg, **updates)
