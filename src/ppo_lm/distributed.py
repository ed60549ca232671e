"""What a run on several processes must agree on, through accelerate's collectives.

Each process holds ``rollout.batch_size`` prompts of the iteration's global batch. Every statistic that the
single-process algorithm takes over the batch is taken over the global batch here (reward normalisation,
whitening, the KL the controller steers, the logged metrics), and every decision is taken once from global
values, so that all processes act together: a process that stopped or skipped alone would leave the others
waiting in the next all-reduce forever. On one process each helper is the identity, and the run is the same
as before this module existed.

The helpers take the ``accelerate.Accelerator`` of the run. Nothing here starts processes or talks to the
network: launching is ``torchrun`` or ``accelerate launch`` (docs/scaling.md).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError


def world(accelerator) -> int:
    return accelerator.num_processes


def global_sum(accelerator, x: Tensor) -> Tensor:
    """``x`` summed over the processes (every process gets the same result)."""
    if world(accelerator) == 1:
        return x
    return accelerator.reduce(x.detach().clone(), reduction="sum")


def global_mean(accelerator, value: float) -> float:
    """The mean over the processes of one number per process."""
    if world(accelerator) == 1:
        return value
    return float(global_sum(accelerator, torch.tensor([value], dtype=torch.float64, device=accelerator.device))) \
        / world(accelerator)


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (a decision all of them take together)."""
    if world(accelerator) == 1:
        return flag
    return bool(global_sum(accelerator, torch.tensor([float(flag)], device=accelerator.device)) > 0)


def summer(accelerator):
    """The reduction :mod:`ppo_lm.algo` takes for global moments: ``None`` on one process."""
    return None if world(accelerator) == 1 else (lambda x: global_sum(accelerator, x))


def gather_rows(accelerator, x: Tensor, pad_value=0, pad_first: bool = False) -> Tensor:
    """Every process's rows of ``x`` (dim 0), in process order; a dim 1 of different lengths is padded with
    ``pad_value`` at the end first (at the start with ``pad_first``, for left-padded prompts)."""
    if world(accelerator) == 1:
        return x
    if x.dim() > 1:
        x = accelerator.pad_across_processes(x.contiguous(), dim=1, pad_index=pad_value, pad_first=pad_first)
    return accelerator.gather(x.contiguous())


def gather_list(accelerator, items: list) -> list:
    """Every process's items, in process order (any picklable objects)."""
    if world(accelerator) == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def accelerator_for(console, *, cpu: bool, **kwargs):
    """The command's ``Accelerator`` (``kwargs`` go to it): ``cpu`` as :func:`use_cpu` decides, the launch
    checked (:func:`check_launch`), and the console of every process but the main one quiet, so that one
    process speaks (errors still reach stderr through their exceptions)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = use_cpu(cpu)
    if cpu and engine() == "deepspeed":
        # accelerate turns DeepSpeed off with cpu=True; without it, it must be told the group's backend, or it
        # counts one process while DeepSpeed connects them all
        cpu, kwargs = False, {**kwargs, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    accelerator = Accelerator(cpu=cpu, **kwargs)
    if engine() == "fsdp":
        shard_with_fsdp2(accelerator)
    check_launch(accelerator)
    if zero_stage(accelerator) == 3:
        # every model loads whole (in CPU memory), not sharded at load by ZeRO-3's ``zero.Init``: the reference is
        # a copy of the policy as loaded, and reward models run whole; DeepSpeed shards the policy when prepared
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    if not accelerator.is_main_process:
        console.quiet = True
    if world(accelerator) > 1:
        atexit.register(end_process_group)
    return accelerator


def end_process_group() -> None:
    """Destroy the process group (every group) if one is still up: at the end of a command, and at the exit of
    any process that made one through :func:`accelerator_for` (an ``atexit`` handler, which runs while the
    interpreter is whole). A group left to the interpreter's finalisation can abort the process with
    "terminate called without an active exception": gloo's worker threads may still hold work objects whose
    tensors reach into Python, which is being torn down (pytorch/pytorch PR 179291 describes it; torch 2.13
    does not destroy groups at exit itself). Seen here in 2-process runs that never destroyed their group."""
    import torch.distributed as tdist

    if "ppo_lm.vllm_engine" in sys.modules:  # a vLLM engine made a group of its own, which it must end itself
        sys.modules["ppo_lm.vllm_engine"].close_all()
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process of a multi-process launch once its command is done: flush, run the ``atexit`` handlers
    (trackers, the process group's teardown) while the interpreter is whole, then leave without the
    interpreter's finalisation. That finalisation aborted DeepSpeed ZeRO-3 runs after they had finished
    ("terminate called without an active exception": 2 of 6 launches of examples/accelerate/zero3-offload.yaml
    here, every file written, the final line printed), in the C++ destructors that run at exit."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def engine() -> str:
    """The engine the launcher asked for: "deepspeed" or "fsdp" (``accelerate launch`` with such a config sets
    ``ACCELERATE_USE_DEEPSPEED`` / ``ACCELERATE_USE_FSDP``), else "ddp"."""
    for name in ("deepspeed", "fsdp"):
        if os.environ.get(f"ACCELERATE_USE_{name.upper()}", "false").lower() == "true":
            return name
    return "ddp"


def shard_with_fsdp2(accelerator) -> None:
    """Under an FSDP launch, check that accelerate runs FSDP2, and run it on a CPU process group too.

    accelerate turns an FSDP launch into ``DistributedType.FSDP`` on accelerators only; on CPU (gloo) it reports
    ``MULTI_CPU`` and wraps nothing, although torch's ``fully_shard`` runs there. So on a CPU group the plugin
    accelerate would have made from the launch's environment is installed in its state, and from then on the run
    takes accelerate's own FSDP2 path (``prepare``, gradient clipping, no-sync accumulation) exactly as on GPUs."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables, as accelerate reads them
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
        # as accelerate does for its own FSDP state: the process state agrees (a later AcceleratorState() copies it)
        PartialState().distributed_type = DistributedType.FSDP
    if state.distributed_type == DistributedType.FSDP and state.fsdp_plugin.fsdp_version != 2:
        raise UserError(f"the launch asks for FSDP version {state.fsdp_plugin.fsdp_version}; ppo-lm runs FSDP2: set "
                        "fsdp_version: 2 in the accelerate config (examples/accelerate/fsdp2.yaml)", "launch")


