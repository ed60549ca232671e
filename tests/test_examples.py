"""Every config that ships in examples/ reads and validates as the command that runs it would read it, so a renamed
field or a bad value in a recipe fails here and not twenty minutes into `make results`. No model and no data are
needed: paths are not checked (the models and prepared data exist only after `make models` and `ppo-lm prepare`)."""
from pathlib import Path

import pytest

from ppo_lm import tasks
from ppo_lm.config import Config, load_config
from ppo_lm.pipeline import load_pipeline_config
from ppo_lm.reward_model import RewardModelConfig
from ppo_lm.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PIPELINES = sorted(EXAMPLES.rglob("pipeline.yaml"))
#: PPO configs run on their own (`ppo-lm train`), not from a pipeline.
STANDALONE = [EXAMPLES / "stories_sentiment.yaml"]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def stages(pipeline: Path) -> dict[str, tuple[Path, type]]:
    p = load_pipeline_config(str(pipeline))
    named = {"sft": (p.sft, SFTConfig), "reward_model": (p.reward_model, RewardModelConfig), "ppo": (p.ppo, Config)}
    return {field: (ROOT / path, schema) for field, (path, schema) in named.items() if path}


def test_the_examples_are_found():
    assert len(PIPELINES) >= 7, [rel(p) for p in PIPELINES]


@pytest.mark.parametrize("pipeline", PIPELINES, ids=rel)
def test_a_pipeline_and_each_of_its_stages_validate(pipeline, monkeypatch):
    monkeypatch.chdir(ROOT)  # stage paths in a pipeline are relative to the repository root
    p = load_pipeline_config(str(pipeline))
    if p.task is not None:
        assert p.source is None or p.source in tasks.TASKS[p.task].sources, p.source
    found = stages(pipeline)
    assert "ppo" in found
    for field, (path, schema) in found.items():
        assert path.is_file(), f"{rel(pipeline)}: {field}: no such file {path}"
        if schema is Config:
            load_config(path, check_paths=False, reward_given="reward_model" in found)
        else:
            load_config(path, check_paths=False, schema=schema)


@pytest.mark.parametrize("config", STANDALONE, ids=rel)
def test_a_standalone_ppo_config_validates(config):
    load_config(config, check_paths=False)


def test_every_example_config_is_exercised_here(monkeypatch):
    monkeypatch.chdir(ROOT)
    covered = set(PIPELINES) | set(STANDALONE)
    for pipeline in PIPELINES:
        covered |= {path for path, _ in stages(pipeline).values()}
    accelerate = set((EXAMPLES / "accelerate").glob("*.yaml"))  # read by accelerate; test_distributed loads them
    left = sorted(rel(p) for p in set(EXAMPLES.rglob("*.yaml")) - covered - accelerate)
    assert not left, f"example configs no test reads: {left}"
