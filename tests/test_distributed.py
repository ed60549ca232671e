"""Several processes under torchrun (a real gloo group on CPU): the same update as one process, one set of
files, decisions taken together, exact resume after SIGKILL, and launches that would not connect refused.

Every launch has a timeout, so that a hang fails the test instead of stalling the suite."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import prompt_records
from test_cli import ENV
from test_reliability import metrics, wait_for_rows, write_run

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# one thread a process: two processes share the two cores of the test machine
DIST_ENV = {**ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
LIMIT = 300  # seconds; a 2-process run of these sizes takes under a minute


def torchrun(*args, cwd, timeout=LIMIT, env=None):
    return subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**DIST_ENV, **(env or {})}, timeout=timeout)


#: The environment `accelerate launch` sets for examples/accelerate/fsdp2.yaml; on CPU, torchrun runs it.
FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
         "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false"}


def zero(stage: int) -> dict:
    """The environment `accelerate launch` sets for a DeepSpeed config of ZeRO ``stage``, on CPU."""
    return {"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage)}


def one_update(model_dir, out: Path, processes: int, *overrides, env=None) -> dict:
    script = HERE / "dist" / "one_update.py"
    cmd = [*TORCHRUN[:-1], "2", script] if processes == 2 else [sys.executable, script]
    done = subprocess.run([*map(str, cmd), model_dir, out, *overrides], capture_output=True, text=True,
                          env={**DIST_ENV, **(env or {})}, timeout=LIMIT, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    lr = float(done.stdout.split(" lr ")[-1].split()[0])
    return {**load_file(str(out)), "lr": torch.tensor(lr)}


@pytest.mark.parametrize("overrides", [
    (),  # whitening over the global batch, one minibatch, two epochs
    ("ppo.gradient_accumulation_steps=2", "reward.normalize=true", "ppo.whiten_rewards=true"),
    # a linear schedule over 4 iterations x 2 steps: its second step must be at 7/8 of lr on 2 processes too
    ("ppo.lr_schedule=linear", "train.iterations=4"),
    # critic-free: GRPO's groups stay whole on a process; REINFORCE++ whitens over the global batch, with a
    # per-sequence loss aggregation and the KL loss term over accumulated pieces
    ("ppo.advantage_estimator=grpo",),
    ("ppo.advantage_estimator=reinforce_pp", "ppo.loss_aggregation=seq_mean_token_mean", "ppo.kl.loss_coef=0.1",
     "ppo.gradient_accumulation_steps=2"),
], ids=["plain", "accumulation-normalize-whiten", "linear-schedule", "grpo", "reinforce_pp-seq-mean-kl-loss"])
def test_two_processes_make_the_same_update_as_one(tiny_model_dir, tmp_path, overrides):
    """2 processes x 8 prompts and 1 process x 16 prompts, the same sampled batch: the same weights after
    the update, to float tolerance (sums are taken in another order; Adam turns a rounding difference in a
    near-zero gradient into up to lr: 1.6e-4 was measured on one bias element on an AVX512 machine, so the bound is
    1e-3, where a wrong global statistic moves weights ~3e-2)."""
    one = one_update(tiny_model_dir, tmp_path / "one.safetensors", 1, *overrides)
    two = one_update(tiny_model_dir, tmp_path / "two.safetensors", 2, *overrides)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = max((one[k] - start[k.removeprefix("lm.")]).abs().max().item() for k in one
                if k.removeprefix("lm.") in start)
    if "ppo.lr_schedule=linear" in overrides:
        assert one["lr"].item() == pytest.approx(1e-2 * 6 / 8)  # 2 of 8 steps taken
    assert moved > 1e-3  # the update did something to compare
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-3, msg=k)  # wrong: ~3e-2


def reward_file(tmp_path: Path) -> Path:
    """A reward that differs by process: 0 on rank 0, 1 on rank 1 (the global mean is 0.5)."""
    path = tmp_path / "by_rank.py"
    path.write_text("import os\n\ndef score(prompts, completions, **fields):\n"
                    "    return [float(os.environ.get('RANK', '0'))] * len(completions)\n")
    return path


def python_reward(path: Path) -> list[str]:
    """Overrides that make the run's reward the function ``score`` in ``path``."""
    return ["reward.sources.0.type=python", f"reward.sources.0.function={path}:score", "reward.sources.0.words=[]"]


