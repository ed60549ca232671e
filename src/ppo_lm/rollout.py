"""Step 1 of an iteration: sample responses with the current policy and gather the quantities PPO needs of
them: old logprobs, values, entropies and reference logprobs.

Sampling uses ``transformers``' ``generate`` (KV cache; its temperature/top-k/top-p warpers) on left-padded
prompts, with the next token drawn by :class:`InverseCDFSampler`. The old logprobs and entropies, taken at the
*sampling temperature* (the same function the loss later evaluates), and the hidden states the value head reads
are recorded while sampling (:class:`StepRecorder`), so the policy never runs over the sampled sequences a second
time; only the reference model (and a separate critic) does, in batched forward passes. With
``rollout.recompute_logprobs`` the policy's quantities come from one teacher-forced forward instead.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from . import algo
from .data import pad_right
from .models import PolicyWithValue, Reference, base_model, lm_forward
from .types import Rollout


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``[B]`` lists of token ids -> ``([B, P] ids, [B, P] bool mask)``, padded on the left."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = True
    return ids, mask


def stop_token_ids(tokenizer, lm: nn.Module | None = None) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS and the model's own (its generation config may name
    several, e.g. a chat model's end-of-turn token beside its end-of-text token)."""
    from .models import base_model

    ids = [tokenizer.eos_token_id]
    config = getattr(base_model(lm), "generation_config", None) if lm is not None else None
    extra = getattr(config, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


def response_mask_from_ids(response_ids: Tensor, eos_id: int | list[int] | None) -> tuple[Tensor, Tensor]:
    """``[B, T]`` -> (mask True up to and including the first EOS, [B] whether an EOS occurred); ``eos_id`` is
    one stop token or several. With ``eos_id`` None every position is real."""
    if eos_id is None or eos_id == []:
        return torch.ones_like(response_ids, dtype=torch.bool), torch.zeros(response_ids.shape[0], dtype=torch.bool)
    is_eos = torch.isin(response_ids, torch.tensor(eos_id, device=response_ids.device))
    # tokens strictly after the first EOS have a cumulative EOS count >= 1 before them
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after_eos, is_eos.any(-1)


class InverseCDFSampler:
    """Draws the next token of each row from the softmax of its (already warped) scores by inverse transform
    sampling: one uniform number per row against the cumulative probabilities. It then leaves only that token
    finite, so greedy decoding returns it.

    The distribution is the one ``torch.multinomial`` samples from, but multinomial draws an exponential variate
    for every vocabulary entry. On CPU that was half of all generation time here (7 ms per step for 64 rows of
    8192), against well under a millisecond for a cumulative sum and a binary search.
    """

    def __init__(self, on_sample: Callable[[Tensor], None] | None = None):
        self.on_sample = on_sample  # told each ``[B]`` draw (StepRecorder.take)
        #: per step, ``[B]`` log-probabilities of the drawn tokens under the distribution they were drawn from (the
        #: warped one): set against the policy's own logprobs, they measure what top-k/top-p change (``sampling_kl``)
        self.logprobs: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        probs = torch.softmax(scores.float(), dim=-1)
        cdf = probs.cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
        # right=True: the first index whose cumulative probability exceeds u, never a zero-probability token
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        self.logprobs.append(probs.gather(-1, token)[:, 0].log())
        if self.on_sample is not None:
            self.on_sample(token[:, 0])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)


