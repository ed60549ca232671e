"""The worked applications. A task is a dataset recipe (real public data in, prompt files out), a reward, and the
metric that says whether a model got better at it; its example configs live in ``examples/<task>/``.

=====================  =====================================================================================
``qa``                 question answering: reading comprehension with a reference answer; EM and token F1
``text_generation``    steerable continuation: positive story continuations; reward, KL, diversity, fluency
``sentiment_analysis`` the policy reads a text and answers ``positive`` or ``negative``; accuracy
=====================  =====================================================================================

``ppo-lm prepare TASK --assets DIR --out DIR`` writes the task's files (``sft.jsonl`` where the task has an SFT
stage, ``train.jsonl`` with the PPO prompts, ``heldout.jsonl`` for evaluation); ``ppo-lm eval`` reports the task's
metric when the config says ``task: NAME``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from . import qa, sentiment_analysis, text_generation


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    #: (assets folder, source name) -> {file name: records}; pure, deterministic.
    build: Callable[[Path, str], dict[str, list[dict]]]
    #: (completions, dataset fields) -> {metric: value}; the task's own measure of success.
    metrics: Callable[[list[str], dict[str, list]], dict[str, float]]
    #: The data sources the recipe knows (the first is the default).
    sources: tuple[str, ...]
    #: The pipeline config that runs the application end to end.
    example: str


TASKS: dict[str, Task] = {
    m.NAME: Task(m.NAME, m.SUMMARY, m.build, m.metrics, m.SOURCES, f"examples/{m.NAME}/pipeline.yaml")
    for m in (qa, text_generation, sentiment_analysis)
}


def get(name: str, field: str = "task") -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r} (known: {', '.join(TASKS)})", field)
    return TASKS[name]


def prepare(name: str, assets: str | Path, out: str | Path, *, source: str | None = None) -> dict[str, int]:
    """Write the task's jsonl files into ``out`` (each atomically: a temporary file, then a rename). Returns the
    number of records per file."""
    task = get(name)
    source = source or task.sources[0]
    if source not in task.sources:
        raise UserError(f"task {name!r} has no source {source!r} (known: {', '.join(task.sources)})", "--source")
    assets = Path(assets).expanduser()
    if not assets.is_dir():
        raise UserError(f"no such directory: {assets} (the folder with the public datasets, e.g. ../shared/assets)",
                        "--assets")
    files = task.build(assets, source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for fname, records in files.items():
        tmp = out / f".{fname}.tmp-{os.getpid()}"
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        tmp.replace(out / fname)
    return {fname: len(records) for fname, records in files.items()}


def read_jsonl(path: Path) -> list[dict]:
    """A public data file of the assets folder; a missing one is a clear error naming it."""
    if not path.is_file():
        raise UserError(f"no such file: {path}", "--assets")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
