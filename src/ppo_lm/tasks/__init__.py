"""The worked applications. A task is a dataset recipe (real public data in, prompt files out), a reward, and the
metric that says whether a model got better at it; its example configs live in ``examples/<task>/``.

=====================  =====================================================================================
``qa``                 question answering: reading comprehension with a reference answer; EM and token F1
``text_generation``    steerable continuation: positive story continuations; reward, KL, diversity, fluency
``sentiment_analysis`` the policy reads a text and answers ``positive`` or ``negative``; accuracy
``dialogue``           the InstructGPT recipe on HH-RLHF: SFT, a pairwise reward model, PPO; reward-model preference
=====================  =====================================================================================

``ppo-lm prepare TASK --assets DIR --out DIR`` writes the task's files (``sft.jsonl`` where the task has an SFT
stage, ``train.jsonl`` with the PPO prompts, ``heldout.jsonl`` for evaluation); ``ppo-lm eval`` reports the task's
metric when the config says ``task: NAME``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data import load_records
from ..errors import UserError, closest_name
from . import dialogue, qa, sentiment_analysis, text_generation


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
    for m in (qa, text_generation, sentiment_analysis, dialogue)
}


def unknown(name: str) -> str:
    """What is wrong with a task name that is not registered, with a did-you-mean when one is close."""
    close = closest_name(name, list(TASKS))
    return f"unknown task {name!r} " + (f"(did you mean '{close}'?)" if close else f"(known: {', '.join(TASKS)})")


def get(name: str, field: str = "task") -> Task:
    if name not in TASKS:
        raise UserError(unknown(name), field)
    return TASKS[name]


#: Written last by :func:`prepare`: which task and source the files are, and a digest of their records, so that
#: stale files are not reused (files of another task or source, or written by an older recipe).
MANIFEST = "PREPARED.json"


def serialise(files: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Each file's lines as :func:`prepare` writes them: one JSON record a line."""
    return {fname: [json.dumps(r, ensure_ascii=False) + "\n" for r in records] for fname, records in files.items()}


def digest(lines: dict[str, list[str]]) -> str:
    """A SHA-256 of every file's lines (what :func:`serialise` gives and :func:`prepare` writes)."""
    h = hashlib.sha256()
    for fname in sorted(lines):
        h.update(fname.encode() + b"\0")
        h.update("".join(lines[fname]).encode())
    return h.hexdigest()


def prepare(name: str, assets: str | Path, out: str | Path, *, source: str | None = None,
            fields: tuple[str, str] = ("--assets", "--source")) -> dict[str, int]:
    """Write the task's jsonl files into ``out`` (each atomically: a temporary file, then a rename), then
    ``PREPARED.json``. Returns the number of records per file. ``fields`` name the assets and source settings
    in error messages (command-line flags, or the pipeline's keys)."""
    task = get(name)
    source = source or task.sources[0]
    if source not in task.sources:
        raise UserError(f"task {name!r} has no source {source!r} (known: {', '.join(task.sources)})", fields[1])
    assets = Path(assets).expanduser()
    if not assets.is_dir():
        raise UserError(f"no such directory: {assets} (the folder with the public datasets, e.g. ../shared/assets)",
                        fields[0])
    try:
        files = task.build(assets, source)
    except KeyError as e:
        raise UserError(f"a record of the {name} data lacks the field {e.args[0]!r}", f"{fields[0]} {assets}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # until the new one is written, the folder counts as unprepared
    lines = serialise(files)
    for fname, text in lines.items():
        tmp = out / f".{fname}.tmp-{os.getpid()}"
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(text)
        tmp.replace(out / fname)
    counts = {fname: len(text) for fname, text in lines.items()}
    (out / MANIFEST).write_text(json.dumps({"task": name, "source": source, "records": counts,
                                            "digest": digest(lines)}) + "\n")
    return counts


def prepared(out: str | Path, name: str, source: str | None, assets: str | Path | None = None) -> bool:
    """Whether ``out`` holds complete files of this task and source (as :func:`prepare` leaves them). With
    ``assets``, also whether they are what the recipe makes from those assets now: the records are built again (data
    only, well under a second) and their digest compared, so that files an older recipe wrote are not reused."""
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    source = source or get(name).sources[0]
    if not (manifest.get("task") == name and manifest.get("source") == source
            and all((Path(out) / f).is_file() for f in manifest.get("records", {}))):
        return False
    return assets is None or manifest.get("digest") == digest(serialise(get(name).build(Path(assets).expanduser(),
                                                                                  source)))


def read_jsonl(path: Path) -> list[dict]:
    """A public data file of the assets folder; a missing or malformed one is a clear error naming it."""
    return load_records(str(path), field="assets")
