"""What a training process needs around the algorithm: seeding, the output folder check, and stopping cleanly
on SIGINT/SIGTERM."""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch

from .errors import UserError


def cache_root() -> Path:
    """Where ppo-lm keeps what it builds once and reuses (the demo model, models converted from GGUF):
    ``$PPO_LM_CACHE``, else ``$XDG_CACHE_HOME/ppo-lm``, else ``~/.cache/ppo-lm``."""
    root = os.environ.get("PPO_LM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ppo-lm")
    return Path(root).expanduser()


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


class StopOnSignal:
    """SIGINT/SIGTERM ask the loop to finish the current iteration, checkpoint and return (``requested`` names
    the signal); a second signal interrupts at once. Outside the main thread it installs nothing."""

    def __enter__(self):
        self.requested: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: give up now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