class StepRecorder:
    """Records, at each sampling step, what PPO needs of the token just drawn, so that the rollout does not run the
    policy over the sampled sequences a second time (TRL's PPOTrainer likewise takes its old logprobs from the
    generation logits): the token's logprob and the distribution's entropy at the sampling temperature, from the
    model's logits before any warper, and (``hidden=True``) the final hidden state that predicted it, which a value
    head on the policy's trunk reads. A separate critic, or none (a critic-free estimator), needs no hidden states.

    It is the first logits processor (it sees the logits and passes them on untouched), a forward hook on the LM
    head catches the hidden state, and the sampler hands over each token it draws. Per step it keeps ``[B]`` and
    ``[B, H]``, never the ``[B, V]`` logits of past steps (``output_logits=True`` would keep them all).
    """

    def __init__(self, lm: nn.Module, temperature: float, *, hidden: bool = True):
        self.temperature = temperature
        self.logprobs: list[Tensor] = []
        self.entropy: list[Tensor] = []
        self.hidden: list[Tensor] | None = [] if hidden else None
        self._scores: Tensor | None = None
        self._last_hidden: Tensor | None = None
        self._hook = lm.get_output_embeddings().register_forward_hook(self._catch_hidden) if hidden else None

    def _catch_hidden(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._last_hidden = args[0][:, -1]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._scores = scores
        return scores

    def take(self, token: Tensor) -> None:
        lp, h = algo.logprobs_and_entropy(self._scores, token, self.temperature)
        self.logprobs.append(lp)
        self.entropy.append(h)
        if self.hidden is not None:
            self.hidden.append(self._last_hidden)
        self._scores = self._last_hidden = None

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()

    def result(self) -> tuple[Tensor, ...]:
        """``[B, T]`` logprobs, ``[B, T]`` entropies and, when kept, ``[B, T, H]`` hidden states of the T steps."""
        steps = (torch.stack(self.logprobs, 1), torch.stack(self.entropy, 1))
        return steps if self.hidden is None else (*steps, torch.stack(self.hidden, 1))


class Sampled(NamedTuple):
    """Sampled responses ``[B, T]`` (right-padded with pad); when sampled (not greedy), the drawn tokens'
    log-probabilities under the sampling distribution ``[B, T]``; when recorded, their old logprobs and entropies
    ``[B, T]`` and, when a value head on the trunk needs them, the hidden states ``[B, T, H]`` that predicted them
    (see :class:`StepRecorder`)."""

    ids: Tensor
    sampling_logprobs: Tensor | None = None
    logprobs: Tensor | None = None
    entropy: Tensor | None = None
    hidden: Tensor | None = None


@contextlib.contextmanager
def own_generation_defaults(lm: nn.Module):
    """``generate`` fills every setting its config leaves unset from the checkpoint's generation_config.json, and an
    instruct model may ship ``repetition_penalty``, ``suppress_tokens``, ``min_p`` or ``bad_words_ids`` there: the
    rollout would then sample from another distribution than the one the loss evaluates. Hide them while
    sampling (the model's own config is put back, and saved with it, unchanged)."""
    from transformers import GenerationConfig

    model = base_model(lm)
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def generation_config(tokenizer, cfg, *, greedy: bool = False, stop: list[int] | None = None):
    """Generation settings of the RolloutConfig ``cfg``: ``(GenerationConfig, logits processors)``. Sampling runs
    as greedy decoding over scores warped by transformers' own temperature / top-k / top-p warpers and then
    sampled by :class:`InverseCDFSampler`; ``greedy`` (evaluation only) takes the argmax of the raw scores.
    ``stop``: the tokens that end a response (default: the tokenizer's EOS)."""
    from transformers import (GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    eos = (stop or tokenizer.eos_token_id) if cfg.stop_at_eos else None
    config = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True)
    processors = LogitsProcessorList()
    if not greedy:
        if cfg.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            processors.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            processors.append(TopPLogitsWarper(cfg.top_p))
        processors.append(InverseCDFSampler())
    return config, processors


@torch.no_grad()
def sample(lm: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, gen_config, chunk: int | None, *,
           record_temperature: float | None = None, record_hidden: bool = True) -> Sampled:
    """Sample responses for left-padded prompts, ``chunk`` prompts at a time; ``gen_config`` is what
    :func:`generation_config` returns. With ``record_temperature`` (sampling only), also record each token's
    logprob and entropy at that temperature and, with ``record_hidden``, its hidden state (:class:`StepRecorder`)."""
    config, processors = gen_config
    pad = config.pad_token_id
    chunk = chunk or prompt_ids.shape[0]
    sampling = bool(processors) and isinstance(processors[-1], InverseCDFSampler)
    pieces: list[tuple[Tensor, ...]] = []
    for start in range(0, prompt_ids.shape[0], chunk):
        ids, mask = prompt_ids[start:start + chunk], prompt_mask[start:start + chunk]
        recorder, chunk_processors = None, processors
        if record_temperature is not None:
            assert sampling, "recording needs the sampler"
            recorder = StepRecorder(lm, record_temperature, hidden=record_hidden)
        if sampling:  # a sampler of the chunk's own, which keeps the chunk's draws
            sampler = InverseCDFSampler(on_sample=recorder.take if recorder is not None else None)
            chunk_processors = type(processors)([*([recorder] if recorder else []), *processors[:-1], sampler])
        try:
            with own_generation_defaults(lm):
                out = lm.generate(input_ids=ids, attention_mask=mask.long(), generation_config=config,
                                  logits_processor=chunk_processors)
        finally:
            if recorder is not None:
                recorder.remove()
        piece = (out[:, ids.shape[1]:],)
        if sampling:
            piece += (torch.stack(sampler.logprobs, 1),)
        if recorder is not None:
            piece += recorder.result()
        pieces.append(piece)
    width = max(p[0].shape[1] for p in pieces)

    def cat(i: int, value) -> Tensor:  # right-pad each chunk's i-th tensor along its time axis (dim 1)
        return torch.cat([nn.functional.pad(p[i], (0, 0) * (p[i].dim() - 2) + (0, width - p[i].shape[1]), value=value)
                          for p in pieces])

    return Sampled(cat(0, pad), *(cat(i, 0.0) for i in range(1, len(pieces[0]))))


@torch.no_grad()
def score_tokens(policy: PolicyWithValue, ref: Reference, input_ids: Tensor, attention_mask: Tensor,
                 n_response: int, *, temperature: float, batch_size: int,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 sampled: Sampled | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Old logprobs, values, reference logprobs and entropies ``[B, T]`` of the response tokens, in chunks. With
    ``sampled`` recorded while sampling, the policy's logprobs and entropies are taken from it and its values
    from the recorded hidden states (a separate critic still runs), so only the reference model runs here."""
    logprobs, values, ref_logprobs, entropy = [], [], [], []
    tokens = input_ids[:, -n_response:]
    for s in range(0, input_ids.shape[0], batch_size):
        ids, mask, tok = input_ids[s:s + batch_size], attention_mask[s:s + batch_size], tokens[s:s + batch_size]
        with autocast():
            if sampled is None:
                logits, v = policy(ids, mask, n_response)
                lp, h = algo.logprobs_and_entropy(logits, tok, temperature)
                del logits
            else:
                lp, h = sampled.logprobs[s:s + batch_size], sampled.entropy[s:s + batch_size]
                v = (None if policy.value_head is None else policy.critic_values(ids, mask, n_response)
                     if policy.critic is not None else policy.value_head(sampled.hidden[s:s + batch_size]))
            if v is None:  # no critic (a critic-free estimator): values of 0, never used
                v = torch.zeros_like(lp)
            logprobs.append(lp)
            entropy.append(h)
            values.append(v.float())
            with ref.lm() as ref_lm:
                ref_logits, _ = lm_forward(ref_lm, ids, mask, n_response)
            ref_logprobs.append(algo.logprobs_from_logits(ref_logits, tok, temperature))
    return torch.cat(logprobs), torch.cat(values), torch.cat(ref_logprobs), torch.cat(entropy)


@torch.no_grad()
def sample_continuous_batching(lm: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, cfg, *,
                               greedy: bool = False, stop: list[int] | None = None) -> Sampled:
    """The ``batch`` engine: transformers' continuous batching (``generate_batch``: paged KV cache, requests
    scheduled as they finish, no padding), with temperature / top-k / top-p as ``generate`` applies them. The
    tokens come back (right-padded) with their log-probabilities under the distribution they were drawn from
    (what ``sampling_kl`` compares); the old logprobs come from a teacher-forced forward afterwards. Its random
    draws are seeded from torch's generator, so a run stays reproducible."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    pad = tokenizer.pad_token_id
    prompts = [ids[mask].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
    config = GenerationConfig(do_sample=not greedy, max_new_tokens=cfg.max_new_tokens, eos_token_id=stop,
                              pad_token_id=pad, temperature=None if greedy else cfg.temperature,
                              top_k=None if greedy or not cfg.top_k else cfg.top_k,
                              top_p=None if greedy or cfg.top_p >= 1.0 else cfg.top_p)
    # the paged cache sized to the requests: by default it takes a share of the machine's free memory, which
    # on a CPU costs seconds per call to allocate (5.8 s against 0.3 s for 16 requests of 12 tokens, measured)
    page = 32
    blocks = sum(-(-(len(p) + cfg.max_new_tokens) // page) for p in prompts)
    batching = ContinuousBatchingConfig(seed=int(torch.randint(2 ** 31 - 1, ())), page_size=page, num_blocks=blocks,
                                        return_logprobs=not greedy)
    with own_generation_defaults(lm):
        out = base_model(lm).generate_batch(inputs=prompts, generation_config=config,
                                            continuous_batching_config=batching, progress_bar=False, warmup=False)
    done = sorted(out.values(), key=lambda o: int(o.request_id.rpartition("_")[2]))
    if len(done) != len(prompts) or any(o.error for o in done):
        raise RuntimeError(f"continuous batching returned {len(done)} of {len(prompts)} requests: "
                           + "; ".join(str(o.error) for o in done if o.error))
    ids = pad_right([o.generated_tokens for o in done], pad, width=1)
    if greedy:
        return Sampled(ids.to(prompt_ids.device), None)
    # the logprobs of the distribution each token was drawn from (after temperature, top-k, top-p)
    logprobs = pad_right([o.logprobs or [] for o in done], 0.0, width=ids.shape[1])
    return Sampled(ids.to(prompt_ids.device), logprobs.to(prompt_ids.device))


class Responses(NamedTuple):
    """What :func:`sample_responses` returns: ``[B, T]`` response ids (pad after EOS) and their mask, ``[B]``
    whether each ended with EOS, the decoded completions, and what was recorded while sampling."""

    ids: Tensor
    mask: Tensor
    ended: Tensor
    completions: list[str]
    sampled: Sampled


def sample_responses(lm: nn.Module, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, cfg, *, greedy: bool = False,
                     record: bool = False, record_hidden: bool = True) -> Responses:
    """Sample with the RolloutConfig ``cfg`` (or decode greedily) on the engine ``cfg.engine``; ``record``: keep the
    logprobs, entropies and (``record_hidden``) hidden states of the sampled tokens (see :class:`StepRecorder`; the
    ``hf`` engine only: with another, the caller computes them with a teacher-forced forward)."""
    stop = stop_token_ids(tokenizer, lm)
    if cfg.engine == "batch":
        sampled = sample_continuous_batching(lm, tokenizer, prompt_ids, prompt_mask, cfg, greedy=greedy,
                                             stop=stop if cfg.stop_at_eos else None)
    elif cfg.engine == "vllm":
        from . import vllm_engine

        engine = vllm_engine.engine_for(lm, gpu_memory_utilization=cfg.vllm_gpu_memory)
        sampled = Sampled(*engine.sample(lm, prompt_ids, prompt_mask, cfg, pad=tokenizer.pad_token_id, greedy=greedy,
                                         stop=stop if cfg.stop_at_eos else None))
    else:
        gen = generation_config(tokenizer, cfg, greedy=greedy, stop=stop)
        sampled = sample(lm, prompt_ids, prompt_mask, gen, cfg.generation_batch_size,
                         record_temperature=cfg.temperature if record and not greedy else None,
                         record_hidden=record_hidden)
    response_mask, ended = response_mask_from_ids(sampled.ids, stop if cfg.stop_at_eos else None)
    response_ids = sampled.ids.masked_fill(~response_mask, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode([r[mk].tolist() for r, mk in zip(response_ids.cpu(), response_mask.cpu())],
                                         skip_special_tokens=True)
    return Responses(response_ids, response_mask, ended, completions, sampled)


def untimed(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def collect(policy: PolicyWithValue, ref: Reference, tokenizer, prompt_token_ids: list[list[int]],
            prompts: list[str], fields: dict, cfg, *, device: torch.device, forward_batch_size: int,
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
            timer: Callable[[str], contextlib.AbstractContextManager] = untimed) -> Rollout:
    """Sample one response per prompt and return the full :class:`Rollout` (``cfg``: a RolloutConfig). With a
    ``timer`` (a :class:`~ppo_lm.tracking.PhaseTimer`), the sampling alone is timed as "generate"."""
    prompt_ids, prompt_mask = left_pad(prompt_token_ids, tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = policy.training
    policy.eval()
    with autocast(), timer("generate"):
        out = sample_responses(policy.lm, tokenizer, prompt_ids, prompt_mask, cfg, record=not cfg.recompute_logprobs,
                               record_hidden=policy.reads_hidden_states)
    input_ids = torch.cat([prompt_ids, out.ids], 1)
    attention_mask = torch.cat([prompt_mask, out.mask], 1)
    recorded = out.sampled.logprobs is not None  # (the hf engine records while sampling; the others do not)
    logprobs, values, ref_logprobs, entropy = score_tokens(
        policy, ref, input_ids, attention_mask.long(), out.ids.shape[1], temperature=cfg.temperature,
        batch_size=forward_batch_size, autocast=autocast, sampled=out.sampled if recorded else None)
    policy.train(was_training)
    m = out.mask.float()
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=out.ids, response_mask=out.mask,
                   logprobs=logprobs * m, ref_logprobs=ref_logprobs * m, values=values * m, entropy=entropy * m,
                   ended_with_eos=out.ended, prompts=prompts, completions=out.completions, fields=fields,
                   sampling_logprobs=None if out.sampled.sampling_logprobs is None else out.sampled.sampling_logprobs * m)
