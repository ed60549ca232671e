"""``ppo-lm pipeline CONFIG``: SFT -> reward model -> PPO -> evaluation in one command.

The pipeline config names a config file per stage; the pipeline wires them together: the SFT model becomes the
PPO policy (and the reward model's starting point unless that config names its own), and the reward model is
added to the PPO reward sources. Each stage writes under ``output_dir/<stage>`` and is skipped when its
``summary.json`` (or, for PPO, ``final/``) already exists; an interrupted PPO stage resumes from its newest
checkpoint. Every stage config is loaded and validated before the first model is.

```yaml
output_dir: runs/pipeline
sft: examples/x_sft.yaml            # optional
reward_model: examples/x_rm.yaml    # optional
reward_model_weight: 1.0
ppo: examples/x_ppo.yaml            # required
eval_limit: 64                      # prompts for the before/after evaluation (null = all)
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import RewardModelConfig, SFTConfig, load_config
from .errors import ConfigError


@dataclass
class PipelineConfig:
    #: Root folder; stages write to output_dir/sft, /reward_model, /ppo, /eval.
    output_dir: str = "runs/pipeline"
    #: SFT stage config (null = no SFT; PPO starts from its own model.name_or_path).
    sft: str | None = None
    #: Reward-model stage config (null = PPO uses only its own reward sources).
    reward_model: str | None = None
    #: Weight of the trained reward model among the PPO reward sources.
    reward_model_weight: float = 1.0
    #: PPO stage config (required).
    ppo: str = ""
    #: Prompts of the PPO data used for the before/after evaluation (null = all).
    eval_limit: int | None = 64


def _stage_config(path: str | None, field: str, source: str):
    if path and not Path(path).is_file():
        raise ConfigError(field, f"no such file: {path}", source)
    return path


def plan(config_path: str, overrides: list[str] = ()) -> dict:
    """Load and validate every stage's config, wired together; no model is loaded."""
    from .config import _apply_override, _Builder, _compose  # the same YAML rules as every other config

    text = Path(config_path).read_text(encoding="utf-8") if Path(config_path).is_file() else None
    if text is None:
        raise ConfigError("config", f"no such file: {config_path}", config_path)
    raw = _compose(text, config_path)
    for item in overrides:
        _apply_override(raw, item)
    p = _Builder(config_path).build(PipelineConfig, raw, "", None)
    if not p.ppo:
        raise ConfigError("ppo", "the pipeline needs a PPO stage config", config_path)
    root = Path(p.output_dir)
    stages: dict = {"root": root, "pipeline": p}
    sft_final = root / "sft" / "final"
    if _stage_config(p.sft, "sft", config_path):
        stages["sft"] = load_config(p.sft, [f"train.output_dir={root / 'sft'}"], schema=SFTConfig)
    policy = str(sft_final) if "sft" in stages else None
    if _stage_config(p.reward_model, "reward_model", config_path):
        rm_over = [f"train.output_dir={root / 'reward_model'}"]
        rm = load_config(p.reward_model, rm_over, schema=RewardModelConfig, check_paths=policy is None)
        stages["reward_model"] = rm
    _stage_config(p.ppo, "ppo", config_path)
    ppo_over = [f"train.output_dir={root / 'ppo'}", "train.resume=auto"]
    if policy:
        ppo_over.append(f"model.name_or_path={policy}")
    ppo = load_config(p.ppo, ppo_over, check_paths=policy is None)
    if "reward_model" in stages:
        from .config import RewardSourceConfig

        ppo.reward.sources.append(RewardSourceConfig(type="model", path=str(root / "reward_model" / "final"),
                                                     weight=p.reward_model_weight))
    stages["ppo"] = ppo
    stages["start_model"] = policy or ppo.model.name_or_path
    return stages


def run(config_path: str, overrides: list[str] = (), *, console=None) -> dict:
    from rich.console import Console

    from . import evaluate, reward_model, sft
    from .trainer import train

    console = console or Console(stderr=True, soft_wrap=True)
    stages = plan(config_path, overrides)
    root: Path = stages["root"]
    done = lambda name: (root / name / "summary.json").exists()  # noqa: E731
    summary: dict = {}
    if "sft" in stages:
        if done("sft"):
            console.print(f"[sft] skipped: {root / 'sft' / 'summary.json'} exists")
        else:
            console.print("[sft] supervised fine-tuning")
            sft.run(stages["sft"], console=console)
        summary["sft"] = json.loads((root / "sft" / "summary.json").read_text())
    if "reward_model" in stages:
        rm = stages["reward_model"]
        if "sft" in stages and rm.model.name_or_path == stages["sft"].model.name_or_path:
            rm.model.name_or_path = str(root / "sft" / "final")  # start the RM from the SFT model
        if done("reward_model"):
            console.print(f"[reward_model] skipped: {root / 'reward_model' / 'summary.json'} exists")
        else:
            console.print("[reward_model] training the reward model")
            reward_model.run(rm, console=console)
        summary["reward_model"] = json.loads((root / "reward_model" / "summary.json").read_text())
    ppo = stages["ppo"]
    if (root / "ppo" / "final" / "config.json").exists():
        console.print(f"[ppo] skipped: {root / 'ppo' / 'final'} exists")
    else:
        console.print("[ppo] PPO (resumes from its newest checkpoint if there is one)")
        result = train(ppo, console=console)
        if result.interrupted:
            summary["ppo"] = {"interrupted": True, "checkpoint": str(result.checkpoint)}
            return summary
    console.print("[eval] before/after on the PPO prompts")
    result = evaluate.compare(ppo, stages["start_model"], str(root / "ppo" / "final"),
                              limit=stages["pipeline"].eval_limit)
    evaluate.write(result, root / "eval", "compare")
    console.print(evaluate.markdown_table(result))
    summary["eval"] = {r["metric"]: {"before": r["before"], "after": r["after"]} for r in result["rows"]}
    summary["report"] = str(root / "eval" / "compare.md")
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
