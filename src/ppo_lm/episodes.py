"""Multi-turn rollouts: a batch of text-environment episodes (:mod:`ppo_lm.envs`) played by the policy.

Each episode starts from the environment's first observation (the prompt). Then, turn after turn, the policy
samples a reply to the whole conversation so far, the environment reads it (``step``) and answers; the answer's
tokens are appended to the context and the next turn is sampled. Episodes end at different times (the
environment ends them, or ``env.max_turns`` / ``env.max_tokens`` does), so each turn samples only the episodes
still running. The result is one :class:`~ppo_lm.types.Rollout` whose response is everything after the prompt:
``response_mask`` marks the policy's tokens (the actions: the policy loss, the KL and the value targets are taken
over them only), ``context_mask`` every real token, and ``turn_rewards`` holds each turn's reward at its last token.

The old logprobs, values and entropies come from one teacher-forced forward over the finished episodes (as with
``rollout.recompute_logprobs``): a turn is sampled with the previous turns and replies as its context, which the
forward then sees exactly as sampled, token for token.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .errors import UserError
from .rollout import left_pad, sample_responses, score_tokens, untimed
from .types import Rollout

#: Placeholders for finding what a chat template writes around a message.
_USER, _ASSISTANT, _REPLY = "PPOLMUSERMSG", "PPOLMASSISTANTMSG", "PPOLMREPLYMSG"


def reply_template(tokenizer, chat: bool) -> tuple[str, str]:
    """How an environment's reply is written into the context, as ``(before, after)``: the text is
    ``before + reply + after``. With a chat template, ``before`` closes the policy's turn and opens a user message
    and ``after`` closes it and opens the next assistant turn (what the template itself writes there); when the
    policy's turn already ended with the token that closes a turn, its text is dropped from ``before``
    (:func:`reply_text`). Without a template, a reply is a line of its own."""
    if not chat:
        return "\n", "\n"
    messages = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT},
                {"role": "user", "content": _REPLY}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    start, mid = text.index(_ASSISTANT) + len(_ASSISTANT), text.index(_REPLY)
    return text[start:mid], text[mid + len(_REPLY):]


def reply_text(template: tuple[str, str], reply: str, stop_text: str | None) -> str:
    """The context text of an environment's reply; ``stop_text``: the text of the stop token that ended the
    policy's turn (EOS, or a chat model's end-of-turn token), which is not written twice."""
    before, after = template
    if stop_text and before.startswith(stop_text):
        before = before[len(stop_text):]
    return before + reply + after


@dataclass
class Episode:
    """One episode's tokens after its prompt, with which of them are the policy's, and its turns' rewards."""

    prompt: list[int]
    first_observation: str
    tokens: list[int] = field(default_factory=list)
    actions: list[bool] = field(default_factory=list)  # per token: the policy's (True) or the environment's
    rewards: dict[int, float] = field(default_factory=dict)  # token position -> reward of the turn ending there
    sampling_logprobs: dict[int, float] = field(default_factory=dict)  # token position -> log q(token)
    turns: int = 0
    done: bool = False
    terminated: bool = False  # ended by the environment (not by a limit)
    success: bool | None = None
    ended_with_eos: bool = False
    transcript: list[tuple[str, str]] = field(default_factory=list)  # (action, reply) per turn

    @property
    def total_reward(self) -> float:
        return sum(self.rewards.values())


def first_prompts(tokenizer, envs: list, seeds: list[int], cfg, *, chat: bool, max_prompt_tokens: int) -> list[Episode]:
    """An episode per environment, reset with its seed: its first observation as the prompt (through the chat
    template with ``chat``). A prompt over ``max_prompt_tokens`` (:func:`prompt_room`) is refused, naming the
    setting that limits it."""
    from .data import format_prompt

    episodes = []
    for seed, observation in zip(seeds, reset_all(envs, seeds)):
        prompt = tokenizer(format_prompt(tokenizer, observation, chat), add_special_tokens=not chat)["input_ids"]
        if len(prompt) > max_prompt_tokens:
            field = "data.max_prompt_tokens" if max_prompt_tokens == cfg.data.max_prompt_tokens else "env.max_tokens"
            room = "" if field == "data.max_prompt_tokens" else \
                f" the model's context leaves beside env.max_tokens ({cfg.env.max_tokens})"
            raise UserError(f"the first observation of episode seed {seed} has {len(prompt)} tokens, more than the "
                            f"{max_prompt_tokens}{room}", field)
        episodes.append(Episode(prompt=prompt, first_observation=observation))
    return episodes


