"""Text environments: tasks a language model talks to, in the Gymnasium style.

An environment gives an observation (text), the policy answers (text), the environment replies and in the end
scores the episode::

    observation, info = env.reset(seed=7)
    observation, reward, terminated, truncated, info = env.step("I guess 8")

The shipped ones are registered with ``gymnasium`` when ppo_lm is imported, so ``gymnasium.make("ppo_lm/NAME")``
makes them (or ``gymnasium.make("ppo_lm:ppo_lm/NAME")`` without importing ppo_lm first):

- ``ppo_lm/guess-number``: find a secret number from "higher"/"lower" replies;
- ``ppo_lm/arithmetic``: compute an expression, with a calculator the model may call first;
- ``ppo_lm/word-game``: find a secret four-letter word from letter-by-letter feedback;
- ``ppo_lm/single-turn``: a prompt dataset and reward sources as one-step episodes (what ``ppo-lm train``
  does without an environment, behind the same interface).

The trainer plays a batch of episodes at once (:mod:`ppo_lm.episodes`): the policy's tokens are the actions; the
environment's replies are context, outside the policy loss, the value targets and the KL. Write your own by
subclassing :class:`TextEnv` (or any ``gymnasium.Env`` whose observations and actions are strings) and name it in
the config (``env: {id: path/to/file.py:MyEnv}``) or pass it to ``ppo_lm.train(cfg, env=MyEnv)``. docs/envs.md.
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable

import gymnasium
from gymnasium import spaces

from ..errors import UserError, closest_name


class Utterance(spaces.Text):
    """Any string of at most ``max_length`` characters (gymnasium's ``Text`` admits only its charset; a model's
    reply can hold any character). ``sample`` draws printable ASCII."""

    def __init__(self, max_length: int = 4096):
        super().__init__(max_length=max_length, min_length=0, charset=string.printable)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length


class TextEnv(gymnasium.Env):
    """Base of the text environments: observations and actions are strings.

    Subclasses implement ``reset(seed=..., options=...) -> (observation, info)`` (calling ``super().reset(seed=seed)``
    first seeds ``self.np_random``) and ``step(action) -> (observation, reward, terminated, truncated, info)``. An
    ``info["success"]`` (bool) at the end of an episode becomes the run's ``success_rate``. The episode's turn
    limit is the trainer's (``env.max_turns``), so ``step`` need not count turns.
    """

    metadata: dict = {"render_modes": []}
    observation_space = Utterance()
    action_space = Utterance()


class SingleTurn(TextEnv):
    """A prompt dataset and a reward as one-step episodes: ``reset(seed)`` gives prompt ``seed % len(records)``
    (so held-out seeds land on the same prompts: evaluate on held-out prompts without an environment),
    ``step(answer)`` scores it and ends the episode. ``records``: dicts with a ``prompt`` (their other fields go to
    the reward, as in a dataset), or ``data``: a dataset file; ``reward_fn`` (the reward protocol) or ``reward``:
    a reward section as in a config (``{"sources": [...]}``)."""

    def __init__(self, records: list[dict] | None = None, reward_fn: Callable | None = None, *,
                 data: str | None = None, reward: dict | None = None, prompt_field: str = "prompt"):
        from ..data import load_records

        self.records = list(records) if records is not None else load_records(data) if data else []
        if not self.records:
            raise UserError("single-turn needs records or data (a prompt dataset)", "env.kwargs")
        if reward_fn is None:
            if reward is None:
                raise UserError("single-turn needs reward_fn or reward (a reward section)", "env.kwargs")
            reward_fn = _shared_reward(reward)
        self.reward_fn, self.prompt_field = reward_fn, prompt_field
        self.record: dict = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        index = seed if seed is not None else int(self.np_random.integers(len(self.records)))
        self.record = self.records[index % len(self.records)]
        return str(self.record[self.prompt_field]), {}

    def step(self, action: str):
        prompt = str(self.record[self.prompt_field])
        fields = {k: [v] for k, v in self.record.items() if k != self.prompt_field}
        reward = float(self.reward_fn([prompt], [action], fields)[0])
        return "", reward, True, False, {}


_REWARDS: dict[str, Callable] = {}


def _shared_reward(section: dict) -> Callable:
    """The reward of a reward section, built once per process however many environments use it (the trainer
    makes one environment per episode, and a reward model should load once)."""
    import json

    from ..config import RewardConfig
    from ..configfile import Builder
    from ..rewards import build_reward

    key = json.dumps(section, sort_keys=True, default=str)
    if key not in _REWARDS:
        _REWARDS[key] = build_reward(Builder("env.kwargs.reward").build(RewardConfig, section, "", None))
    return _REWARDS[key]


#: The shipped environments: id -> entry point (``module:Class``).
SHIPPED = {
    "ppo_lm/guess-number": "ppo_lm.envs.guess_number:GuessNumber",
    "ppo_lm/arithmetic": "ppo_lm.envs.arithmetic:Arithmetic",
    "ppo_lm/word-game": "ppo_lm.envs.word_game:WordGame",
    "ppo_lm/single-turn": "ppo_lm.envs:SingleTurn",
}


def register() -> None:
    """Register the shipped environments with gymnasium (again is a no-op)."""
    for env_id, entry_point in SHIPPED.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point=entry_point, disable_env_checker=True)


def make(spec: str | type | Callable, kwargs: dict | None = None, field: str = "env.id"):
    """One environment from a config's ``env.id`` (a gymnasium id such as ``ppo_lm/guess-number``, or
    ``path/to/file.py:Class`` / ``module:Class``) or from a class or factory (library use), made with ``kwargs``.
    A bad name or bad kwargs raise :class:`UserError` naming ``field``."""
    kwargs = dict(kwargs or {})
    register()
    if isinstance(spec, str):
        module, _, name = spec.rpartition(":")
        if spec in gymnasium.registry or (module and not module.endswith(".py") and re.search(r"/|-v\d+$", name)):
            # a registered id, or gymnasium's own "module:Namespace/Name-v0" (the module registers it on import)
            factory = lambda **kw: gymnasium.make(spec, **kw)  # noqa: E731
        elif ":" in spec and not spec.startswith("ppo_lm/"):
            from ..rewards.python import import_function

            factory = import_function(spec, field)
        else:
            known = sorted(k for k in gymnasium.registry if k.startswith("ppo_lm/"))
            close = closest_name(spec, known)
            hint = f"; did you mean {close!r}?" if close else f" (shipped: {', '.join(known)})"
            raise UserError(f"unknown environment {spec!r}{hint}; a file of your own: 'path/to/file.py:Class'", field)
    elif callable(spec):
        factory = spec
    else:
        raise UserError(f"expected an environment class, factory or id, got {type(spec).__name__}", field)
    try:
        env = factory(**kwargs)
    except UserError:
        raise
    except (TypeError, ValueError, gymnasium.error.Error) as e:  # a keyword it does not take, or a bad value
        raise UserError(f"cannot make the environment with env.kwargs {kwargs}: {e}", field) from None
    if not (hasattr(env, "reset") and hasattr(env, "step")):
        raise UserError(f"{spec!r} made a {type(env).__name__}, which has no reset/step", field)
    return env


register()

__all__ = ["SHIPPED", "SingleTurn", "TextEnv", "Utterance", "make", "register"]