def test_two_processes_write_one_set_of_files_with_global_metrics(tiny_model_dir, tmp_path):
    cfg = write_run(tmp_path, tiny_model_dir, "run", 2)
    heldout = tmp_path / "heldout.jsonl"  # 5 prompts: 3 evaluated by rank 0 (reward 0), 2 by rank 1 (reward 1)
    heldout.write_text("".join(json.dumps(r) + "\n" for r in prompt_records(5)))
    evaluation = ["train.eval_every=1", f"eval.data={heldout}", "eval.best_metric=reward_mean", "train.log_samples=2"]
    done = torchrun("-m", "ppo_lm.cli", "train", cfg, *python_reward(reward_file(tmp_path)), *evaluation,
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [1, 2]  # one row an iteration, not one a process
    assert all(r["reward_mean"] == pytest.approx(0.5) for r in rows)  # both processes' scores
    assert all(r["samples_seen"] == 16 * r["iteration"] for r in rows)
    assert all(r["eval/reward_mean"] == pytest.approx(2 / 5) for r in rows)  # every held-out prompt, once
    assert all(isinstance(r["doctor"], list) for r in rows)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["data"]["records"] == 24
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in samples] == [1, 1, 2, 2]  # written once, not once a process
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["iteration"] == 1
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["ckpt-000001", "ckpt-000002"]
    assert (tmp_path / "run" / "checkpoints" / "ckpt-000002" / "rng-process1.pt").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # a loadable HF model
    assert done.stderr.count("resuming") == 0 and done.stdout.count("\n") < 5


@pytest.mark.parametrize("overrides, outcome", [
    (["ppo.epochs=4", "ppo.early_stop_kl=1e-6"], 0),
    (["ppo.lr=3e-2", "ppo.kl.limit=1e-3", "ppo.kl.limit_action=stop"], 1),
], ids=["early_stop_kl", "kl_limit"])
def test_decisions_from_values_that_differ_by_process_are_taken_together(tiny_model_dir, tmp_path, overrides, outcome):
    """Each process's own KL differs (its prompts do): the early stop and the KL limit act on the global value,
    on both processes at once. Before, one process stopped and the other waited for it forever."""
    cfg = write_run(tmp_path, tiny_model_dir, "run", 3)
    done = torchrun("-m", "ppo_lm.cli", "train", cfg, *overrides, cwd=tmp_path)
    assert done.returncode == outcome, done.stderr[-3000:]
    if outcome:
        assert "ppo.kl.limit" in done.stderr
    else:
        assert all(r["epochs_run"] < 4 for r in metrics(tmp_path / "run"))  # the early stop did act


def test_a_reward_failing_on_one_process_stops_both(tiny_model_dir, tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import os\n\ndef score(prompts, completions, **fields):\n"
                    "    bad = os.environ.get('RANK') == '1'\n"
                    "    return [float('nan') if bad else 0.0] * len(completions)\n")
    cfg = write_run(tmp_path, tiny_model_dir, "run", 3)
    done = torchrun("-m", "ppo_lm.cli", "train", cfg, *python_reward(path), cwd=tmp_path)
    assert done.returncode != 0
    assert "non-finite score" in done.stderr and "failed on another process" in done.stderr