def check_lora(accelerator, enabled: bool) -> None:
    """LoRA under FSDP2 is not built (the adapters' merge on save and the reference as the adapters-off policy are
    untested on sharded weights): refused with one line, before a model is loaded."""
    if enabled and fsdp2(accelerator):
        raise UserError("LoRA is not supported under FSDP2 yet; train all weights under FSDP2, or use LoRA under DDP "
                        "or DeepSpeed", "model.lora.enabled")


def fsdp2(accelerator) -> bool:
    """Whether accelerate shards the models with FSDP2 (``fully_shard``)."""
    return accelerator.is_fsdp2  # accelerate's own test: DistributedType.FSDP with fsdp_version 2


def sharded(accelerator) -> str | None:
    """The engine that keeps each process's part of the model and optimiser in a checkpoint's ``engine/``:
    "deepspeed" or "fsdp2"; None where every process holds them whole (one process, DDP)."""
    return "deepspeed" if zero_stage(accelerator) is not None else "fsdp2" if fsdp2(accelerator) else None


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage when DeepSpeed runs the model (accelerate's ``DistributedType.DEEPSPEED``), else None."""
    if accelerator.distributed_type.value != "DEEPSPEED":
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


PPO_FIELDS = {"train_micro_batch_size_per_gpu": "ppo.num_minibatches", "gradient_clipping": "ppo.max_grad_norm",
              "gradient_accumulation_steps": "ppo.gradient_accumulation_steps", "train_batch_size": "rollout.batch_size"}


def fit_engine(accelerator, *, micro_batch: int, max_grad_norm: float | None, fields: dict = PPO_FIELDS) -> None:
    """Fill the DeepSpeed config's ``auto`` entries that accelerate takes from a DataLoader (PPO has none) or
    would fill with its own default (gradient clipping 1.0) from the run's config; an entry the DeepSpeed config
    sets to another value than the run's is refused, since the two would disagree on what is trained. The
    entries are filled anew for each stage of a pipeline (the stages share one DeepSpeed config). ``fields`` names
    the run's config field behind each entry, for the error."""
    if zero_stage(accelerator) is None:
        return
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    given = plugin.__dict__.setdefault("_ppo_lm_given", {k: ds.get(k, "auto") for k in PPO_FIELDS})
    accumulation = accelerator.gradient_accumulation_steps
    wanted = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_clipping": float(max_grad_norm or 0.0),
              "gradient_accumulation_steps": accumulation,
              "train_batch_size": micro_batch * accumulation * world(accelerator)}
    for key, value in wanted.items():
        if given[key] == "auto":
            ds[key] = value
        elif float(given[key]) != float(value):
            raise UserError(f"the DeepSpeed config sets {key}={given[key]}, the run's config asks for {value}: set "
                            "it to 'auto' there (ppo-lm fills it)", fields[key])


@contextlib.contextmanager
def whole(accelerator, model):
    """The weights of ``model`` (as accelerate prepared it, or the module inside) whole on every process for the
    block: under ZeRO-3 and FSDP2 each process holds a shard, and gathering them once (for a rollout's generation
    and scoring, or to save) is what makes sampling fast; the engine's per-module gathering, which would gather and
    release every layer at every token, is off meanwhile. Elsewhere (DDP, ZeRO-2) the weights are already whole and
    this does nothing. The weights are read-only in the block: what is written to them is lost."""
    if fsdp2(accelerator):
        with _fsdp2_unsharded(accelerator, model):
            yield
        return
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    offload = getattr(getattr(model, "optimizer", None), "parameter_offload", None)  # the engine's, if given
    with deepspeed.zero.GatheredParameters(list(getattr(model, "module", model).parameters())):
        if offload is not None:
            offload._remove_module_hooks()
            offload.forward_hooks.clear(), offload.backward_hooks.clear()  # re-registered below
        try:
            yield
        finally:
            if offload is not None:
                offload.setup_zero_stage3_hooks()


