"""Seconds per PPO/GRPO iteration of a TRL trainer, timed from outside TRL (shared by the TRL side of the
benchmarks; run in the TRL venv)."""

import time

from transformers import TrainerCallback


class IterationTimer(TrainerCallback):
    """An iteration is ``steps_per_iteration`` optimiser steps (epochs x minibatches of one batch of samples): its
    time runs from the previous iteration's last ``on_step_end`` (the first from ``on_train_begin``), so it holds
    the sampling, scoring and update of that batch."""

    def __init__(self, steps_per_iteration: int, echo: bool = False):
        self.steps_per_iteration, self.echo = steps_per_iteration, echo
        self.start, self.times = None, []

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.steps_per_iteration == 0:
            now = time.perf_counter()
            self.times.append(now - self.start)
            if self.echo:
                print(f"[bench] iteration {len(self.times)}: {self.times[-1]:.2f}s", flush=True)
            self.start = now