def test_a_nonfinite_loss_on_one_process_is_skipped_by_both(tiny_model_dir, tmp_path):
    """A huge finite reward on one process makes its loss non-finite: both processes skip each update together
    and stop together with TrainingDiverged."""
    path = tmp_path / "huge.py"
    path.write_text("import os\n\ndef score(prompts, completions, **fields):\n"
                    "    return [3e38 if os.environ.get('RANK') == '1' else 0.0] * len(completions)\n")
    cfg = write_run(tmp_path, tiny_model_dir, "run", 3)
    done = torchrun("-m", "ppo_lm.cli", "train", cfg, *python_reward(path), "ppo.whiten_advantages=false",
                    "ppo.max_nonfinite_steps=3", cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "3 updates in a row had a non-finite value" in done.stderr


@pytest.mark.slow
def test_two_processes_sigkill_then_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    iterations = 6
    straight = torchrun("-m", "ppo_lm.cli", "train", write_run(tmp_path, tiny_model_dir, "straight", iterations),
                        cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    cfg = write_run(tmp_path, tiny_model_dir, "killed", iterations)
    rng = random.Random()
    at_rows, delay = rng.randint(1, 4), rng.uniform(0.0, 0.5)
    proc = subprocess.Popen([*TORCHRUN, "-m", "ppo_lm.cli", "train", str(cfg)], cwd=tmp_path, env=DIST_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_rows(tmp_path / "killed" / "metrics.jsonl", at_rows, proc, timeout=LIMIT)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, at once
    proc.wait(timeout=30)
    assert not (tmp_path / "killed" / "final").exists(), f"finished before the kill (rows={at_rows}, delay={delay})"
    resumed = torchrun("-m", "ppo_lm.cli", "train", cfg, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert [r["iteration"] for r in b] == list(range(1, iterations + 1))
    assert a == b, f"killed at {at_rows} rows + {delay:.2f}s"
    wa = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_accelerate_launch_that_runs_one_process_is_refused(tiny_model_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process on a machine without GPUs."""
    cfg = write_run(tmp_path, tiny_model_dir, "run", 1)
    done = subprocess.run([ACCELERATE, "launch", "--cpu", "--num_processes", "2",
                           "-m", "ppo_lm.cli", "train", str(cfg)], capture_output=True, text=True, cwd=tmp_path,
                          env=DIST_ENV, timeout=LIMIT)
    assert done.returncode == 2 or "exit status 2" in done.stderr, done.stderr[-3000:]
    assert "asked for 2 processes, but accelerate runs 1" in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_stage_data_is_shared_out_between_processes():
    """10 examples in micro-batches of 4 on 2 processes: 2+2, 2+2, 1+1, all of them once; 9 examples: the last
    micro-batch of 1 is filled with the first of the shuffle, so that both processes take 3 steps."""
    from ppo_lm.sft import OptimConfig, micro_batches

    optim = OptimConfig(batch_size=4, gradient_accumulation_steps=1)
    for n, sizes in ((10, [2, 2, 1]), (9, [2, 2, 1])):
        shares = [list(micro_batches(list(range(n)), optim, 0, list, rank, 2)(1)) for rank in (0, 1)]
        assert [len(b) for b in shares[0]] == sizes and len(shares[1]) == 3
        seen = [i for share in shares for batch in share for i in batch]
        assert sorted(set(seen)) == list(range(n)) and len(seen) == n + n % 2
        alone = [i for batch in micro_batches(list(range(n)), optim, 0, list)(1) for i in batch]
        assert sorted(alone) == list(range(n))


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["torchrun", "fsdp2", "zero3.yaml"])
def test_the_pipeline_on_two_processes_writes_one_set_of_files(tiny_model_dir, tmp_path, launch):
    """SFT -> reward model -> PPO -> evaluation under torchrun (DDP, and FSDP2) and under `accelerate launch` with
    ZeRO-3 (every stage's model sharded, saved whole): each stage trains on its share of the data and only process
    0 writes and prints."""
    from test_stages import write_pipeline

    if launch.endswith(".yaml"):
        pytest.importorskip("deepspeed")
    pipe = write_pipeline(tmp_path, tiny_model_dir, n_examples=32, n_prompts=16, batch_size=4)
    done = (accelerate_launch(launch, "pipeline", pipe, cwd=tmp_path) if launch.endswith(".yaml")
            else torchrun("-m", "ppo_lm.cli", "pipeline", pipe, cwd=tmp_path, env=FSDP2 if launch == "fsdp2" else {}))
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "p"
    for stage in ("sft", "reward_model"):
        rows = metrics(root / stage)
        assert [r["epoch"] for r in rows] == [0, 1, 2]  # one row an epoch, not one a process
        assert (root / stage / "final" / "config.json").exists()
    assert [r["iteration"] for r in metrics(root / "ppo")] == [1, 2]
    assert (root / "eval" / "compare.md").exists() and (root / "summary.json").exists()
    assert done.stderr.count("[sft] supervised fine-tuning") == 1 and done.stderr.count("epoch 2:") == 2  # sft, rm
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    sft = load_file(str(root / "sft" / "final" / "model.safetensors"))
    assert all(sft[k].shape == start[k].shape for k in start)  # whole, not ZeRO-3's shards


@pytest.mark.parametrize("name, engine, stage", [("ddp", "MULTI_GPU", None), ("zero2", "DEEPSPEED", 2),
                                                ("zero3", "DEEPSPEED", 3), ("zero3-offload", "DEEPSPEED", 3),
                                                ("fsdp2", "FSDP", None)])
def test_the_example_accelerate_configs_are_ones_accelerate_reads(name, engine, stage):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(HERE.parent / "examples" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.value == engine and cfg.num_processes == 2 and cfg.mixed_precision == "no"
    if engine == "FSDP":  # the variables the CPU tests give torchrun are the ones this file makes accelerate set
        fsdp = cfg.fsdp_config
        assert (fsdp["fsdp_version"], fsdp["fsdp_auto_wrap_policy"]) == (int(FSDP2["FSDP_VERSION"]),
                                                                        FSDP2["FSDP_AUTO_WRAP_POLICY"])
        assert str(fsdp["fsdp_reshard_after_forward"]).lower() == FSDP2["FSDP_RESHARD_AFTER_FORWARD"]
    if stage:
        assert cfg.deepspeed_config["zero_stage"] == stage
        assert (cfg.deepspeed_config["offload_param_device"] == "cpu") == name.endswith("offload")


def test_sigterm_to_one_process_stops_both_with_a_checkpoint(tiny_model_dir, tmp_path):
    """SIGTERM reaches rank 1 alone (as a scheduler may deliver it): both processes stop after the same
    iteration, process 0 writes the checkpoint, and the command exits 0 with the resume hint."""
    cfg = write_run(tmp_path, tiny_model_dir, "run", 200)
    proc = subprocess.Popen([*TORCHRUN, "-m", "ppo_lm.cli", "train", str(cfg), "train.checkpoint_every=0"],
                            cwd=tmp_path, env=DIST_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_rows(tmp_path / "run" / "metrics.jsonl", 2, proc, timeout=LIMIT)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        rank1 = next(p for p in workers if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes())
        os.kill(rank1, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Resume with: ppo-lm train" in stderr
    done = len(metrics(tmp_path / "run"))
    assert done < 200 and (tmp_path / "run" / "checkpoints" / f"ckpt-{done:06d}" / "rng-process1.pt").exists()


def test_a_group_that_accelerate_did_not_connect_is_refused(monkeypatch):
    """torchrun said WORLD_SIZE=2, accelerate runs this process alone (as it did on CPU without cpu=True)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ppo_lm import distributed as dist
    from ppo_lm.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    with pytest.raises(UserError, match=r"launch: WORLD_SIZE=2 asked for 2 processes, but accelerate runs 1 \(NO\)"):
        dist.check_launch(alone)
    dist.check_launch(SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU))


# ------------------------------------------------------------------------------------------ DeepSpeed (CPU)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_makes_the_same_update_as_one_process(tiny_model_dir, tmp_path, stage):
    """ZeRO-2 (gradients and AdamW states sharded) and ZeRO-3 (weights too, gathered for the rollout): 2
    processes x 8 prompts give the weights 1 process x 16 prompts gives, with gradient accumulation and a
    linear schedule, whose steps DeepSpeed must not take for ppo-lm."""
    pytest.importorskip("deepspeed")
    overrides = ("ppo.gradient_accumulation_steps=2", "ppo.lr_schedule=linear", "train.iterations=4")
    one = one_update(tiny_model_dir, tmp_path / "one.safetensors", 1, *overrides)
    two = one_update(tiny_model_dir, tmp_path / "two.safetensors", 2, *overrides, env=zero(stage))
    assert one["lr"].item() == pytest.approx(1e-2 * 6 / 8) and two["lr"].item() == pytest.approx(one["lr"].item())
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max((one[k] - start[k.removeprefix("lm.")]).abs().max().item() for k in one
               if k.removeprefix("lm.") in start) > 1e-3
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


def accelerate_launch(config: str, *args, cwd):
    def launch():
        return subprocess.run([ACCELERATE, "launch", "--config_file", str(HERE.parent / "examples" / "accelerate" /
                                                                          config), "-m", "ppo_lm.cli", *map(str, args)],
                              capture_output=True, text=True, cwd=cwd, env={**DIST_ENV, "DS_ACCELERATOR": "cpu"},
                              timeout=LIMIT)

    done = launch()
    # A process of a launch used to die at exit with "terminate called without an active exception" after its run
    # had finished (2 of 6 launches of the zero3-offload example here, the fsdp2 example in CI): a C++ destructor
    # in the interpreter's finalisation. ppo_lm.cli now leaves multi-process runs before that finalisation
    # (distributed.exit_process; 16 of 16 launches clean since). Should it recur, it is tried once more, and only then,
    # with a warning, which the CI log shows. Any other failure fails the test.
    if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
        warnings.warn(f"{config}: a process aborted in std::terminate; launched again")
        done = launch()
    return done


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml", "zero3-offload.yaml"])
def test_deepspeed_example_configs_train_resume_and_save_a_model(tiny_model_dir, tmp_path, config):
    """Each DeepSpeed example under `accelerate launch` on CPU (2 processes): 2 iterations, then resumed to 3
    from its checkpoint (each process's shards in the checkpoint's engine/), equals 3 iterations straight:
    metrics and final weights; the final model is a whole transformers model that loads without DeepSpeed."""
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    straight = accelerate_launch(config, "train", write_run(tmp_path, tiny_model_dir, "straight", 3), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = write_run(tmp_path, tiny_model_dir, "cut", 3)
    first = accelerate_launch(config, "train", cut, "train.iterations=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "cut" / "checkpoints" / "ckpt-000002" / "engine").is_dir()
    resumed = accelerate_launch(config, "train", cut, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "cut")
    assert [r["iteration"] for r in b] == [1, 2, 3] and a == b
    assert all(r["nonfinite_skips"] == 0 and r["grad_norm"] > 0 for r in a)  # DeepSpeed's norm reached ppo-lm
    wa = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(wa[k].shape == start[k].shape for k in start)  # whole, not ZeRO-3's shards
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final")
    assert max((p.detach() - start[k]).abs().max().item() for k, p in model.state_dict().items() if k in start) > 0


def test_a_deepspeed_config_that_disagrees_with_the_run_is_refused():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ppo_lm import distributed as dist
    from ppo_lm.errors import UserError

    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": 2.0}
    acc = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2, gradient_accumulation_steps=3,
                          state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2, deepspeed_config=ds)))
    with pytest.raises(UserError, match=r"ppo.max_grad_norm: the DeepSpeed config sets gradient_clipping=2.0"):
        dist.fit_engine(acc, micro_batch=4, max_grad_norm=1.0)
    from ppo_lm.sft import STAGE_FIELDS

    with pytest.raises(UserError, match=r"optim.max_grad_norm: the DeepSpeed config sets gradient_clipping"):
        dist.fit_engine(acc, micro_batch=4, max_grad_norm=1.0, fields=STAGE_FIELDS)  # an SFT or reward-model stage
    dist.fit_engine(acc, micro_batch=4, max_grad_norm=2.0)
    assert ds == {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 2.0, "gradient_accumulation_steps": 3,
                  "train_batch_size": 4 * 3 * 2}
    acc.gradient_accumulation_steps = 1  # the next stage of a pipeline fills them anew
    dist.fit_engine(acc, micro_batch=2, max_grad_norm=2.0)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 4


# ---------------------------------------------------------------------------------------------- FSDP2 (CPU)


@pytest.mark.slow
def test_fsdp2_makes_the_same_update_as_one_process(tiny_model_dir, tmp_path):
    """FSDP2 (weights, gradients and AdamW states sharded, one unit per GPT-2 block, gathered once for the
    rollout): 2 processes x 8 prompts give the weights 1 process x 16 prompts gives, with gradient accumulation
    (no-sync micro-batches) and a linear schedule. Measured: 1.7e-7."""
    overrides = ("ppo.gradient_accumulation_steps=2", "ppo.lr_schedule=linear", "train.iterations=4")
    one = one_update(tiny_model_dir, tmp_path / "one.safetensors", 1, *overrides)
    two = one_update(tiny_model_dir, tmp_path / "two.safetensors", 2, *overrides, env=FSDP2)
    assert two["lr"].item() == pytest.approx(one["lr"].item()) == pytest.approx(1e-2 * 6 / 8)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max((one[k] - start[k.removeprefix("lm.")]).abs().max().item() for k in one
               if k.removeprefix("lm.") in start) > 1e-3
    assert one.keys() == two.keys() and all(one[k].shape == two[k].shape for k in one)  # whole, not shards
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4


@pytest.mark.slow
def test_fsdp2_trains_resumes_and_saves_a_model(tiny_model_dir, tmp_path):
    """examples/accelerate/fsdp2.yaml under `accelerate launch` on CPU (2 processes, gloo): 2 iterations, then
    resumed to 3 from its checkpoint (each process's shards as a torch distributed checkpoint in engine/), equals 3
    iterations straight: metrics and final weights; the final model is a whole transformers model. The checkpoint
    does not resume without FSDP (one line, exit 2)."""
    from transformers import AutoModelForCausalLM

    straight = accelerate_launch("fsdp2.yaml", "train", write_run(tmp_path, tiny_model_dir, "straight", 3), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = write_run(tmp_path, tiny_model_dir, "cut", 3)
    first = accelerate_launch("fsdp2.yaml", "train", cut, "train.iterations=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "cut" / "checkpoints" / "ckpt-000002" / "engine" / ".metadata").is_file()
    plain = subprocess.run([sys.executable, "-m", "ppo_lm.cli", "train", str(cut), "--resume"], capture_output=True,
                           text=True, cwd=tmp_path, env=DIST_ENV, timeout=LIMIT)
    assert plain.returncode == 2 and "written under FSDP2, and this run is without a sharding engine" in plain.stderr
    resumed = accelerate_launch("fsdp2.yaml", "train", cut, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "cut")
    assert [r["iteration"] for r in b] == [1, 2, 3] and a == b
    assert all(r["nonfinite_skips"] == 0 and r["grad_norm"] > 0 for r in a)
    wa = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(wa[k].shape == start[k].shape for k in start)  # whole, not FSDP's shards
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final")
    assert max((p.detach() - start[k]).abs().max().item() for k, p in model.state_dict().items() if k in start) > 0


def test_an_fsdp1_launch_is_refused(tiny_model_dir, tmp_path):
    cfg = write_run(tmp_path, tiny_model_dir, "run", 1)
    done = torchrun("-m", "ppo_lm.cli", "train", cfg, cwd=tmp_path, env={**FSDP2, "FSDP_VERSION": "1"})
    assert "(exitcode: 2)" in done.stderr, done.stderr[-3000:]  # each process's; torchrun's own is 1
    assert "launch: the launch asks for FSDP version 1; ppo-lm runs FSDP2" in done.stderr
    assert not (tmp_path / "run").exists()


def test_lora_under_fsdp2_is_refused(tiny_model_dir, tmp_path):
    cfg = write_run(tmp_path, tiny_model_dir, "run", 1)
    done = torchrun("-m", "ppo_lm.cli", "train", cfg, "model.lora.enabled=true", cwd=tmp_path, env=FSDP2)
    assert "(exitcode: 2)" in done.stderr, done.stderr[-3000:]  # each process's; torchrun's own is 1
    assert "model.lora.enabled: LoRA is not supported under FSDP2 yet" in done.stderr
    assert not (tmp_path / "run").exists()
