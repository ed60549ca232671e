"""Crashes, damaged checkpoints, NaN guards and signals: real subprocesses, real SIGKILL/SIGTERM."""

import errno
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppo_lm import algo, checkpoint as ckpt
from ppo_lm.errors import TrainingDiverged, UserError
from ppo_lm.trainer import train

from conftest import prompt_records, tiny_config, without_timing
from test_cli import ENV, ppo_lm


def write_run(tmp_path: Path, model_dir: Path, name: str, iterations: int, extra: str = "") -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_records(24)))
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""model: {{name_or_path: {model_dir}}}
data: {{path: {data}}}
rollout: {{batch_size: 8, max_new_tokens: 6}}
reward:
  sources: [{{type: keyword, words: [a]}}]
ppo: {{lr: 3.0e-3, num_minibatches: 2, kl: {{coef: 0.01}}}}
train: {{output_dir: {tmp_path / name}, iterations: {iterations}, progress: false, log_samples: 0,
         checkpoint_every: 1, keep_checkpoints: 2, seed: 3}}
{extra}""")
    return cfg


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return without_timing(rows)


def popen(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "ppo_lm.cli", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(path: Path, n: int, proc, timeout: float = 300) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for metrics")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    iterations = 10
    ref_cfg = write_run(tmp_path, tiny_model_dir, "straight", iterations)
    done = ppo_lm("train", ref_cfg, cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    cfg = write_run(tmp_path, tiny_model_dir, "killed", iterations)
    rng = random.Random()  # a random moment, as the issue asks; the seed is printed on failure
    at_rows, delay = rng.randint(2, 6), rng.uniform(0.0, 0.4)
    proc = popen("train", cfg, cwd=tmp_path)
    wait_for_rows(tmp_path / "killed" / "metrics.jsonl", at_rows, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it was killed (rows={at_rows}, delay={delay})"
    assert not (tmp_path / "killed" / "final").exists()

    resumed = ppo_lm("train", cfg, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert [r["iteration"] for r in b] == list(range(1, iterations + 1))  # no duplicates, no gaps
    assert a == b, f"killed at {at_rows} rows + {delay:.2f}s"
    wa = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(ckpt.list_checkpoints(tmp_path / "killed" / "checkpoints")) == 2  # keep_checkpoints


def test_damaged_checkpoints_are_skipped(tiny_model_dir, tmp_path):
    cfg = write_run(tmp_path, tiny_model_dir, "run", 3, extra="")
    first = ppo_lm("train", cfg, "train.keep_checkpoints=3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    root = tmp_path / "run" / "checkpoints"
    assert [c.iteration for c in ckpt.list_checkpoints(root)] == [3, 2, 1]
    assert (root / "latest").read_text().strip() == "ckpt-000003"
    weights = root / "ckpt-000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated, as by a crash mid-write
    (root / "ckpt-000004.tmp-999").mkdir()  # a partly written one that never got its manifest
    (root / "ckpt-000005").mkdir()
    resumed = ppo_lm("train", cfg, "train.keep_checkpoints=3", "train.iterations=4", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping damaged checkpoint" in resumed.stderr and "ckpt-000003" in resumed.stderr
    assert "no MANIFEST.json" in resumed.stderr  # ckpt-000005
    assert "resuming from" in resumed.stderr and "ckpt-000002" in resumed.stderr
    assert [r["iteration"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_config_change_that_breaks_exact_resume_is_refused(tiny_model_dir, tmp_path):
    cfg = write_run(tmp_path, tiny_model_dir, "run", 2)
    assert ppo_lm("train", cfg, cwd=tmp_path).returncode == 0
    run = ppo_lm("train", cfg, "ppo.lr=1e-2", "rollout.temperature=0.5", "--resume", cwd=tmp_path)
    assert run.returncode == 2
    line = run.stderr.strip().splitlines()[-1]
    assert "ppo.lr" in line and "rollout.temperature" in line and "breaks exact resume" in line


def test_nan_reward_at_iteration_3_stops_with_a_clear_message(tiny_model_dir, tmp_path):
    cfg = write_run(tmp_path, tiny_model_dir, "run", 6, extra="")
    (tmp_path / "flaky.py").write_text(
        "calls = 0\n"
        "def reward(prompts, completions, **fields):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    return [float('nan') if calls == 3 else 1.0 for _ in completions]\n")
    run = ppo_lm("train", cfg, "reward.sources=[{type: python, function: 'flaky:reward'}]", cwd=tmp_path)
    assert run.returncode == 2
    line = run.stderr.strip().splitlines()[-1]
    assert "reward.sources.0 (python: flaky:reward)" in line and "non-finite score" in line and "iteration 3" in line
    assert "Traceback" not in run.stderr
    assert [r["iteration"] for r in metrics(tmp_path / "run")] == [1, 2]  # complete lines only
    assert ckpt.newest_valid(tmp_path / "run" / "checkpoints", print).iteration == 2


def test_nonfinite_loss_is_skipped_then_aborts(tiny_model_dir, tmp_path, monkeypatch):
    real = algo.policy_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan"), stats) if calls["n"] in nan_calls else (loss, stats)

    monkeypatch.setattr(algo, "policy_loss", sometimes_nan)
    nan_calls = {3}
    cfg = tiny_config(tiny_model_dir, tmp_path / "one", train={"iterations": 2, "checkpoint_every": 0})
    result = train(cfg, records=prompt_records())
    assert result.metrics[-1]["nonfinite_skips"] == 1  # skipped, logged, training went on
    assert all(torch.isfinite(p).all() for p in result.policy.parameters())

    calls["n"] = 0
    nan_calls = set(range(5, 100))
    cfg = tiny_config(tiny_model_dir, tmp_path / "many", ppo={"lr": 3e-3, "num_minibatches": 2, "max_nonfinite_steps": 3},
                      train={"iterations": 3, "checkpoint_every": 0})
    with pytest.raises(TrainingDiverged, match=r"3 updates in a row had a non-finite value \(first: policy_loss"):
        train(cfg, records=prompt_records())


def test_kl_limit_stops_or_warns(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "stop", ppo={"lr": 3e-2, "num_minibatches": 2,
                                                              "kl": {"limit": 1e-6, "limit_action": "stop"}},
                      train={"iterations": 5, "checkpoint_every": 0})
    with pytest.raises(TrainingDiverged, match=r"over ppo.kl.limit"):
        train(cfg, records=prompt_records())


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_0(tiny_model_dir, tmp_path):
    cfg = write_run(tmp_path, tiny_model_dir, "run", 200, extra="")
    proc = popen("train", cfg, "train.checkpoint_every=0", cwd=tmp_path)
    wait_for_rows(tmp_path / "run" / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Resume with: ppo-lm train" in stderr and "--resume" in stderr
    done = len(metrics(tmp_path / "run"))
    assert done < 200
    assert ckpt.newest_valid(tmp_path / "run" / "checkpoints", print).iteration == done
    resumed = ppo_lm("train", cfg, "train.checkpoint_every=0", f"train.iterations={done + 1}", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["iteration"] for r in metrics(tmp_path / "run")] == list(range(1, done + 2))


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path):
    root = tmp_path / "checkpoints"
    common = dict(model_state={"w": torch.ones(2)}, optimizer_state={}, scheduler_state={}, trainer_state={},
                  rng=ckpt.rng_state(torch.Generator()), config={}, version="test", keep=2)
    ckpt.save(root, 1, **common)

    def disk_full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=r"could not write checkpoint .*ckpt-000002: disk full; earlier checkpoints"):
        ckpt.save(root, 2, write_hook=disk_full, **common)
    assert [c.iteration for c in ckpt.list_checkpoints(root)] == [1]
    assert ckpt.verify(root / "ckpt-000001") is None
    assert not list(root.glob("*.tmp-*"))  # nothing half-written left behind


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(5)
    state = ckpt.rng_state(g)
    torch.save(state, "/dev/null")  # must be plain tensors/containers
    a = (random.random(), __import__("numpy").random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    ckpt.set_rng_state(state, g)
    b = (random.random(), __import__("numpy").random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    assert a == b


class _ScalerOnCPU:
    """An ``Accelerator`` that does fp16 loss scaling as on a GPU (accelerate gives the CPU no grad scaler): a real
    ``torch.amp.GradScaler`` on the CPU, the forward kept in fp32, accelerate's process-wide state left at "no"
    mixed precision (it is a singleton that later tests share). Growth is off, so the scale moves only when an
    overflow backs it off (x0.5)."""

    @staticmethod
    def install(monkeypatch, init_scale=1024.0):
        import contextlib

        import accelerate

        class Accelerator(accelerate.Accelerator):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**9)
                made.append(self)

            def prepare(self, *args, **kwargs):
                prepared = super().prepare(*args, **kwargs)
                self.native_amp = True  # from here on: unscale_gradients unscales, as with fp16 on a GPU
                return prepared

            @property
            def mixed_precision(self):
                return "fp16"

            def autocast(self, *args, **kwargs):
                return contextlib.nullcontext()

        made = []
        monkeypatch.setattr(accelerate, "Accelerator", Accelerator)
        return made


def _overflowing_gradients(monkeypatch, on_calls):
    """The value head's gradient is inf on the backward passes numbered in ``on_calls`` (an fp16 overflow)."""
    import ppo_lm.trainer as trainer

    real, calls = trainer.load_policy, {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] in on_calls else grad

    def load_policy(*args, **kwargs):
        policy = real(*args, **kwargs)
        policy.value_head.summary.weight.register_hook(hook)
        return policy

    monkeypatch.setattr(trainer, "load_policy", load_policy)