@contextlib.contextmanager
def _fsdp2_unsharded(accelerator, model):
    """FSDP2's parameters all-gathered once, and kept so through every forward in the block (each FSDP module
    would otherwise reshard after its forward and all-gather again at the next token); resharded at the end. While
    unsharded, the modules' registered parameters are the whole tensors."""
    from torch.distributed.fsdp import FSDPModule

    root = getattr(model, "module", model)
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    if units:  # FSDP's root initialises the units at its first forward; the gathering below may come before it
        root._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        reshard = bool(accelerator.state.fsdp_plugin.reshard_after_forward)
        for unit in units:
            unit.reshard()
            # as fully_shard left them: the root keeps its weights after forward (backward needs them next)
            unit.set_reshard_after_forward(reshard and unit is not root, recurse=False)


def save_sharded(accelerator, policy, optimizer, folder: Path) -> None:
    """Every process writes its part of the model and optimiser into ``folder``, in the engine's own checkpoint
    format: DeepSpeed's ``save_checkpoint``, or torch's distributed checkpoint (DCP) of FSDP2's sharded state
    dicts, which can also be loaded on another number of processes."""
    if zero_stage(accelerator) is not None:
        policy.save_checkpoint(str(folder.parent), tag=folder.name, exclude_frozen_parameters=True)
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save(_fsdp2_state(policy, optimizer), checkpoint_id=str(folder))
    accelerator.wait_for_everyone()


def load_sharded(accelerator, policy, optimizer, folder: Path) -> None:
    """Load what :func:`save_sharded` wrote into the live model and optimiser (each process its part)."""
    if zero_stage(accelerator) is not None:
        loaded, _ = policy.load_checkpoint(str(folder.parent), tag=folder.name, load_lr_scheduler_states=False,
                                           load_module_strict=False)
        if loaded is None:
            raise UserError(f"DeepSpeed could not load its checkpoint {folder}", str(folder.parent))
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _fsdp2_state(policy, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(policy, _inner(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _fsdp2_state(policy, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(policy, _inner(optimizer))
    return {"model": model_state, "optimizer": optimizer_state}


def _inner(optimizer):
    """The torch optimiser inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def raise_together(accelerator, failure: UserError | None, elsewhere: UserError) -> None:
    """Raise on every process when any has a ``failure``: its own where it has one, ``elsewhere`` on the others
    (each would otherwise wait for the failed one in the next collective)."""
    if any_process(accelerator, failure is not None):
        raise failure or elsewhere


def on_main(accelerator, write, field: str):
    """Run ``write()`` on the main process only, and share its outcome: when it raises a :class:`UserError`
    (a full disk, ...), every process raises. Returns what ``write`` returned (None on the other processes)."""
    result, failure = None, None
    if accelerator.is_main_process:
        try:
            result = write()
        except UserError as e:
            failure = e
    raise_together(accelerator, failure, UserError("process 0 could not write its files (its error is in its output)",
                                                   field))
    return result


def process_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``: the run's seed on rank 0 (a run on one process is unchanged), a different
    stream derived from it on each other rank, so that no two processes sample with the same uniforms."""
    if rank == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0])


def use_cpu(asked: bool) -> bool:
    """The ``cpu`` flag for ``Accelerator``: as configured, and always on a machine without an accelerator,
    where accelerate groups several processes (gloo) only when told it runs on the CPU."""
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6
    found = accel.is_available() if accel is not None else torch.cuda.is_available() or torch.backends.mps.is_available()
    return asked or not found


def asked_processes() -> tuple[int, str]:
    """How many processes the launcher was asked for, and where that was said: torchrun's ``WORLD_SIZE``, or
    the ``--num_processes`` of an ``accelerate launch`` parent (which on a machine without GPUs starts one
    process whatever the number, and sets nothing that says so)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return int(os.environ["WORLD_SIZE"]), f"WORLD_SIZE={os.environ['WORLD_SIZE']}"
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return 1, ""
    by_script = "launch" in argv and any(os.path.basename(a) == "accelerate" for a in argv)
    if not (by_script or "accelerate.commands.launch" in argv):
        return 1, ""
    for i, a in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            value = argv[i + 1] if a == flag and i + 1 < len(argv) else a[len(flag) + 1:] if a.startswith(flag + "=") else None
            if value and value.isdigit():
                return int(value), f"accelerate launch {flag} {value}"
    return 1, ""


def check_launch(accelerator) -> None:
    """Refuse a launch whose processes are not one group: the launcher was asked for several processes while
    accelerate runs this one alone, so it would train alone (or beside others, unconnected, on the same files)."""
    asked, said = asked_processes()
    if asked > 1 and world(accelerator) != asked:
        raise UserError(f"{said} asked for {asked} processes, but accelerate runs {world(accelerator)} "
                        f"({accelerator.distributed_type.value}): they would train unconnected. On CPU, launch "
                        "with `torchrun --nproc_per_node N -m ppo_lm.cli ...`", "launch")