def reset_all(envs: list, seeds: list[int]) -> list[str]:
    """The first observation of each environment, reset with its seed."""
    observations = []
    for env, seed in zip(envs, seeds):
        observation, _ = env.reset(seed=int(seed))
        if not isinstance(observation, str):
            raise UserError(f"{type(env).__name__}.reset returned a {type(observation).__name__}, not a string "
                            "(a text environment's observations are text)", "env.id")
        observations.append(observation)
    return observations


@torch.no_grad()
def play(lm: nn.Module, tokenizer, envs: list, seeds: list[int], cfg, *, chat: bool,
         max_prompt_tokens: int, greedy: bool = False, device: torch.device | str = "cpu",
         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list[Episode]:
    """Play one episode per environment (reset with its seed) to its end: ``cfg.rollout`` samples each turn
    (``max_new_tokens`` per turn), ``cfg.env`` bounds the episode (``max_turns``, ``max_tokens`` after the prompt);
    ``greedy``: decode greedily (evaluation)."""
    rollout_cfg, env_cfg = cfg.rollout, cfg.env
    template = reply_template(tokenizer, chat)
    episodes = first_prompts(tokenizer, envs, seeds, cfg, chat=chat, max_prompt_tokens=max_prompt_tokens)
    budget = rollout_cfg.max_new_tokens
    for turn in range(env_cfg.max_turns):
        running = [i for i, e in enumerate(episodes) if not e.done]
        if not running:
            break
        ids, mask = left_pad([episodes[i].prompt + episodes[i].tokens for i in running], tokenizer.pad_token_id)
        with autocast():
            out = sample_responses(lm, tokenizer, ids.to(device), mask.to(device), rollout_cfg, greedy=greedy)
        for row, i in enumerate(running):
            e, env = episodes[i], envs[i]
            action = out.ids[row][out.mask[row]].tolist()
            start = len(e.tokens)
            e.tokens += action
            e.actions += [True] * len(action)
            if out.sampled.sampling_logprobs is not None:
                lps = out.sampled.sampling_logprobs[row][:len(action)].tolist()
                e.sampling_logprobs.update({start + k: lp for k, lp in enumerate(lps)})
            e.ended_with_eos = bool(out.ended[row])
            reply, reward, terminated, truncated, info = env.step(out.completions[row])
            e.turns += 1
            if action:  # a turn without a token has nowhere to put its reward
                e.rewards[len(e.tokens) - 1] = e.rewards.get(len(e.tokens) - 1, 0.0) + float(reward)
            if isinstance(info, dict) and "success" in info:
                e.success = bool(info["success"])
            e.transcript.append((out.completions[row], str(reply)))
            if terminated or truncated:
                e.done, e.terminated = True, bool(terminated)
                continue
            stop_text = tokenizer.decode(action[-1:]) if e.ended_with_eos else None
            reply_ids = tokenizer(reply_text(template, str(reply), stop_text), add_special_tokens=False)["input_ids"]
            if turn + 1 == env_cfg.max_turns or len(e.tokens) + len(reply_ids) + budget > env_cfg.max_tokens:
                e.done = True  # no room for another turn: truncated
                continue
            e.tokens += reply_ids
            e.actions += [False] * len(reply_ids)
    return episodes


def to_rollout(episodes: list[Episode], seeds: list[int], tokenizer, device) -> dict:
    """The episodes as the tensors of a :class:`~ppo_lm.types.Rollout` (without the policy's quantities)."""
    prompt_ids, prompt_mask = left_pad([e.prompt for e in episodes], tokenizer.pad_token_id)
    T = max(1, max(len(e.tokens) for e in episodes))
    B = len(episodes)
    response_ids = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
    context = torch.zeros((B, T), dtype=torch.bool)
    actions = torch.zeros((B, T), dtype=torch.bool)
    rewards = torch.zeros((B, T))
    sampling = torch.zeros((B, T))
    for b, e in enumerate(episodes):
        n = len(e.tokens)
        response_ids[b, :n] = torch.tensor(e.tokens, dtype=torch.long)
        context[b, :n] = True
        actions[b, :n] = torch.tensor(e.actions, dtype=torch.bool)
        for position, r in e.rewards.items():
            rewards[b, position] = r
        for position, lp in e.sampling_logprobs.items():
            sampling[b, position] = lp
    fields = {"seed": list(seeds), "turns": [e.turns for e in episodes],
              "success": [e.success for e in episodes], "terminated": [e.terminated for e in episodes]}
    return dict(prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
                response_ids=response_ids.to(device), response_mask=actions.to(device),
                context_mask=context.to(device), turn_rewards=rewards.to(device),
                sampling_logprobs=sampling.to(device),
                ended_with_eos=torch.tensor([e.ended_with_eos for e in episodes], device=device),
                prompts=[e.first_observation for e in episodes],
                completions=[transcript(e) for e in episodes], fields=fields)


def transcript(e: Episode) -> str:
    """The episode after its first observation, as text: each action, then the environment's reply."""
    return "\n".join(f"{action}\n> {reply}" if reply else action for action, reply in e.transcript)


def collect(policy, ref, tokenizer, envs: list, seeds: list[int], cfg, *, chat: bool, max_prompt_tokens: int,
            device, forward_batch_size: int, autocast=contextlib.nullcontext, timer=untimed) -> Rollout:
    """Play one episode per environment with the policy and return the full :class:`Rollout` (``cfg``: the
    Config). With a ``timer``, the playing is timed as "generate" (it is mostly sampling)."""
    was_training = policy.training
    policy.eval()
    with timer("generate"):
        episodes = play(policy.lm, tokenizer, envs, seeds, cfg, chat=chat,
                        max_prompt_tokens=max_prompt_tokens, device=device, autocast=autocast)
    parts = to_rollout(episodes, seeds, tokenizer, device)
    input_ids = torch.cat([parts["prompt_ids"], parts["response_ids"]], 1)
    attention = torch.cat([parts["prompt_mask"], parts["context_mask"]], 1).long()
    logprobs, values, ref_logprobs, entropy = score_tokens(
        policy, ref, input_ids, attention, parts["response_ids"].shape[1], temperature=cfg.rollout.temperature,
        batch_size=forward_batch_size, autocast=autocast)
    policy.train(was_training)
    m = parts["response_mask"].float()
    parts["sampling_logprobs"] = parts["sampling_logprobs"] * m
    return Rollout(logprobs=logprobs * m, ref_logprobs=ref_logprobs * m, values=values * m, entropy=entropy * m,
                   **parts)


def summary(episodes_or_fields, rewards: list[float] | None = None) -> dict:
    """``success_rate`` (over the episodes whose environment reports success), ``turns_mean`` and ``return_mean``
    of a batch of episodes (or of a rollout's fields with its episode rewards)."""
    if isinstance(episodes_or_fields, dict):
        f = episodes_or_fields
        success, turns = f.get("success", []), f.get("turns", [])
    else:
        success = [e.success for e in episodes_or_fields]
        turns = [e.turns for e in episodes_or_fields]
        rewards = [e.total_reward for e in episodes_or_fields]
    out = {"turns_mean": sum(turns) / max(1, len(turns))}
    if rewards is not None:
        out["return_mean"] = sum(rewards) / max(1, len(rewards))
    if any(s is not None for s in success):  # an episode cut off before the environment said counts as failed
        out["success_rate"] = sum(bool(s) for s in success) / len(success)
    return out


def evaluate(lm: nn.Module, tokenizer, envs: list, seeds: list[int], cfg, *, chat: bool, max_prompt_tokens: int,
             device, autocast=contextlib.nullcontext, greedy: bool = True) -> tuple[dict, list[Episode]]:
    """The policy on the episodes of ``seeds`` (held-out: :func:`eval_seeds`), ``len(envs)`` at a time: the
    :func:`summary` and the episodes."""
    episodes: list[Episode] = []
    for start in range(0, len(seeds), len(envs)):
        chunk = seeds[start:start + len(envs)]
        episodes += play(lm, tokenizer, envs[:len(chunk)], chunk, cfg, chat=chat,
                         max_prompt_tokens=max_prompt_tokens, greedy=greedy, device=device, autocast=autocast)
    return summary(episodes), episodes


def prompt_room(cfg, model_config) -> int:
    """The first observation's token budget: data.max_prompt_tokens, less what the model's context cannot hold
    beside env.max_tokens. UserError when nothing is left."""
    from .models import context_length

    context = context_length(model_config)
    if context is None:
        return cfg.data.max_prompt_tokens
    room = min(cfg.data.max_prompt_tokens, context - cfg.env.max_tokens)
    if room < 1:
        raise UserError(f"env.max_tokens ({cfg.env.max_tokens}) leaves no room for the first observation in the "
                        f"model's context of {context} tokens", "env.max_tokens")
    return room


#: Held-out episodes use seeds from here on; training seeds stay below it (env.seeds is capped there).
EVAL_SEED_BASE = 1_000_000_000


def eval_seeds(n: int) -> list[int]:
    return [EVAL_SEED_BASE + i for i in range(n)]
