"""``ppo-lm pipeline CONFIG``: (prepare data ->) SFT -> reward model -> PPO -> evaluation in one command.

The pipeline config names a config file per stage; the pipeline wires them together: the SFT model becomes the
PPO policy (and the reward model's starting point unless that config names its own), and the reward model is
added to the PPO reward sources. Each stage writes under ``output_dir/<stage>`` and is skipped when its
``summary.json`` (or, for PPO, ``final/``) already exists; an interrupted PPO stage resumes from its newest
checkpoint. Every stage config is loaded and validated before the first model is. With ``task``, the task's
files are first written to ``data_dir`` from the public data in ``assets`` (skipped when the same are there).

```yaml
output_dir: runs/pipeline
task: qa                            # optional: prepare this task's data first ...
assets: ../shared/assets            # ... from this folder ...
data_dir: runs/data/qa              # ... into this one (the stage configs read it)
sft: examples/x_sft.yaml            # optional
reward_model: examples/x_rm.yaml    # optional
reward_model_weight: 1.0
reward_model_completion_only: false  # the reward model scores the completion alone
ppo: examples/x_ppo.yaml            # required
eval_data: runs/data/qa/heldout.jsonl  # prompts for the before/after (null = the PPO prompts)
eval_limit: 64                      # use only the first N of them (null = all)
eval_greedy: false                  # greedy decoding in the evaluation (true for accuracy-style tasks)
eval_base: true                     # with SFT, also evaluate the model SFT started from (SFT's gain apart from PPO's)
seed: null                          # set train.seed of every stage (null = each stage config's own)
```

On the command line, ``key=value`` overrides the pipeline config, and ``sft.KEY=VALUE``, ``reward_model.KEY=VALUE``
or ``ppo.KEY=VALUE`` one stage's config (``ppo.rollout.temperature=0.7``; ``ppo.ppo.lr=2e-4`` is the PPO config's
``ppo.lr``), so that a variant needs no copy of a file. The keys the pipeline wires itself (each stage's
``train.output_dir``, PPO's ``train.resume`` and, after SFT, its ``model.name_or_path``) are refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .config import load_config, read_config
from .errors import ConfigError


@dataclass
class PipelineConfig:
    #: Root folder; stages write to output_dir/sft, /reward_model, /ppo, /eval.
    output_dir: str = "runs/pipeline"
    #: SFT stage config (null = no SFT; PPO starts from its own model.name_or_path).
    sft: str | None = None
    #: Reward-model stage config (null = PPO uses only its own reward sources, else its final/ is added to them, and
    #: the PPO config may then list none).
    reward_model: str | None = None
    #: Weight of the trained reward model among the PPO reward sources.
    reward_model_weight: float = 1.0
    #: The trained reward model scores the completion alone (its source's completion_only), not prompt + completion.
    reward_model_completion_only: bool = False
    #: PPO stage config (required).
    ppo: str = ""
    #: Task whose data is prepared first (qa | text_generation | sentiment_analysis); null = no preparation.
    task: str | None = None
    #: Folder of public data the task is prepared from.
    assets: str = "../shared/assets"
    #: Data source of the task (null = its default; e.g. qa: stories or squad).
    source: str | None = None
    #: Where the task's files go (the stage configs read them from here).
    data_dir: str | None = None
    #: Prompt file of the before/after evaluation (null = the PPO prompts).
    eval_data: str | None = None
    #: Evaluate on only the first N prompts (null = all).
    eval_limit: int | None = 64
    #: Decode greedily in the evaluation (sampled with the PPO rollout settings otherwise).
    eval_greedy: bool = False
    #: Seed of every stage (train.seed of SFT, reward model and PPO); null = each stage config's own.
    seed: int | None = None
    #: With an SFT stage, also evaluate the model SFT started from (column "base"), so that SFT's gain and PPO's
    #: own (SFT -> PPO, the before/after) are apart.
    eval_base: bool = True


STAGES = ("sft", "reward_model", "ppo")


def split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[list[str], dict[str, list[str]]]:
    """The pipeline config's own ``key=value`` overrides, and each stage's: ``ppo.rollout.temperature=0.7`` is
    ``rollout.temperature=0.7`` for the PPO stage (``ppo=x.yaml``, with no dot in the key, names the stage's file)."""
    own: list[str] = []
    staged: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for item in overrides:
        key = item.partition("=")[0]
        stage, dot, rest = key.partition(".")
        if dot and stage in staged:
            staged[stage].append(item[len(stage) + 1:])
        else:
            own.append(item)
    return own, staged


_WIRED = {"train.output_dir": "the pipeline sets it to output_dir/<stage>",
          "train.resume": "the pipeline always resumes its PPO stage",
          "model.name_or_path": "the pipeline starts PPO from the SFT stage's model"}


def _stage_overrides(stage: str, wired: list[str], seeded: list[str], user: list[str]) -> list[str]:
    """A stage's overrides: what the pipeline wires, its seed, then the user's ``stage.KEY=VALUE`` (which beat the
    seed); a user key that the pipeline wires is refused."""
    keys = {item.partition("=")[0] for item in wired}
    for item in user:
        key = item.partition("=")[0].strip()
        if key in keys:
            raise ConfigError(f"{stage}.{key}", _WIRED[key], "command line")
    return [*wired, *seeded, *user]


def _load_stage(stage: str, path: str, overrides: list[str], **kw):
    """A stage's config; an error in one of its command-line overrides names the key as typed (``ppo.…``)."""
    try:
        return load_config(path, overrides, **kw)
    except ConfigError as e:
        if e.where and e.where.startswith("command line"):
            raise ConfigError(f"{stage}.{e.field}", e.what, "command line") from None
        raise


def _stage_config(path: str | None, field: str, source: str):
    if path and not Path(path).is_file():
        raise ConfigError(field, f"no such file: {path}", source)
    return path


def load_pipeline_config(config_path: str, overrides: list[str] = ()) -> PipelineConfig:
    """The pipeline config with its own overrides (a stage's, ``ppo.KEY=VALUE``, are :func:`plan`'s)."""
    p = read_config(PipelineConfig, config_path, split_overrides(overrides)[0])
    if not p.ppo:
        raise ConfigError("ppo", "the pipeline needs a PPO stage config", config_path)
    if p.task is not None:
        from . import tasks

        if p.task not in tasks.TASKS:
            raise ConfigError("task", tasks.unknown(p.task), config_path)
        if not p.data_dir:
            raise ConfigError("data_dir", "a pipeline with a task needs data_dir: where its files go", config_path)
    return p


def prepare_data(p: PipelineConfig, console) -> None:
    """Write the task's files unless they are there already, as the recipe makes them from ``assets`` now (when the
    assets folder is not there, files already written are trusted); data only, no model is loaded."""
    from . import tasks

    check = p.assets if Path(p.assets).expanduser().is_dir() else None
    if tasks.prepared(p.data_dir, p.task, p.source, assets=check):
        console.print(rf"\[data] skipped: {p.data_dir} has the {p.task} files")
        return
    counts = tasks.prepare(p.task, p.assets, p.data_dir, source=p.source, fields=("assets", "source"))
    console.print(rf"\[data] {p.task} from {p.assets}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))


def plan(config_path: str, p: PipelineConfig, overrides: list[str] = ()) -> dict:
    """Load and validate every stage's config, wired together, with the stage overrides among ``overrides``
    (``ppo.KEY=VALUE``: :func:`split_overrides`); no model is loaded."""
    root = Path(p.output_dir)
    staged = split_overrides(overrides)[1]
    for stage, items in staged.items():
        if items and not getattr(p, stage):
            raise ConfigError(f"{stage}.{items[0].partition('=')[0]}", f"this pipeline has no {stage} stage",
                              "command line")
    stages: dict = {"root": root, "pipeline": p}
    from .reward_model import RewardModelConfig
    from .sft import SFTConfig

    sft_final = root / "sft" / "final"
    seeded = [] if p.seed is None else [f"train.seed={p.seed}"]
    if _stage_config(p.sft, "sft", config_path):
        over = _stage_overrides("sft", [f"train.output_dir={root / 'sft'}"], seeded, staged["sft"])
        stages["sft"] = _load_stage("sft", p.sft, over, schema=SFTConfig)
    policy = str(sft_final) if "sft" in stages else None
    if _stage_config(p.reward_model, "reward_model", config_path):
        rm_over = _stage_overrides("reward_model", [f"train.output_dir={root / 'reward_model'}"], seeded,
                                   staged["reward_model"])
        rm = _load_stage("reward_model", p.reward_model, rm_over, schema=RewardModelConfig,
                         check_paths=policy is None)
        stages["reward_model"] = rm
    _stage_config(p.ppo, "ppo", config_path)
    wired = [f"train.output_dir={root / 'ppo'}", "train.resume=auto"]
    if policy:
        wired.append(f"model.name_or_path={policy}")
    ppo_over = _stage_overrides("ppo", wired, seeded, staged["ppo"])
    ppo = _load_stage("ppo", p.ppo, ppo_over, check_paths=policy is None, reward_given="reward_model" in stages)
    if "reward_model" in stages:
        from .config import RewardSourceConfig

        ppo.reward.sources.append(RewardSourceConfig(type="model", path=str(root / "reward_model" / "final"),
                                                     weight=p.reward_model_weight,
                                                     completion_only=p.reward_model_completion_only))
    stages["ppo"] = ppo
    stages["start_model"] = policy or ppo.model.name_or_path
    if p.eval_data:
        if not Path(p.eval_data).is_file():
            raise ConfigError("eval_data", f"no such file: {p.eval_data}", config_path)
        stages["eval"] = replace(ppo, data=replace(ppo.data, path=p.eval_data, shuffle=False))
    else:
        stages["eval"] = ppo
    return stages


def check_models(stages: dict) -> None:
    """The models that exist before the pipeline starts (those its stages do not write) are checked from their
    files, tokenizers included, so that a damaged one stops the pipeline before its first stage."""
    from .models import load_config_checked, load_tokenizer
    from .reward_model import is_classifier
    from .trainer import models_of

    root: Path = stages["root"]
    written = {str(root / "sft" / "final"), str(root / "reward_model" / "final")}
    found: list[tuple[str, str, str, bool]] = []  # (path, kind, field, trust_remote_code)
    if "sft" in stages:
        m = stages["sft"].model
        found.append((m.name_or_path, "causal", "sft: model.name_or_path", m.trust_remote_code))
    if "reward_model" in stages:
        m = stages["reward_model"].model
        kind = "classifier" if is_classifier(m.name_or_path) else "causal"
        found.append((m.name_or_path, kind, "reward_model: model.name_or_path", m.trust_remote_code))
    trust = stages["ppo"].model.trust_remote_code
    found += [(path, kind, f"ppo: {field}", trust) for path, kind, field in models_of(stages["ppo"])]
    for path, kind, field, trust in found:
        if path in written:
            continue
        load_config_checked(path, kind=kind, field=field, trust_remote_code=trust)
        load_tokenizer(path, notice=lambda _m: None, field=field, trust_remote_code=trust)


def run_stage(name: str, title: str, run_fn, cfg, root: Path, console, timed) -> dict:
    """Train one stage into ``root/name`` unless its ``summary.json`` is there (a finished stage is skipped when
    the pipeline runs again); return that summary."""
    summary = root / name / "summary.json"
    if summary.exists():
        console.print(rf"\[{name}] skipped: {summary} exists")
    else:
        console.print(rf"\[{name}] {title}")
        run_fn(cfg, console=console)
        timed(name)
    return json.loads(summary.read_text())


def compare_stage(p: PipelineConfig, stages: dict, console) -> dict:
    """The starting model against the PPO policy on the eval data; writes ``eval/compare.*`` and returns the
    summary's ``eval`` and ``report`` entries."""
    from . import evaluate

    root = stages["root"]
    console.print(rf"\[eval] before/after on {stages['eval'].data.path}")
    result = evaluate.compare(stages["eval"], stages["start_model"], str(root / "ppo" / "final"),
                              limit=p.eval_limit, greedy=p.eval_greedy,
                              notice=lambda m: console.print(f"warning: {m}"))
    if "sft" in stages and p.eval_base:
        base = stages["sft"].model.name_or_path
        console.print(rf"\[eval] the model SFT started from: {base}")
        evaluate.add_base(result, evaluate.evaluate(stages["eval"], base, limit=p.eval_limit, greedy=p.eval_greedy))
    evaluate.write(result, root / "eval", "compare")
    console.print(evaluate.markdown_table(result), markup=False, highlight=False)
    return {"eval": {r["metric"]: {k: r[k] for k in ("base", "before", "after") if k in r} for r in result["rows"]},
            "after_preferred": result["after_preferred"], "report": str(root / "eval" / "compare.md")}


def run(config_path: str, overrides: list[str] = (), *, console=None) -> dict:
    from rich.console import Console

    from accelerate import PartialState

    from . import reward_model, sft
    from .distributed import use_cpu
    from .tracking import read_metrics
    from .trainer import train

    console = console or Console(stderr=True, soft_wrap=True)
    p = load_pipeline_config(config_path, overrides)
    process = PartialState(cpu=use_cpu(False))  # several processes under torchrun: one prepares, evaluates, writes
    if not process.is_main_process:
        console.quiet = True
    if p.task and process.is_main_process:
        prepare_data(p, console)
    process.wait_for_everyone()
    stages = plan(config_path, p, overrides)
    check_models(stages)
    root: Path = stages["root"]
    summary: dict = {"seconds": {}}
    clock = time.perf_counter()

    def timed(stage: str) -> None:
        nonlocal clock
        summary["seconds"][stage] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    if "sft" in stages and "reward_model" in stages:
        rm = stages["reward_model"]
        if rm.model.name_or_path == stages["sft"].model.name_or_path:
            rm.model.name_or_path = str(root / "sft" / "final")  # start the RM from the SFT model
    for name, title, module in (("sft", "supervised fine-tuning", sft),
                                ("reward_model", "training the reward model", reward_model)):
        if name in stages:
            summary[name] = run_stage(name, title, module.run, stages[name], root, console, timed)
    ppo = stages["ppo"]
    if (root / "ppo" / "final" / "config.json").exists():
        console.print(rf"\[ppo] skipped: {root / 'ppo' / 'final'} exists")
    else:
        console.print(r"\[ppo] PPO (resumes from its newest checkpoint if there is one)")
        result = train(ppo, console=console)
        if result.interrupted:
            summary["ppo"] = {"interrupted": True, "checkpoint": str(result.checkpoint)}
            return summary
        timed("ppo")
    rows = read_metrics(root / "ppo")
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    summary["ppo"] = {"iterations": len(rows), "reward_first": first.get("reward_mean"),
                      "reward_last": last.get("reward_mean"), "kl_last": last.get("kl")}
    if not process.is_main_process:  # the evaluation is one process's (it samples no training data)
        return summary
    summary.update(compare_stage(p, stages, console))
    timed("eval")
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