def test_fp16_overflow_backs_the_scaler_off_and_training_goes_on(tiny_model_dir, tmp_path, monkeypatch):
    made = _ScalerOnCPU.install(monkeypatch)
    _overflowing_gradients(monkeypatch, on_calls={2})
    cfg = tiny_config(tiny_model_dir, tmp_path / "one", train={"iterations": 2, "checkpoint_every": 0})
    result = train(cfg, records=prompt_records())  # skipping by hand left the scaler unscaled: the next step raised
    scaler = made[0].scaler
    assert scaler.get_scale() == 512.0  # one overflow: backed off once
    assert result.metrics[-1]["nonfinite_skips"] == 1
    assert all(torch.isfinite(p).all() for p in result.policy.parameters())


def test_fp16_overflow_counts_as_divergence_only_once_the_scale_is_below_1(tiny_model_dir, tmp_path, monkeypatch):
    made = _ScalerOnCPU.install(monkeypatch, init_scale=4.0)
    _overflowing_gradients(monkeypatch, on_calls=set(range(1, 10**6)))
    cfg = tiny_config(tiny_model_dir, tmp_path / "many", ppo={"lr": 3e-3, "num_minibatches": 2, "max_nonfinite_steps": 3},
                      train={"iterations": 5, "checkpoint_every": 0})
    with pytest.raises(TrainingDiverged, match=r"3 updates in a row had a non-finite value \(first: gradient"):
        train(cfg, records=prompt_records())
    # 4 -> 2 -> 1: the scaler's own search (not counted); -> 0.5 -> 0.25 -> 0.125: three overflows that left the
    # scale below 1 (counted)
    assert made[0].scaler.get_scale() == 4.0 * 0.5 ** 5
