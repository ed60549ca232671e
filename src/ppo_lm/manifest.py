"""``manifest.json``: what a run ran with, written once into its output_dir as it starts.

Package versions, the git commit of the working directory (and whether it had uncommitted changes), a hash of
the config, a fingerprint of the prompts, the seed, the device and CPU kernel path, the number of processes, and
the command line. Two runs whose manifests agree ran the same thing; ``ppo-lm doctor`` and ``ppo-lm report``
show it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("ppo-lm", "torch", "transformers", "accelerate", "peft", "datasets", "safetensors")


def sha256_json(value) -> str:
    """The sha256 of ``value`` as canonical JSON (sorted keys, no spaces): equal for equal contents."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def data_fingerprint(records: list[dict]) -> dict:
    """The records' count and content hash: the same prompts in the same order give the same fingerprint."""
    return {"records": len(records), "sha256": sha256_json(records)}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_state(cwd: str | Path = ".") -> dict | None:
    """The commit checked out in ``cwd`` and whether tracked files differ from it; None outside a git work tree
    (or without git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def cpu_capability() -> str:
    """The kernel path PyTorch uses on the CPU (avx512, avx2, default, ...; ATEN_CPU_CAPABILITY selects it)."""
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability().lower()
    except AttributeError:  # an older torch
        return "unknown"


def build(config: dict, records: list[dict], *, seed: int, device: str, processes: int, mixed_precision: str,
          deterministic: bool, argv: list[str] | None = None) -> dict:
    import torch

    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(sys.argv if argv is None else argv),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "versions": versions(),
        "git": git_state(),
        "config_sha256": sha256_json(config),
        "data": data_fingerprint(records),
        "seed": seed,
        "device": device,
        "cuda": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "cpu_capability": cpu_capability(),
        "processes": processes,
        "mixed_precision": mixed_precision,
        "deterministic": deterministic,
        "threads": torch.get_num_threads(),
    }


def write(out_dir: Path, manifest: dict) -> Path:
    """Write ``manifest.json`` through a temporary file, so that a crash never leaves half of one."""
    path = Path(out_dir) / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)
    return path


def read(run_dir: Path) -> dict:
    path = Path(run_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@contextlib.contextmanager
def deterministic(on: bool):
    """``train.deterministic``: PyTorch's deterministic algorithms for the block (an operation without one warns
    rather than stops the run), and the setting as it was afterwards; cuBLAS needs its workspace set for them,
    before its first use. Off: the block runs with whatever the caller set."""
    import torch

    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
