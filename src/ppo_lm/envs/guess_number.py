"""``ppo_lm/guess-number``: find a secret whole number from "higher" / "lower" replies.

Each turn the policy names a number (the first whole number in its reply counts); the environment answers
"higher", "lower", or ends the episode with reward 1 when it is right. Binary search always finds it within
``ceil(log2(high - low + 2))`` turns (5 for 1..16), so ``env.max_turns: 6`` leaves room for one wasted turn.
"""

from __future__ import annotations

import re

from . import TextEnv

NUMBER = re.compile(r"-?\d{1,30}")


class GuessNumber(TextEnv):
    """``low``..``high`` (inclusive) holds the secret; ``reward`` for finding it, ``turn_penalty`` taken for every
    turn (0: any number of turns within the limit is as good)."""

    def __init__(self, low: int = 1, high: int = 16, reward: float = 1.0, turn_penalty: float = 0.0):
        if high <= low:
            raise ValueError(f"high ({high}) must be above low ({low})")
        self.low, self.high, self.reward, self.turn_penalty = low, high, reward, turn_penalty
        self.secret, self.turns = low, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.secret, self.turns = int(self.np_random.integers(self.low, self.high + 1)), 0
        return (f"I am thinking of a number from {self.low} to {self.high}. Guess it: reply with one number. "
                f"I will say higher or lower."), {}

    def step(self, action: str):
        self.turns += 1
        found = NUMBER.search(action)
        info = {"turns": self.turns, "success": False}
        if found is None:
            return f"Reply with one number from {self.low} to {self.high}.", -self.turn_penalty, False, False, info
        guess = int(found.group())
        if guess == self.secret:
            return "Correct!", self.reward - self.turn_penalty, True, False, {**info, "success": True}
        return ("higher." if guess < self.secret else "lower."), -self.turn_penalty, False, False, info


def optimal_player(observation: str, history: list[tuple[str, str]], low: int = 1, high: int = 16) -> str:
    """Binary search over what the replies so far allow (``history``: (action, reply) pairs)."""
    for action, reply in history:
        guess = int(NUMBER.search(action).group())
        if reply.startswith("higher"):
            low = max(low, guess + 1)
        elif reply.startswith("lower"):
            high = min(high, guess - 1)
    return str((low + high) // 2)
