"""Checkpoints that survive crashes: atomic writes, checksums, keep-last-N, and everything needed to resume
a run exactly (model, optimiser, scheduler, KL controller, reward statistics, RNG states, data position).

Layout under ``output_dir/checkpoints``::

    ckpt-000010/            one complete checkpoint (written as ckpt-000010.tmp-PID, then renamed)
        model.safetensors   trainable module state (policy, LoRA adapters, value head, critic)
        optimizer.pt        torch.save of the optimiser state (loaded with weights_only=True)
        scheduler.pt
        rng.pt              python / numpy / torch / update-shuffle generator states
        state.json          iteration, KL controller, reward statistics, sampler position, counters
        config.yaml         the run's config
        engine/             under DeepSpeed: its own checkpoint of the model and optimiser, each process's shards
        MANIFEST.json       sha256 and size of every file above, the package version; written last
    latest                  the name of the newest complete checkpoint (replaced atomically)

A checkpoint without a valid MANIFEST, or whose files do not match it, is skipped with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from .errors import UserError

CKPT_PREFIX = "ckpt-"


@dataclass
class Checkpoint:
    path: Path
    iteration: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
        # this process's own device only: every process reading all devices' states would open a CUDA context
        # on each of them
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == 1:
            torch.cuda.set_rng_state(state["cuda"][0])
        else:  # written before ppo-lm saved the current device's state alone
            torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


def save(root: Path, iteration: int, *, model_state: dict, optimizer_state: dict, scheduler_state: dict,
         trainer_state: dict, rng: dict, config: dict, version: str, keep: int, process_rngs: list[dict] = (),
         write_hook: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``iteration`` atomically and keep only the newest ``keep``. ``rng`` is the RNG state of
    process 0 (``rng.pt``), ``process_rngs`` those of processes 1, 2, ... (``rng-process1.pt``, ...). A failure
    (disk full, ...) removes the partial directory and raises :class:`UserError`; older checkpoints stay valid."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    name = f"{CKPT_PREFIX}{iteration:06d}"
    final, tmp = root / name, root / f"{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        for rank, state in enumerate(process_rngs, start=1):
            torch.save(state, tmp / f"rng-process{rank}.pt")
        _write_json(tmp / "state.json", trainer_state)
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        if write_hook is not None:
            write_hook(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for p in files:
            with p.open("rb") as f:
                os.fsync(f.fileno())
        manifest = {"iteration": iteration, "version": version,
                    "files": {p.relative_to(tmp).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                              for p in files}}
        _write_json(tmp / "MANIFEST.json", manifest)  # last: its presence marks the checkpoint complete
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
        pointer = root / f"latest.tmp-{os.getpid()}"
        pointer.write_text(name + "\n")
        pointer.replace(root / "latest")
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise UserError(f"could not write checkpoint {final}: {reason}; earlier checkpoints are intact",
                        "train.checkpoint_every") from None
    for old in list_checkpoints(root)[keep:]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Checkpoint directories (complete or not), newest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        suffix = p.name[len(CKPT_PREFIX):]
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and suffix.isdigit():
            out.append(Checkpoint(p, int(suffix)))
    return sorted(out, key=lambda c: c.iteration, reverse=True)


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    manifest_path = path / "MANIFEST.json"
    if not manifest_path.is_file():
        return "no MANIFEST.json (it was never completed)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, OSError):
        return "MANIFEST.json is unreadable"
    for name, meta in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"] or file_sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum (truncated or altered)"
    return None


def newest_valid(root: Path, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest intact checkpoint; damaged ones are skipped with a warning."""
    for ckpt in list_checkpoints(root):
        problem = verify(ckpt.path)
        if problem is None:
            return ckpt
        warn(f"skipping damaged checkpoint {ckpt.path}: {problem}")
    return None


