"""The PPO loop for language models, readable top to bottom like the algorithm.

:func:`train` is :func:`setup` once, then :func:`iteration` until done. One iteration:

1. **collect** — sample a response per prompt with the current policy; keep old logprobs, values and
   reference logprobs of the sampled tokens (``rollout.collect``). With a text environment (``env.id``), play
   an episode per seed instead, turn after turn (``episodes.collect``): the environment's replies are context,
   its rewards come per turn.
2. **score** — the reward sources score each completion, and the scores are shaped (:func:`score`).
3. **advantages** — per-token reward = ``-kl.coef * KL`` on every token plus the score at the last real token,
   then GAE over the response tokens and whitening (:func:`advantages`); or, critic-free, the score against a
   baseline from the other responses to the prompt or from the batch, and each token's return-to-go.
4. **update** — ``ppo.epochs`` passes of shuffled minibatches: clipped surrogate + clipped value loss (+ a KL
   loss term), gradient accumulation and clipping, learning-rate schedule (:func:`update`).
5. **log** — one JSON line of metrics per iteration, trackers, progress display.

Device placement, mixed precision, gradient accumulation and several processes go through ``accelerate``; on
several processes every statistic and decision above is taken over the global batch (:mod:`ppo_lm.distributed`,
docs/scaling.md).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import Tensor

from . import algo, episodes, evaluate, manifest
from . import distributed as dist
from . import checkpoint as ckpt
from .config import Config
from .doctor import Monitor, RunFacts
from .envs import make as make_env
from .data import PromptDataset, PromptSampler, build_prompt_dataset, load_records
from .errors import RewardError, TrainingDiverged, UserError
from .models import (PolicyWithValue, Reference, attention_kernel, context_length, load_config_checked, load_policy,
                     load_tokenizer, make_reference, parameter_groups, save_policy, trainable_parameters)
from .rewards import RunningMoments, WeightedSum, build_reward, shape_scores
from .rollout import collect
from .runtime import StopOnSignal, check_output_dir, seed_everything
from .tracking import MetricsLog, PhaseTimer, flat_config, plot_metrics, print_samples, progress_bar
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


def score(rollout: Rollout, reward_fn: WeightedSum, accelerator) -> Tensor:
    """Step 2a: the reward sources' summed score of each completion ``[B]`` (raw). A reward that fails on one
    process fails the step on all of them (each would otherwise wait for the others)."""
    try:
        raw, failure = reward_fn(rollout.prompts, rollout.completions, rollout.fields).to(rollout.values.device), None
    except RewardError as e:
        raw, failure = None, e
    dist.raise_together(accelerator, failure,
                        RewardError("failed on another process (its error is in that process's output)", "reward"))
    return raw


def shape(rollout: Rollout, raw: Tensor, state: TrainState, cfg: Config, accelerator) -> Tensor:
    """Step 2b: the reward section's shaping (missing-EOS score, normalisation, clipping) of the global batch's
    scores, so that the running statistics are those of every process's scores; returns this process's part."""
    everyone = dist.gather_rows(accelerator, raw)
    shaped = shape_scores(everyone, dist.gather_rows(accelerator, rollout.ended_with_eos),
                          missing_eos_penalty=cfg.rollout.missing_eos_penalty, normalize=cfg.reward.normalize,
                          clip=cfg.reward.clip, stats=state.reward_stats)
    n = raw.shape[0]
    return shaped[accelerator.process_index * n:(accelerator.process_index + 1) * n]


def advantages(rollout: Rollout, raw: Tensor, scores: Tensor, kl_coef: float, ppo, reduce=None,
               group_size: int = 1) -> ScoredRollout:
    """Step 3: per-token reward = ``-kl_coef * KL`` on every response token plus the score at the last one, then
    GAE advantages and returns (``ppo``: the config's PPO section); a critic-free ``ppo.advantage_estimator``
    replaces the score by its baseline-subtracted version (groups of ``group_size`` rows: one prompt's responses)
    and GAE by the return-to-go (:func:`algo.critic_free_advantages`). ``reduce`` sums over processes, so that
    whitening uses the moments of the global batch (None on one process)."""
    mask = rollout.response_mask
    kl = algo.KL_ESTIMATORS[ppo.kl.estimator](rollout.logprobs, rollout.ref_logprobs) * mask
    if not algo.ESTIMATORS[ppo.advantage_estimator].critic:
        adv, rewards = algo.critic_free_advantages(ppo.advantage_estimator, scores, kl, mask, kl_coef=kl_coef,
                                                   gamma=ppo.gamma, group_size=group_size, reduce=reduce)
        return ScoredRollout(rollout=rollout, scores=scores, raw_scores=raw, kl=kl, rewards=rewards, advantages=adv,
                             returns=adv)  # (no value target: there is no critic)
    if rollout.turn_rewards is None:
        rewards = algo.per_token_rewards(scores, kl, mask, kl_coef)
    else:  # an environment's episodes: each turn's reward at the turn's last token
        rewards = -kl_coef * kl + rollout.turn_rewards * mask
    if ppo.whiten_rewards:
        rewards = algo.masked_whiten(rewards, mask, shift_mean=False, reduce=reduce)
    adv, returns = algo.gae(rewards, rollout.values, mask, ppo.gamma, ppo.gae_lambda)
    if ppo.whiten_advantages:
        adv = algo.masked_whiten(adv, mask, reduce=reduce)
    return ScoredRollout(rollout=rollout, scores=scores, raw_scores=raw, kl=kl, rewards=rewards, advantages=adv,
                         returns=returns)


# -------------------------------------------------------------------------------------------- step 4


def minibatch(scored: ScoredRollout, idx: torch.Tensor) -> dict:
    """Slice a minibatch and trim the padding it does not need: left prompt padding shared by all its rows
    and response columns after its longest response."""
    r = scored.rollout
    prompt_mask, response_mask, seen = r.prompt_mask[idx], r.response_mask[idx], r.seen_mask[idx]
    first = int(prompt_mask.any(0).float().argmax())  # first prompt column with any real token
    last = int(seen.any(0).nonzero().max()) + 1 if seen.any() else 1
    ids = torch.cat([r.prompt_ids[idx, first:], r.response_ids[idx, :last]], 1)
    mask = torch.cat([prompt_mask[:, first:], seen[:, :last]], 1)
    return dict(input_ids=ids, attention_mask=mask.long(), n_response=last, tokens=r.response_ids[idx, :last],
                response_mask=response_mask[:, :last], old_logprobs=r.logprobs[idx, :last],
                old_values=r.values[idx, :last], advantages=scored.advantages[idx, :last],
                returns=scored.returns[idx, :last], ref_logprobs=r.ref_logprobs[idx, :last])


def _first_nonfinite(accelerator, **quantities: torch.Tensor) -> str | None:
    """Name of the first quantity (in the order given, i.e. the order they are computed) with a NaN/inf on
    any process; every process gets the same answer, so that all skip the update together."""
    flags = torch.tensor([float(v is not None and not bool(torch.isfinite(v).all())) for v in quantities.values()],
                         device=accelerator.device)
    flags = dist.global_sum(accelerator, flags)
    return next((name for name, f in zip(quantities, flags.tolist()) if f > 0), None)


def response_budget(cfg: Config, episodic: bool) -> int:
    """The most tokens the policy writes in one response, the constant of ``seq_mean_token_sum_norm`` (Dr. GRPO; it
    must not depend on the batch): ``rollout.max_new_tokens``, or over an environment's episode, its turns'
    (``env.max_turns`` x ``rollout.max_new_tokens``, and ``env.max_tokens`` at most)."""
    if not episodic:
        return cfg.rollout.max_new_tokens
    return min(cfg.env.max_turns * cfg.rollout.max_new_tokens, cfg.env.max_tokens)


def ppo_loss(policy, b: dict, cfg: Config, accelerator, n_tokens: float, n_seqs: float, norm: float):
    """The loss of one micro-batch ``b`` (:func:`minibatch`): clipped surrogate + ``vf_coef`` x clipped value
    loss (+ ``kl.loss_coef`` x KL to the reference, - ``ent_coef`` x entropy). The value loss is a token sum over
    ``n_tokens``; the other terms are reduced by ``ppo.loss_aggregation`` over ``n_tokens`` or ``n_seqs``. Without
    a critic there is no value loss (None). Returns the loss, the policy loss with its statistics, the value loss
    with its statistics, the KL loss (or None), and the first quantity that is not finite on any process (or
    None). ``norm``: :func:`response_budget`."""
    ppo, mask = cfg.ppo, b["response_mask"]
    agg = dict(aggregation=cfg.loss_aggregation, n_tokens=n_tokens, n_seqs=n_seqs, norm=norm)
    logits, values = policy(b["input_ids"], b["attention_mask"], b["n_response"])
    logprobs = algo.logprobs_from_logits(logits, b["tokens"], cfg.rollout.temperature)
    pg_loss, pg = algo.policy_loss(logprobs, b["old_logprobs"], b["advantages"], mask, clip_range=ppo.clip_range,
                                   clip_range_high=ppo.clip_range_high, dual_clip=ppo.dual_clip,
                                   log_ratio_clamp=ppo.log_ratio_clamp, **agg)
    loss, vf_loss, vf, kl_loss = pg_loss, None, None, None
    if values is not None:
        vf_loss, vf = algo.value_loss(values.float(), b["old_values"], b["returns"], mask,
                                      clip_range=ppo.clip_range_value, n_tokens=n_tokens)
        loss = loss + ppo.vf_coef * vf_loss
    if ppo.kl.loss_coef > 0:
        kl_loss = algo.aggregate(algo.KL_ESTIMATORS[ppo.kl.loss_estimator](logprobs, b["ref_logprobs"]), mask,
                                 cfg.loss_aggregation, n_tokens=n_tokens, n_seqs=n_seqs, norm=norm)
        loss = loss + ppo.kl.loss_coef * kl_loss
    if ppo.ent_coef > 0:
        entropy = algo.aggregate(algo.entropy_from_logits(logits, cfg.rollout.temperature), mask,
                                 cfg.loss_aggregation, n_tokens=n_tokens, n_seqs=n_seqs, norm=norm)
        loss = loss - ppo.ent_coef * entropy
    bad = _first_nonfinite(accelerator, logprobs=logprobs * mask,
                           values=None if values is None else values * mask, advantages=b["advantages"],
                           policy_loss=pg_loss, value_loss=vf_loss, kl_loss=kl_loss)
    return loss, (pg_loss, pg), (vf_loss, vf), kl_loss, bad


def update(policy, optimizer, scheduler, accelerator, scored: ScoredRollout, state: TrainState, cfg: Config,
           generator: torch.Generator, *, episodic: bool = False) -> dict:
    """Step 4: ``ppo.epochs`` passes of shuffled minibatches over the scored rollout (``episodic``: of an
    environment's episodes, see :func:`response_budget`).

    An update whose loss or gradient is not finite is skipped (and counted); ``ppo.max_nonfinite_steps`` such
    updates in a row raise :class:`TrainingDiverged` naming the quantity that went non-finite first.
    """
    ppo = cfg.ppo
    pieces = accelerator.num_processes * ppo.gradient_accumulation_steps  # the minibatch's share per backward
    params = trainable_parameters(policy)
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "loss", "clipfrac",
                                                      "value_clipfrac", "approx_kl", "ratio", "grad_norm",
                                                      "kl_loss", "dual_clipfrac")}
    n = scored.rollout.response_ids.shape[0]
    budget = response_budget(cfg, episodic)
    policy.train()
    for epoch in range(ppo.epochs):
        epoch_kl = []
        order = torch.randperm(n, generator=generator).to(scored.rollout.response_ids.device)
        for mb in order.split(cfg.minibatch_size):
            # every piece's loss is its token sum over the global minibatch's token count (x pieces, since DDP
            # and gradient accumulation average the pieces): the gradient of the minibatch's token mean
            n_tokens = float(dist.global_sum(accelerator, scored.rollout.response_mask[mb].sum().float())) / pieces
            n_seqs = len(mb) * accelerator.num_processes / pieces  # (every process has minibatches of one size)
            for micro in mb.split(cfg.microbatch_size):
                b = minibatch(scored, micro)
                with accelerator.accumulate(policy), accelerator.autocast(), \
                        attention_kernel(accelerator.device, accelerator.mixed_precision, b["input_ids"].shape[1]):
                    loss, (pg_loss, pg), (vf_loss, vf), kl_loss, bad = ppo_loss(policy, b, cfg, accelerator,
                                                                                n_tokens, n_seqs, budget)
                    if bad is None:
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            norm = grad_norm(accelerator, params, ppo.max_grad_norm)
                            bad = None if math.isfinite(norm) else "gradient"
                            stats["grad_norm"].append(norm)
                    if bad is not None:  # never step on a NaN/inf: drop it, count it, give up after K in a row
                        overflow = _drop_update(accelerator, optimizer, bad)
                        _skip(state, bad, ppo.max_nonfinite_steps, counts_toward_limit=not overflow)
                        continue
                    state.nonfinite_streak, state.first_nonfinite = 0, None
                    optimizer.step()
                    if accelerator.sync_gradients and not optimizer.step_was_skipped:  # once per optimiser step
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("loss", loss),
                                   ("clipfrac", pg.clipfrac), ("value_clipfrac", vf and vf.clipfrac),
                                   ("approx_kl", pg.approx_kl), ("ratio", pg.ratio_mean), ("kl_loss", kl_loss),
                                   ("dual_clipfrac", None if ppo.dual_clip is None else pg.dual_clipfrac)):
                    if value is not None:
                        stats[key].append(float(value.detach()))
                epoch_kl.append(float(pg.approx_kl))
        epoch_kl = dist.global_mean(accelerator, sum(epoch_kl) / len(epoch_kl)) if epoch_kl else None
        if ppo.early_stop_kl is not None and epoch_kl is not None and epoch_kl > ppo.early_stop_kl:
            break  # early stop: the policy has moved far enough from the one that sampled the data
    out = {k: dist.global_mean(accelerator, sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
    out["epochs_run"] = epoch + 1
    return out


def grad_norm(accelerator, params, max_norm: float | None) -> float:
    """The gradient's global norm before clipping to ``max_norm``. DeepSpeed clips (``gradient_clipping``) and
    steps inside ``backward``: accelerate then returns the norm DeepSpeed measured, as a float (None before its
    first step)."""
    norm = accelerator.clip_grad_norm_(params, max_norm or float("inf"))
    return float("nan") if norm is None else float(norm)


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
    # the inner optimiser's: accelerate's wrapper zeroes nothing inside an accumulation window, and the dropped
    # micro-batch's gradient (and those before it in the window) would then stay in the sum
    getattr(optimizer, "optimizer", optimizer).zero_grad(set_to_none=True)
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
                      lr: float, *, critic: bool = True) -> dict:
    """One iteration's metrics (docs/commands.md); ``critic`` False (a critic-free estimator): none of the value
    function's."""
    r, mask = scored.rollout, scored.rollout.response_mask
    lengths = mask.sum(-1).float()
    kl_seq = scored.kl.sum(-1)  # KL of the whole response, the quantity the penalty controls
    k3_seq = (algo.kl_k3(r.logprobs, r.ref_logprobs) * mask).sum(-1)
    total_s = sum(seconds.get(phase, 0.0) for phase in ("rollout", "score", "train"))  # "generate" is in "rollout"
    metrics = {
        "iteration": state.iteration,
        "reward_mean": scored.raw_scores.mean().item(),
        "reward_std": scored.raw_scores.std().item() if scored.raw_scores.numel() > 1 else 0.0,
        "score_mean": scored.scores.mean().item(),
        "kl": kl_seq.mean().item(),
        "kl_k3": k3_seq.mean().item(),
        "kl_coef": state.kl_controller.value,
        "non_score_reward": (-state.kl_controller.value * kl_seq).mean().item(),
        "entropy": algo.masked_mean(r.entropy, mask).item(),
        # KL of the distribution the tokens were drawn from (top-k/top-p) to the policy's, per token: 0 when the
        # rollout samples the policy itself, as PPO's ratio and KL penalty assume
        "sampling_kl": (0.0 if r.sampling_logprobs is None else
                        algo.masked_mean(r.sampling_logprobs - r.logprobs, mask).item()),
        # Pearson correlation of reward and response length over the batch (nan when either is constant): near 1,
        # the reward pays for length (the run doctor's length_hacking)
        "reward_length_corr": torch.corrcoef(torch.stack([scored.raw_scores.float(), lengths]))[0, 1].item()
        if len(lengths) > 1 else float("nan"),
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
        "distinct_2": evaluate.distinct_n(r.completions, 2),
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
    if not critic:
        for key in ("value_loss", "value_clipfrac", "explained_variance", "value_mean"):
            del metrics[key]
    for key in ("kl_loss", "dual_clipfrac"):  # the options that have them
        if math.isfinite(train_stats.get(key, float("nan"))):
            metrics[key] = train_stats[key]
    return metrics


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class Run:
    """What :func:`setup` makes once and every iteration uses: the models in their roles, the optimiser and
    schedule, the prompts, the reward, the state, and where the run writes."""

    cfg: Config
    accelerator: object
    policy: torch.nn.Module  #: the policy as accelerate prepared it (wrapped for DDP on several processes)
    model: PolicyWithValue  #: the same policy, unwrapped
    reference: Reference  #: the policy as it started: a frozen copy, or the policy with its LoRA adapters off
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    dataset: PromptDataset | None  #: the prompts (None with an environment: its seeds take their place)
    reward: WeightedSum | None  #: the reward sources (None with an environment: it scores the episodes)
    state: TrainState
    generator: torch.Generator  #: shuffles the update's minibatches
    out: Path
    log: MetricsLog
    history: list[dict]
    console: object
    checkpoint: Path | None = None  #: the newest checkpoint written or resumed from
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    eval_set: PromptDataset | None = None  #: the held-out prompts of train.eval_every
    best: dict | None = None  #: the best evaluation so far by eval.best_metric (best.json)
    monitor: Monitor | None = None  #: the run doctor's rules, checked after each iteration
    envs: list | None = None  #: with an environment, one instance per episode of an iteration on this process
    play: dict = field(default_factory=dict)  #: how episodes are played: chat (bool) and max_prompt_tokens

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]{message}[/]")


def train(cfg: Config, *, reward_fn: Callable | None = None, records: list[dict] | None = None,
          env=None, console=None) -> TrainResult:
    """Run PPO as configured. ``reward_fn`` (the reward protocol) replaces ``cfg.reward``; ``records``
    (a list of dicts) replaces ``cfg.data.path``; ``env`` (a text-environment class or factory, made with
    ``cfg.env.kwargs``; :mod:`ppo_lm.envs`) replaces ``cfg.env.id``. Returns the trained policy and the metrics."""
    with manifest.deterministic(cfg.train.deterministic):
        run = setup(cfg, reward_fn=reward_fn, records=records, env=env, console=console)
        state, interrupted = run.state, False
        shown = cfg.train.progress and run.accelerator.is_main_process
        with StopOnSignal() as stop, progress_bar(run.console, cfg.train.iterations, shown, state.iteration) as bar:
            while state.iteration < cfg.train.iterations:
                bar(iteration(run))
                every = cfg.train.checkpoint_every
                stopping = dist.any_process(run.accelerator, bool(stop.requested))  # a signal to one stops all
                if stopping or (every and state.iteration % every == 0):
                    run.checkpoint = save_checkpoint(run) or run.checkpoint
                if stopping and state.iteration < cfg.train.iterations:
                    interrupted = True
                    by = stop.requested or "a signal to another process"
                    run.warn(f"stopped by {by} after iteration {state.iteration}; checkpoint: {run.checkpoint}")
                    break
        return finish(run, interrupted)


def iteration(run: Run) -> dict:
    """One PPO iteration, the five steps of the module docstring; returns its metrics."""
    cfg, state, timer, acc = run.cfg, run.state, run.timer, run.accelerator
    state.iteration += 1
    timer.reset()
    k = cfg.samples_per_prompt  # each prompt k times in a row: a group, never split over processes
    n_prompts = cfg.rollout.batch_size // k * acc.num_processes
    indices = [i for i in state.sampler.next(n_prompts)[acc.process_index::acc.num_processes] for _ in range(k)]
    with timer("rollout"), dist.whole(acc, run.policy):  # 1. collect
        if run.envs is not None:  # an environment's episodes, reset with the sampled seeds
            rollout = episodes.collect(run.model, run.reference, run.tokenizer, run.envs, indices, cfg, **run.play,
                                       device=acc.device, forward_batch_size=cfg.minibatch_size,
                                       autocast=acc.autocast, timer=timer)
        else:
            prompts, prompt_ids, fields = run.dataset.batch(indices)
            rollout = collect(run.model, run.reference, run.tokenizer, prompt_ids, prompts, fields, cfg.rollout,
                              device=acc.device, forward_batch_size=cfg.minibatch_size, autocast=acc.autocast,
                              timer=timer)
    with timer("score"):  # 2. score, 3. advantages
        if rollout.turn_rewards is not None:  # the environment scored each turn: the score is the episode's return
            raw = scores = rollout.turn_rewards.sum(-1)
        else:
            try:
                raw = score(rollout, run.reward, acc)
            except RewardError as e:
                raise RewardError(f"{e.what} (iteration {state.iteration})", e.where) from e
            scores = shape(rollout, raw, state, cfg, acc)
        scored = advantages(rollout, raw, scores, state.kl_controller.value, cfg.ppo, reduce=dist.summer(acc),
                            group_size=k)
    with timer("train"):  # 4. update
        stats = update(run.policy, run.optimizer, run.scheduler, acc, scored, state, cfg, run.generator,
                       episodic=run.envs is not None)
    state.samples_seen += len(indices) * acc.num_processes
    everyone = gather_scored(acc, scored)  # metrics and the KL controller see the global batch
    metrics = iteration_metrics(everyone, stats, state, timer.seconds, run.scheduler.get_last_lr()[0],
                                critic=cfg.estimator.critic)
    if run.envs is not None:  # the episodes' success and length, over every process's episodes
        fields = {k: dist.gather_list(acc, rollout.fields[k]) for k in ("success", "turns")}
        metrics.update(episodes.summary(fields))
    kl = response_kl(everyone)
    state.kl_controller.update(kl, len(indices) * acc.num_processes)
    every, last = cfg.train.eval_every, state.iteration == cfg.train.iterations
    if every and (state.iteration % every == 0 or last):
        with timer("eval"):
            metrics.update(evaluate_now(run))
        metrics["time_eval_s"] = timer.seconds["eval"]
    if run.monitor is not None:  # the doctor's rules over the run so far, this iteration included
        metrics["doctor"], lines = run.monitor.check([*run.history, metrics])
        for text in lines if acc.is_main_process else ():
            run.warn(text)
    run.log.log(metrics, step=state.iteration)  # 5. log
    run.history.append(metrics)
    _check_kl(kl, cfg, state, run.warn)
    k, every = cfg.train.log_samples, cfg.train.log_samples_every
    if k and acc.is_main_process and (state.iteration == 1 or last or (every and state.iteration % every == 0)):
        write_samples(run.out / "samples.jsonl", state.iteration, everyone, k)
        if every and state.iteration % every == 0:
            print_samples(run.console, rollout.prompts, rollout.completions, scored.raw_scores.tolist(), k)
    return metrics


def write_samples(path: Path, iteration: int, scored: ScoredRollout, k: int) -> None:
    """``samples.jsonl``: the first ``k`` prompts of the batch with their completions and rewards, one line each,
    at the first and the last iteration and every train.log_samples_every (what ppo-lm report shows)."""
    r = scored.rollout
    with path.open("a", encoding="utf-8") as f:
        for prompt, completion, reward in list(zip(r.prompts, r.completions, scored.raw_scores.tolist()))[:k]:
            f.write(json.dumps({"iteration": iteration, "prompt": prompt, "completion": completion,
                                "reward": reward}, ensure_ascii=False) + "\n")


def evaluate_now(run: Run) -> dict:
    """``train.eval_every``: the policy on the held-out prompts (:func:`ppo_lm.evaluate.during_training`) as
    ``eval/...`` metrics; with ``eval.best_metric``, the policy is kept in ``output_dir/best`` when it is the best
    so far (best.json says at which iteration and what it measured)."""
    cfg, acc = run.cfg, run.accelerator
    with dist.whole(acc, run.policy):
        if run.envs is not None:
            result = evaluate_episodes(run)
        else:
            result = evaluate.during_training(cfg, run.model, run.tokenizer, run.eval_set, run.reward, acc,
                                              acc.autocast)
        name = cfg.eval.best_metric
        if name:
            if name not in result:
                raise UserError(f"unknown eval metric {name!r} (this run's: {', '.join(result)})", "eval.best_metric")
            value = result[name]
            better = run.best is None or (value > run.best["value"] if cfg.eval.best_mode == "max"
                                          else value < run.best["value"])
            if better and math.isfinite(value):
                run.best = {"iteration": run.state.iteration, "metric": name, "value": value, "eval": result}
                if acc.is_main_process:
                    save_best(run)
    return {f"eval/{k}": v for k, v in result.items()}


def evaluate_episodes(run: Run) -> dict:
    """The policy on env.eval_episodes held-out episodes (greedy with eval.greedy, as for prompts), each process
    its share; the same numbers on every process. The training's random streams are left where they were."""
    cfg, acc = run.cfg, run.accelerator
    seeds = episodes.eval_seeds(cfg.env.eval_episodes)[acc.process_index::acc.num_processes]
    was_training = run.model.training
    run.model.eval()
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.train.seed + acc.process_index)
        _, played = episodes.evaluate(run.model.lm, run.tokenizer, run.envs, seeds, cfg, **run.play,
                                      device=acc.device, autocast=acc.autocast, greedy=cfg.eval.greedy)
    run.model.train(was_training)
    success = dist.gather_list(acc, [e.success for e in played])
    turns = dist.gather_list(acc, [e.turns for e in played])
    rewards = dist.gather_list(acc, [e.total_reward for e in played])
    return episodes.summary({"success": success, "turns": turns}, rewards)


def save_best(run: Run) -> None:
    """The policy into ``best/`` (written beside it first, then swapped in, so a crash leaves the previous best)."""
    best, staged, old = run.out / "best", run.out / "best.tmp", run.out / "best.old"
    shutil.rmtree(staged, ignore_errors=True)
    save_policy(run.model, run.tokenizer, staged)
    (staged / "best.json").write_text(json.dumps(run.best, indent=1) + "\n")
    if best.exists():
        best.rename(old)
    staged.rename(best)
    shutil.rmtree(old, ignore_errors=True)


def gather_scored(accelerator, scored: ScoredRollout) -> ScoredRollout:
    """The scored rollout of every process together (rows in process order, per-token tensors padded to the
    longest response); the same object on one process. For metrics: the update uses this process's part."""
    if accelerator.num_processes == 1:
        return scored
    rows = lambda x, pad=0, first=False: dist.gather_rows(accelerator, x, pad, first)  # noqa: E731
    r = scored.rollout
    rollout = replace(r, response_ids=rows(r.response_ids), response_mask=rows(r.response_mask, False),
                      logprobs=rows(r.logprobs), ref_logprobs=rows(r.ref_logprobs), values=rows(r.values),
                      entropy=rows(r.entropy), ended_with_eos=rows(r.ended_with_eos),
                      prompt_ids=rows(r.prompt_ids, 0, True), prompt_mask=rows(r.prompt_mask, False, True),
                      prompts=dist.gather_list(accelerator, r.prompts),
                      completions=dist.gather_list(accelerator, r.completions), fields={},
                      sampling_logprobs=None if r.sampling_logprobs is None else rows(r.sampling_logprobs),
                      context_mask=None if r.context_mask is None else rows(r.context_mask, False),
                      turn_rewards=None if r.turn_rewards is None else rows(r.turn_rewards))
    return ScoredRollout(rollout=rollout, scores=rows(scored.scores), raw_scores=rows(scored.raw_scores),
                         kl=rows(scored.kl), rewards=rows(scored.rewards), advantages=rows(scored.advantages),
                         returns=rows(scored.returns))


def response_kl(scored: ScoredRollout) -> float:
    """The KL of whole responses to the reference, mean over the batch (nats per response): the quantity the KL
    penalty controls, and the one an adaptive KL controller steers."""
    return scored.kl.sum(-1).mean().item()


def setup(cfg: Config, *, reward_fn: Callable | None = None, records: list[dict] | None = None, env=None,
          console=None) -> Run:
    """Everything before the first iteration. All that can be wrong with the input is checked before a model
    is loaded, and nothing is written before the models are loaded."""
    from rich.console import Console

    console = console or Console(stderr=True, soft_wrap=True)
    warn = lambda m: console.print(f"[yellow]{m}[/]")  # noqa: E731
    out = check_output_dir(cfg.train.output_dir)
    accelerator = dist.accelerator_for(console, cpu=cfg.train.cpu, mixed_precision=cfg.train.mixed_precision,
                                       gradient_accumulation_steps=cfg.ppo.gradient_accumulation_steps,
                                       log_with=cfg.train.log_with or None, project_dir=str(out))
    dist.check_lora(accelerator, cfg.model.lora.enabled)
    seed_everything(cfg.train.seed)
    if env is not None:  # the checks of an environment run, which config_from_dict could not know of
        from .config import validate

        validate(cfg, check_paths=False, env_given=True)
    env = env or cfg.env.id
    envs = play = None
    if env is None:
        tokenizer, dataset, records, eval_set = _prompts(cfg, records, warn)
        reward = make_reward(cfg, reward_fn, accelerator.device)
    else:
        envs = [make_env(env, cfg.env.kwargs) for _ in range(cfg.rollout.batch_size)]
        tokenizer, play = _env_play(cfg, envs[0], warn)
        dataset = eval_set = reward = None
        records = []
    resume_from = ckpt.find_resume(out, cfg.to_dict(), warn) if cfg.train.resume == "auto" else None
    policy, reference, optimizer, scheduler = _models(cfg, accelerator, warn)
    seed = dist.process_seed(cfg.train.seed, accelerator.process_index)
    if seed != cfg.train.seed:  # the models start alike on every process; from here each samples its own stream
        seed_everything(seed)
    model: PolicyWithValue = accelerator.unwrap_model(policy)
    kl = cfg.ppo.kl
    kl_ctl = (algo.AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive
              else algo.FixedKLController(kl.coef))
    n_prompts = cfg.env.seeds if envs is not None else len(dataset)  # an environment's seeds are its prompts
    state = TrainState(iteration=0, sampler=PromptSampler(n_prompts, seed=cfg.train.seed, shuffle=cfg.data.shuffle),
                       kl_controller=kl_ctl)
    generator = torch.Generator().manual_seed(seed)
    metrics_path, history = out / "metrics.jsonl", []
    if resume_from is not None:
        history = ckpt.restore(resume_from, model, optimizer, scheduler, state, generator, metrics_path,
                               rank=accelerator.process_index, world=accelerator.num_processes, warn=warn,
                               engine=dist.sharded(accelerator),
                               load_engine=load_engine(policy, optimizer, accelerator))
        console.print(f"resuming from {resume_from.path} (iteration {state.iteration})")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        manifest.write(out, manifest.build(cfg.to_dict(), records, seed=cfg.train.seed, device=str(accelerator.device),
                                           processes=accelerator.num_processes,
                                           mixed_precision=cfg.train.mixed_precision,
                                           deterministic=cfg.train.deterministic))
        _start_samples(out / "samples.jsonl", state.iteration if resume_from is not None else 0)
        if resume_from is None:
            metrics_path.write_text("")
            shutil.rmtree(out / "best", ignore_errors=True)  # a best policy of an earlier run is not this run's
    if cfg.train.log_with:
        accelerator.init_trackers("ppo-lm", config=flat_config(cfg.to_dict()))
    best = out / "best" / "best.json"
    return Run(cfg=cfg, accelerator=accelerator, policy=policy, model=model, reference=reference, tokenizer=tokenizer,
               optimizer=optimizer, scheduler=scheduler, dataset=dataset, reward=reward, state=state,
               generator=generator, out=out, log=MetricsLog(metrics_path, accelerator), history=history,
               console=console, checkpoint=resume_from.path if resume_from else None, eval_set=eval_set,
               best=json.loads(best.read_text()) if resume_from is not None and best.is_file() else None,
               monitor=Monitor(cfg.doctor, RunFacts.of(cfg.to_dict()), history) if cfg.doctor.enabled else None,
               envs=envs, play=play or {})


def _env_play(cfg: Config, env, warn):
    """With an environment: the tokenizer, and how its episodes are played (whether through the chat template,
    and the first observation's token budget: the model's context less env.max_tokens). One episode's first
    observation is checked against that budget here, before any model loads."""
    from .data import use_chat_template

    model_config = check_models(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                               trust_remote_code=cfg.model.trust_remote_code, notice=warn,
                               field="model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    play = {"chat": use_chat_template(tokenizer, cfg.data.chat_template),
            "max_prompt_tokens": episodes.prompt_room(cfg, model_config)}
    episodes.first_prompts(tokenizer, [env], [0], cfg, **play)
    return tokenizer, play


def _start_samples(path: Path, iteration: int) -> None:
    """samples.jsonl anew, or (resuming from ``iteration``) without the lines of the iterations after it."""
    kept = [] if not iteration or not path.is_file() else \
        [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip() and json.loads(x)["iteration"] <= iteration]
    path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")


def _prompts(cfg: Config, records: list[dict] | None, warn):
    """The models are checked from their files, then the tokenizer and the prompts (and the held-out prompts of
    train.eval_every) are loaded and checked. Returns the tokenizer, the prompt dataset, its records and the
    held-out dataset (or None)."""
    model_config = check_models(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                               trust_remote_code=cfg.model.trust_remote_code, notice=warn,
                               field="model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    records = records if records is not None else load_records(cfg.data.path, cfg.data.split)
    held_out = None
    if cfg.train.eval_every:
        held_out = load_records(cfg.eval.data, cfg.data.split)
        held_out = held_out[:cfg.eval.limit] if cfg.eval.limit else held_out
    data_cfg = _fit_context(cfg, model_config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build_prompt_dataset(records, tokenizer, data_cfg, source=cfg.data.path or "records")
        eval_set = None if held_out is None else build_prompt_dataset(held_out, tokenizer, data_cfg,
                                                                      source=cfg.eval.data)
    for w in caught:
        warn(f"warning: {w.message}")
    return tokenizer, dataset, records, eval_set


def _models(cfg: Config, accelerator, warn):
    """The policy (with its value head), its reference, the optimiser and the learning-rate schedule, prepared
    by accelerate."""
    from transformers import get_scheduler

    policy = load_policy(cfg.model, value_head=cfg.estimator.critic, notice=warn)
    reference = make_reference(policy)
    # fused AdamW: one kernel over all parameters instead of a loop (CPU and CUDA since torch 2.4)
    optimizer = torch.optim.AdamW(parameter_groups(policy, cfg.ppo.lr, cfg.ppo.value_lr), lr=cfg.ppo.lr,
                                  eps=cfg.ppo.adam_eps, weight_decay=cfg.ppo.weight_decay, fused=True)
    total_steps = cfg.train.iterations * cfg.ppo.epochs * cfg.ppo.num_minibatches
    scheduler = get_scheduler(cfg.ppo.lr_schedule, optimizer, num_warmup_steps=cfg.ppo.warmup_steps,
                              num_training_steps=total_steps)
    # the schedule stays unprepared: accelerate would step it once per process at each optimiser step
    dist.fit_engine(accelerator, micro_batch=cfg.microbatch_size, max_grad_norm=cfg.ppo.max_grad_norm)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    reference.to(accelerator.device)
    return policy, reference, optimizer, scheduler


def save_checkpoint(run: Run) -> Path | None:
    """A checkpoint of everything an exact resume needs (written by the main process; others get None). Under
    DeepSpeed and FSDP2 every process first writes its part of the model and optimiser with the engine's own
    checkpoint (:func:`ppo_lm.distributed.save_sharded`), which the main process then moves into the checkpoint
    (``engine/``) before it is completed."""
    from . import __version__

    acc, iteration = run.accelerator, run.state.iteration
    acc.wait_for_everyone()
    rngs = dist.gather_list(acc, [ckpt.rng_state(run.generator)])  # each process resumes its own
    staged, move = run.out / "checkpoints" / f"engine-{iteration:06d}.tmp", None
    if dist.sharded(acc) is not None:
        dist.save_sharded(acc, run.policy, run.optimizer, staged / "engine")
        move = lambda tmp: (staged / "engine").rename(tmp / "engine")  # noqa: E731
    with dist.whole(acc, run.policy):  # the trainable weights whole, readable without DeepSpeed or FSDP
        path = dist.on_main(acc, lambda: ckpt.save(
            run.out / "checkpoints", iteration,
            model_state={k: p for k, p in run.model.named_parameters() if p.requires_grad},
            optimizer_state=run.optimizer.state_dict() if move is None else {},
            scheduler_state=run.scheduler.state_dict(), trainer_state=run.state.state_dict(), rng=rngs[0],
            process_rngs=rngs[1:], config=run.cfg.to_dict(), version=__version__,
            keep=run.cfg.train.keep_checkpoints, write_hook=move), "train.checkpoint_every")
    if move is not None and acc.is_main_process:
        shutil.rmtree(staged, ignore_errors=True)  # what the engine wrote beside its engine/ (DeepSpeed's `latest`)
    return path


def load_engine(policy, optimizer, accelerator):
    """The ``load_engine`` of :func:`ppo_lm.checkpoint.restore` under DeepSpeed or FSDP2 (None elsewhere): every
    process loads its part of the model and optimiser (the schedule is ppo-lm's, restored apart)."""
    if dist.sharded(accelerator) is None:
        return None
    return lambda path: dist.load_sharded(accelerator, policy, optimizer, path)


def finish(run: Run, interrupted: bool) -> TrainResult:
    """After the last iteration: the training plot and the final model (unless interrupted), trackers closed."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process and not interrupted and run.history:
        plot_metrics(run.history, run.out / "training.png",
                     keys=("reward_mean", "success_rate", "kl", "entropy", "value_loss"))
    if run.cfg.train.save_final and not interrupted:
        with dist.whole(run.accelerator, run.policy):  # ZeRO-3's or FSDP2's shards gathered: a whole model
            if run.accelerator.is_main_process:
                save_policy(run.model, run.tokenizer, run.out / "final")
    for tracker in run.accelerator.trackers:  # not end_training(): it ends the process group, which the
        tracker.finish()                       # pipeline's later stages (and a caller's next run) still use
    return TrainResult(policy=run.model, tokenizer=run.tokenizer, metrics=run.history, output_dir=run.out,
                       interrupted=interrupted, checkpoint=run.checkpoint)


def models_of(cfg: Config) -> list[tuple[str, str, str]]:
    """Every model a PPO run loads, as ``(path, kind, field)``: the policy, a separate critic, the reward models."""
    found = [(cfg.model.name_or_path, "causal", "model.name_or_path")]
    if cfg.model.critic and cfg.model.critic != "policy":
        found.append((cfg.model.critic, "causal", "model.critic"))
    found += [(s.path, "classifier", f"reward.sources.{i}.path") for i, s in enumerate(cfg.reward.sources)
              if s.type == "model"]
    return found


def check_models(cfg: Config):
    """Every model the run will load is checked from its files before the first weights are read; returns the
    policy's transformers config."""
    configs = [load_config_checked(path, kind=kind, field=field, trust_remote_code=cfg.model.trust_remote_code)
               for path, kind, field in models_of(cfg)]
    return configs[0]


def make_reward(cfg: Config, reward_fn: Callable | None, device) -> WeightedSum:
    if reward_fn is None:
        return build_reward(cfg.reward, device=device)
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    return WeightedSum([(f"reward function {name}", 1.0, reward_fn)])


def _fit_context(cfg: Config, model_config):
    """Prompt + response must fit the model's context: lower the prompt budget to what is left after
    ``max_new_tokens`` (the usual ``prompt_overflow`` rule then truncates or refuses)."""
    context = context_length(model_config)
    if context is None or cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens <= context:
        return cfg.data
    room = context - cfg.rollout.max_new_tokens
    if room < 1:
        raise UserError(f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) leaves no room for a prompt in the "
                        f"model's context of {context} tokens", "rollout.max_new_tokens")
    return replace(cfg.data, max_prompt_tokens=room)


def _check_kl(kl: float, cfg: Config, state: TrainState, warn) -> None:
    """``ppo.kl.limit``: stop (or warn) when the response KL to the reference passes it."""
    if cfg.ppo.kl.limit is None or kl <= cfg.ppo.kl.limit:
        return
    message = (f"KL to the reference is {kl:.3f} nats per response at iteration {state.iteration}, over "
               f"ppo.kl.limit ({cfg.ppo.kl.limit}); raise ppo.kl.coef or lower ppo.lr")
    if cfg.ppo.kl.limit_action == "stop":
        raise TrainingDiverged(message, "ppo.kl.limit")
    warn(f"warning: {message}")
