"""``ppo_lm/word-game``: find a secret four-letter word from letter-by-letter feedback.

Each turn the policy names a word (the first four-letter word of its reply counts); the environment marks each
letter ``+`` (right letter, right place), ``?`` (in the word, elsewhere) or ``-`` (not in the word, or not that
many times), the rule of the well-known five-letter game. Reward 1 for finding the word.
"""

from __future__ import annotations

import re
from collections import Counter

from . import TextEnv

#: The secret words: common four-letter English words (the project's own list).
WORDS = ("bake bark bell bird boat bold bone book cake calm card care cold cook corn dark dish door dust farm fast "
         "fish fork gate gold hand hard heat home hope king lamp land leaf lime love mail milk mind moon nest note "
         "park pear pine rain ring road rock rose salt sand seed ship shoe sing snow star tree wind wolf word").split()
GUESS = re.compile(r"\b[a-z]{4}\b")


def feedback(guess: str, secret: str) -> str:
    """The marks of ``guess`` against ``secret``: ``+`` right place, ``?`` elsewhere, ``-`` absent (a letter
    guessed more often than the secret has it is marked ``?`` only as many times as the secret has it left over
    after the ``+`` marks)."""
    marks = ["+" if g == s else "-" for g, s in zip(guess, secret)]
    left = Counter(s for s, m in zip(secret, marks) if m != "+")
    for i, g in enumerate(guess):
        if marks[i] != "+" and left[g] > 0:
            marks[i], left[g] = "?", left[g] - 1
    return " ".join(marks)


class WordGame(TextEnv):
    """The secret is drawn from ``words`` (default :data:`WORDS`); a guess need not be on the list."""

    def __init__(self, words: list[str] | None = None, reward: float = 1.0):
        self.words = [w.lower() for w in (words or WORDS)]
        if not self.words or any(not re.fullmatch(r"[a-z]{4}", w) for w in self.words):
            raise ValueError("words must be four-letter words")
        self.reward, self.secret = reward, self.words[0]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.secret = self.words[int(self.np_random.integers(len(self.words)))]
        return ("Guess my secret four-letter word. For each letter I answer + (right place), ? (elsewhere in "
                "the word) or - (not in it). Reply with one word."), {}

    def step(self, action: str):
        found = GUESS.search(action.lower())
        if found is None:
            return "Reply with one four-letter word.", 0.0, False, False, {"success": False}
        guess = found.group()
        if guess == self.secret:
            return "Correct!", self.reward, True, False, {"success": True}
        return f"{guess}: {feedback(guess, self.secret)}", 0.0, False, False, {"success": False}


def optimal_player(observation: str, history: list[tuple[str, str]], words: list[str] | None = None) -> str:
    """The first listed word that agrees with every reply so far (a greedy solver, not a minimax one: it finds
    every word of the default list within 6 turns, which the tests check)."""
    candidates = list(words or WORDS)
    for action, reply in history:
        guess = GUESS.search(action.lower()).group()
        marks = reply.partition(": ")[2]
        candidates = [w for w in candidates if w != guess and feedback(guess, w) == marks]
    return candidates[0]