def load(path: Path) -> dict:
    """Everything in a checkpoint; tensors with ``weights_only=True`` (no arbitrary pickles)."""
    from safetensors.torch import load_file

    return {
        "model": load_file(str(path / "model.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
        "rng": torch.load(path / "rng.pt", weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
        "config": yaml.safe_load((path / "config.yaml").read_text()),
        "manifest": json.loads((path / "MANIFEST.json").read_text()),
    }


# Config fields that may change between a run and its resumption without breaking exactness.
RESUME_SAFE = {"train.iterations", "train.output_dir", "train.progress", "train.log_samples",
               "train.log_samples_every", "train.log_with", "train.checkpoint_every", "train.keep_checkpoints",
               "train.resume", "train.save_final"}


def incompatible_fields(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of config fields whose values differ in a way that breaks exact resume."""
    out = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += incompatible_fields(a, b, dotted + ".")
        elif a != b and dotted not in RESUME_SAFE:
            out.append(dotted)
    return out


def find_resume(out: Path, current_config: dict, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest intact checkpoint under ``out/checkpoints`` whose config allows an exact resume of a run with
    ``current_config``; None (with a warning) when there is none; a :class:`UserError` naming the fields when
    the config changed in a way that breaks exact resume."""
    found = newest_valid(out / "checkpoints", warn)
    if found is None:
        warn(f"no complete checkpoint in {out / 'checkpoints'}; starting from scratch")
        return None
    from .config import migrate_renamed

    saved = migrate_renamed(yaml.safe_load((found.path / "config.yaml").read_text()), str(found.path))
    differ = incompatible_fields(saved, current_config)
    if differ:
        raise UserError(f"the config differs from the checkpoint's in {', '.join(differ)}, which breaks exact "
                        f"resume; restore those values or use a new train.output_dir", str(found.path))
    return found


def _load_weights(path: Path, saved: dict, model: torch.nn.Module) -> None:
    missing = set(saved) ^ {k for k, p in model.named_parameters() if p.requires_grad}
    if missing:
        raise UserError(f"checkpoint parameters do not match the model ({len(missing)} names differ, e.g. "
                        f"{sorted(missing)[0]})", str(path))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def processes(path: Path) -> int:
    """How many processes wrote the checkpoint (one RNG file each)."""
    return 1 + len(list(path.glob("rng-process*.pt")))


def engine_of(path: Path) -> str | None:
    """The engine whose own checkpoint is in ``path/engine``: "fsdp2" (torch's distributed checkpoint, with its
    ``.metadata``), "deepspeed", or None (no engine/: the optimiser state is ``optimizer.pt``)."""
    folder = path / "engine"
    if not folder.is_dir():
        return None
    return "fsdp2" if (folder / ".metadata").exists() else "deepspeed"


def restore(found: Checkpoint, model: torch.nn.Module, optimizer, scheduler, trainer_state, generator,
            metrics_path: Path, *, rank: int = 0, world: int = 1, warn=print,
            engine: str | None = None, load_engine: Callable[[Path], None] | None = None) -> list[dict]:
    """Load a checkpoint into the live objects (the model's trainable parameters, optimiser, scheduler, the
    trainer's state object, this process's RNGs); cut ``metrics_path`` back to the checkpoint's iteration
    (process 0 only) and return its rows. Under a sharding ``engine`` ("deepspeed" or "fsdp2"), ``load_engine``
    loads the model and optimiser from the checkpoint's ``engine/`` instead. A run resumed on another number of
    processes than wrote the checkpoint goes on, but not exactly as it would have (a warning says so)."""
    from .tracking import read_metrics

    data = load(found.path)
    written = engine_of(found.path)
    if written != engine:
        names = {None: "without a sharding engine", "deepspeed": "under DeepSpeed", "fsdp2": "under FSDP2"}
        raise UserError(f"the checkpoint was written {names[written]}, and this run is {names[engine]}: its "
                        "optimiser state is kept in another form; resume with the launch that wrote it",
                        str(found.path))
    if load_engine is not None:
        load_engine(found.path / "engine")
    else:
        _load_weights(found.path, data["model"], model)
        optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    trainer_state.load_state_dict(data["state"])
    written_by = processes(found.path)
    if written_by != world and rank == 0:
        warn(f"warning: {found.path} was written by {written_by} process(es) and this run has {world}: it goes on "
             "from there, but not exactly as an uninterrupted run would (the batch splits and samples differ)")
    own = found.path / f"rng-process{rank}.pt"
    if rank == 0:
        set_rng_state(data["rng"], generator)
    elif own.exists():
        set_rng_state(torch.load(own, weights_only=True), generator)
    rows = []
    if metrics_path.exists():
        rows = [r for r in read_metrics(metrics_path) if r.get("iteration", 0) <= trainer_state.iteration]
        if rank == 0:
            tmp = metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(metrics_path)
    return rows
