"""The run doctor: named rules over a run's metrics that say what is going wrong and what to try.

Each :class:`Rule` looks at the metrics up to one iteration and returns the evidence when it fires (None when it
does not). The same rules run twice:

* during ``ppo-lm train`` (:class:`Monitor`): after each iteration, a rule that starts firing prints one line,
  and the names of the rules firing at that iteration go into its metrics.jsonl line as ``doctor``;
* in ``ppo-lm doctor RUN_DIR`` (:func:`diagnose`): over a finished or crashed run, a verdict per rule with the
  iterations where it fired, and the one or two most likely causes.

The thresholds are the ``doctor`` section of the config (:class:`ppo_lm.config.DoctorConfig`); the advice is the
tuning guide's (docs/tuning.md, where each rule has a section of its name). A rule compares means over
``doctor.window`` iterations, so that one noisy batch does not fire it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields as dataclass_fields
from pathlib import Path
from typing import Callable

from .config import DoctorConfig
from .errors import UserError


@dataclass(frozen=True)
class RunFacts:
    """What the rules need of the config besides the thresholds."""

    top_k: int = 0
    top_p: float = 1.0
    stop_at_eos: bool = True
    max_new_tokens: int | None = None

    @classmethod
    def of(cls, config: dict) -> "RunFacts":
        rollout = config.get("rollout") or {}
        return cls(top_k=rollout.get("top_k") or 0, top_p=rollout.get("top_p") or 1.0,
                   stop_at_eos=rollout.get("stop_at_eos", True), max_new_tokens=rollout.get("max_new_tokens"))


def number(value) -> float | None:
    """A metric as a float: NaN/inf come back from metrics.jsonl as the strings "nan", "inf", "-inf"."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def mean(rows: list[dict], key: str) -> float | None:
    """The mean of the finite values of ``key`` over ``rows`` (None when there are none)."""
    values = [v for r in rows for v in [number(r.get(key))] if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Rule:
    name: str
    #: what it means, in a few words
    title: str
    #: the cause it points to when it is the first of the rules that fired
    cause: str
    #: what to try, in the tuning guide's words
    advice: str
    #: ``check(rows, d, facts)``: the evidence when the rule fires at the last of ``rows``, else None
    check: Callable[[list[dict], DoctorConfig, RunFacts], str | None]


# --------------------------------------------------------------------------------------------- checks

CORE = ("reward_mean", "kl", "entropy", "policy_loss", "value_loss", "approx_kl")


def _nonfinite(rows, d, facts):
    last = rows[-1]
    bad = [k for k in CORE if k in last and (number(last[k]) is None or not math.isfinite(number(last[k])))]
    if bad:
        return f"{', '.join(f'{k} = {last[k]}' for k in bad)}"
    skipped = (number(last.get("nonfinite_skips")) or 0) - (number(rows[-2].get("nonfinite_skips")) or 0
                                                              if len(rows) > 1 else 0)
    if skipped > 0:
        return f"{skipped:.0f} update(s) skipped for a NaN/inf loss or gradient ({last['nonfinite_skips']} in all)"
    return None


def _sampling_mismatch(rows, d, facts):
    value = number(rows[-1].get("sampling_kl"))
    settings = ", ".join(s for s in (f"rollout.top_k {facts.top_k}" if facts.top_k else "",
                                     f"rollout.top_p {facts.top_p}" if facts.top_p < 1 else "") if s)
    if value is None:  # a run from before sampling_kl was logged: the settings alone
        return f"{settings} (the samples are not drawn from the policy)" if settings else None
    if value > d.sampling_kl:
        return f"sampling_kl {value:.3f} nats per token > {d.sampling_kl}" + (f" ({settings})" if settings else "")
    return None


def median(rows: list[dict], key: str) -> float | None:
    """The median of the finite values of ``key`` over ``rows`` (None when there are none): what one spike in a
    window does not move."""
    values = sorted(v for r in rows for v in [number(r.get(key))] if v is not None and math.isfinite(v))
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _recent(rows, d) -> list[dict] | None:
    """The last ``window`` iterations, once there are that many (one batch alone is too noisy to judge)."""
    return rows[-d.window:] if len(rows) >= d.window else None


def _negative_kl(rows, d, facts):
    kl = mean(_recent(rows, d) or [], "kl")
    if kl is not None and kl < -d.negative_kl:
        return f"kl {kl:.2f} nats per response < -{d.negative_kl} (mean of the last {d.window})"
    return None


def _large_updates(rows, d, facts):
    # the median: the first updates of a run, before the advantages settle, often spike alone
    recent = _recent(rows, d) or []
    clip, akl = median(recent, "clipfrac"), median(recent, "approx_kl")
    over = [f"clipfrac {clip:.2f} > {d.clipfrac}" if clip is not None and clip > d.clipfrac else "",
            f"approx_kl {akl:.3f} > {d.approx_kl}" if akl is not None and akl > d.approx_kl else ""]
    over = [o for o in over if o]
    return f"{', '.join(over)} (median of the last {d.window})" if over else None


def _kl_runaway(rows, d, facts):
    kl = mean(_recent(rows, d) or [], "kl")
    if kl is not None and kl > d.kl:
        return f"kl {kl:.1f} nats per response > {d.kl} (mean of the last {d.window})"
    return None


def _started(rows, d) -> tuple[list[dict], list[dict]] | None:
    """The start of the run (its first ``max(2, window // 2)`` iterations) and its last ``window`` iterations, once
    there are more than ``window``. The start is short because a run that learns fast (or games its reward fast)
    has changed within a window: a start of 5 iterations would already hold part of the change."""
    if len(rows) <= d.window:
        return None
    return rows[:max(2, d.window // 2)], rows[-d.window:]


def _entropy_collapse(rows, d, facts):
    parts = _started(rows, d)
    if parts is None:
        return None
    start, now = mean(parts[0], "entropy"), mean(parts[1], "entropy")
    if start and now is not None and now < d.entropy_drop * start:
        return f"entropy {now:.3f} < {d.entropy_drop} x its start ({start:.3f})"
    return None


def _rising(parts, d) -> tuple[bool, str]:
    start, now = mean(parts[0], "reward_mean"), mean(parts[1], "reward_mean")
    spread = mean(parts[0], "reward_std") or 0.0
    if start is None or now is None:
        return False, ""
    return now - start > d.flat_reward * spread, f"reward_mean {start:.3f} -> {now:.3f}"


def _length_hacking(rows, d, facts):
    parts = _started(rows, d)
    if parts is None:
        return None
    rising, reward = _rising(parts, d)
    corr = mean(rows, "reward_length_corr")  # over the run so far (nan, skipped, where a batch was all alike)
    if not rising or (corr is not None and corr <= d.length_corr):
        return None
    found = []
    start_len, now_len = mean(parts[0], "response_length"), mean(parts[1], "response_length")
    if start_len and now_len is not None and now_len > d.length_growth * start_len:
        found.append(f"response_length {start_len:.1f} -> {now_len:.1f} (> {d.length_growth}x)")
    start_eos, now_eos = mean(parts[0], "eos_fraction"), mean(parts[1], "eos_fraction")
    if facts.stop_at_eos and start_eos is not None and now_eos is not None and start_eos - now_eos > d.eos_drop:
        found.append(f"responses without EOS {1 - start_eos:.2f} -> {1 - now_eos:.2f} (up > {d.eos_drop})")
    paid = f"; reward and length correlate {corr:.2f} in the batches" if corr is not None else ""
    return f"{'; '.join(found)}, while {reward}{paid}" if found else None


def _critic_not_learning(rows, d, facts):
    if len(rows) < 2 * d.window:
        return None
    # The best window of the run, not the last: once the reward plateaus, what is left of the returns is mostly
    # sampling noise and even a good critic explains little of it (the demo's critic reaches 0.12, then drifts
    # around 0); a critic that never got above the threshold is one that does not learn.
    windows = [mean(rows[i - d.window:i], "explained_variance") for i in range(d.window, len(rows) + 1)]
    windows = [w for w in windows if w is not None]
    if windows and max(windows) <= d.explained_variance:
        return (f"explained_variance at most {max(windows):.3f} <= {d.explained_variance} "
                f"(best mean of {d.window} iterations in a row)")
    return None


def _no_signal(rows, d, facts):
    if len(rows) < 2 * d.window:
        return None
    parts = _started(rows, d)
    start, now = mean(parts[0], "reward_mean"), mean(parts[1], "reward_mean")
    spread, kl = mean(parts[0], "reward_std") or 0.0, mean(parts[1], "kl")
    if start is None or now is None or kl is None:
        return None
    if abs(now - start) <= d.flat_reward * spread and kl < d.flat_kl:
        return (f"reward_mean {start:.3f} -> {now:.3f} (within {d.flat_reward} x reward_std {spread:.3f}) and "
                f"kl {kl:.3f} < {d.flat_kl}")
    return None


#: The rules, most upstream first: when several fire, the first of them is the most likely cause (a learning rate
#: too high also collapses the entropy and lets the KL run; a reward that pays for length also starves the critic).
RULES: tuple[Rule, ...] = (
    Rule("nonfinite", "a loss, gradient or metric went NaN/inf",
         "numerical overflow: a learning rate too high or rewards of a huge scale",
         "lower ppo.lr, keep ppo.max_grad_norm, check the reward for huge values (reward.clip); with fp16 try bf16",
         _nonfinite),
    Rule("sampling_mismatch", "the rollout does not sample the policy",
         "sampling settings differ from the distribution PPO's ratio and KL use (top-k/top-p)",
         "sample the policy itself: rollout.top_k 0 and rollout.top_p 1.0 (rollout.temperature is applied to both "
         "sides already)", _sampling_mismatch),
    Rule("negative_kl", "the KL estimate is negative",
         "the samples are not drawn from the policy the KL is computed for",
         "check rollout.top_k/top_p and any sampler of your own; ppo.kl.estimator k3 is never negative, but it only "
         "hides the mismatch", _negative_kl),
    Rule("large_updates", "updates too large: the ratio strays far from 1",
         "ppo.lr too high (or too many ppo.epochs per batch)",
         "lower ppo.lr; set ppo.early_stop_kl (e.g. 0.05); fewer ppo.epochs or more ppo.num_minibatches",
         _large_updates),
    Rule("length_hacking", "the reward rises with the length of the answers",
         "a reward that pays for length (or for never ending) rather than for the answer",
         "add a length source, or set rollout.missing_eos_penalty to score unfinished answers low; check the reward "
         "on long and unfinished answers", _length_hacking),
    Rule("kl_runaway", "the KL to the reference keeps climbing",
         "a KL penalty too weak for the learning rate",
         "lower ppo.lr first, then raise ppo.kl.coef, or ppo.kl.adaptive with ppo.kl.target; ppo.kl.limit stops the "
         "run", _kl_runaway),
    Rule("entropy_collapse", "the policy collapsed onto a few outputs",
         "steps too large or a KL penalty too weak to keep the policy spread",
         "lower ppo.lr; raise ppo.kl.coef; a small ppo.ent_coef (0.001-0.01)", _entropy_collapse),
    Rule("no_signal", "reward and KL both flat",
         "no learning signal: every sample scores alike, the reward's scale is off, or ppo.lr is too low",
         "if reward_std is near 0, SFT first or give partial credit; otherwise raise ppo.lr (x2-3) or "
         "rollout.batch_size; reward.normalize for rewards of a tiny scale", _no_signal),
    Rule("critic_not_learning", "the value function explains none of the returns",
         "a critic that does not fit the returns: a reward scale it cannot follow, or a value head too slow",
         "reward.normalize: true; ppo.value_lr at 10-30x ppo.lr; ppo.vf_coef 1.0 on a shared trunk; or "
         "model.critic: policy", _critic_not_learning),
)
BY_NAME = {r.name: r for r in RULES}


def fired(rows: list[dict], d: DoctorConfig, facts: RunFacts) -> dict[str, str]:
    """The rules that fire at the last of ``rows``: name -> evidence."""
    if not rows:
        return {}
    return {rule.name: evidence for rule in RULES for evidence in [rule.check(rows, d, facts)] if evidence}


def line(rule: Rule, iteration: int, evidence: str) -> str:
    return f"doctor: {rule.name} at iteration {iteration}: {evidence}. Try: {rule.advice} (docs/tuning.md#{rule.name})"


class Monitor:
    """The rules during training: :meth:`check` after each iteration returns the names firing now, and a line to
    print for each rule firing for the first time in the run (a rule that flickers around its threshold speaks
    once; metrics.jsonl has every iteration's names)."""

    def __init__(self, d: DoctorConfig, facts: RunFacts, history: list[dict] | None = None):
        self.d, self.facts = d, facts
        self.spoken = {n for row in history or [] for n in row.get("doctor") or []}  # resuming: already said

    def check(self, history: list[dict]) -> tuple[list[str], list[str]]:
        now = fired(history, self.d, self.facts)
        lines = [line(BY_NAME[n], history[-1]["iteration"], e) for n, e in now.items() if n not in self.spoken]
        self.spoken |= set(now)
        return list(now), lines


# ---------------------------------------------------------------------------------------- the verdict


@dataclass
class Verdict:
    rule: Rule
    iterations: list[int] = field(default_factory=list)
    evidence: str = ""  #: at the first iteration it fired

    @property
    def ok(self) -> bool:
        return not self.iterations


@dataclass
class Diagnosis:
    run_dir: Path
    status: str
    verdicts: list[Verdict]
    causes: list[Verdict]  #: the one or two most likely, most upstream first
    iterations: int
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"run_dir": str(self.run_dir), "status": self.status, "iterations": self.iterations,
                "rules": {v.rule.name: {"fired": v.iterations, "evidence": v.evidence} for v in self.verdicts},
                "causes": [{"rule": v.rule.name, "cause": v.rule.cause, "advice": v.rule.advice} for v in self.causes]}


def spans(iterations: list[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    out, start = [], None
    for i, it in enumerate(iterations):
        start = it if start is None else start
        if i + 1 == len(iterations) or iterations[i + 1] != it + 1:
            out.append(str(start) if start == it else f"{start}-{it}")
            start = None
    return ", ".join(out)


def doctor_config(config: dict) -> DoctorConfig:
    """The run's thresholds (its config's doctor section; the defaults for what it lacks)."""
    known = {f.name for f in dataclass_fields(DoctorConfig)}
    return DoctorConfig(**{k: v for k, v in (config.get("doctor") or {}).items() if k in known})


def read_run(run_dir: str | Path) -> tuple[list[dict], dict, dict, list[dict]]:
    """A run directory's metrics, config, manifest and samples; a clear error when it is not a run."""
    import yaml

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}: not a ppo-lm train output_dir", str(run_dir))
    rows = []
    for n, text in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows += [json.loads(text)] if text.strip() else []
        except json.JSONDecodeError as e:
            raise UserError(f"not JSON ({e.msg}): a metrics line must be one JSON object", f"{metrics}:{n}") from None
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    manifest = (json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file()
                else {})
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines() if x.strip()] \
        if (run_dir / "samples.jsonl").is_file() else []
    return rows, config or {}, manifest, samples


def diagnose(run_dir: str | Path) -> Diagnosis:
    """Every rule over every iteration of the run in ``run_dir``."""
    run_dir = Path(run_dir)
    rows, config, manifest, samples = read_run(run_dir)
    d, facts = doctor_config(config), RunFacts.of(config)
    verdicts = {r.name: Verdict(r) for r in RULES}
    for i in range(1, len(rows) + 1):
        for name, evidence in fired(rows[:i], d, facts).items():
            v = verdicts[name]
            v.iterations.append(rows[i - 1].get("iteration", i))
            v.evidence = v.evidence or evidence
    planned = (config.get("train") or {}).get("iterations")
    done = rows[-1].get("iteration", len(rows)) if rows else 0
    if planned is None or done >= planned:
        status = f"finished: {done} iterations" + ("" if (run_dir / "final").is_dir() else " (no final/ model)")
    else:
        status = (f"stopped after iteration {done} of {planned}: it crashed, diverged or was interrupted "
                  f"(checkpoints: {run_dir / 'checkpoints'})")
    found = [v for v in verdicts.values() if not v.ok]
    return Diagnosis(run_dir=run_dir, status=status, verdicts=list(verdicts.values()), causes=found[:2],
                     iterations=done, samples=samples)


def render(diagnosis: Diagnosis, console) -> None:
    """The verdict on the console: status, a table of the rules, the most likely causes."""
    from rich.table import Table

    console.print(f"[bold]{diagnosis.run_dir}[/]: {diagnosis.status}")
    table = Table(show_lines=False)
    for column in ("rule", "verdict", "evidence (first time it fired)"):
        table.add_column(column)
    for v in diagnosis.verdicts:
        verdict = "ok" if v.ok else f"[red]fired[/] at {spans(v.iterations)}"
        table.add_row(v.rule.name, verdict, v.evidence)
    console.print(table)
    if not diagnosis.causes:
        console.print("No rule fired: nothing in the metrics points to a problem.")
        return
    for k, v in enumerate(diagnosis.causes, 1):
        console.print(f"[bold]Most likely cause {k}[/] ({v.rule.name}): {v.rule.cause}.\n  Try: {v.rule.advice} "
                      f"(docs/tuning.md#{v.rule.name})")
