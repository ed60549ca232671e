"""User errors (bad input: exit code 2, one line) as opposed to bugs (a traceback).

The library raises :class:`UserError` for anything the user can fix; the CLI turns it into a single line
``error: <where>: <what>`` and exit code 2. Bugs keep their tracebacks.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A problem with the user's input, reported as one line.

    ``where`` names the place (``config.yaml:12: ppo.lr`` or ``data.jsonl:7``), ``what`` says what is wrong.
    """

    exit_code = 2

    def __init__(self, what: str, where: str | None = None):
        self.what = what
        self.where = where
        super().__init__(f"{where}: {what}" if where else what)


class ConfigError(UserError):
    """A config field is unknown, of the wrong type, out of range, or names a missing file."""

    def __init__(self, field: str, what: str, source: str | None = None, line: int | None = None):
        self.field = field
        place = f"{source}:{line}" if source and line else source
        super().__init__(what, f"{place}: {field}" if place else field)


class RewardError(UserError):
    """A reward source raised, returned NaN/inf, or returned the wrong length or type."""


class TrainingDiverged(UserError):
    """Training stopped because a quantity went non-finite repeatedly or the KL passed its bound."""

    exit_code = 3


def closest_name(key: str, names: list[str]) -> str | None:
    """The name in ``names`` that ``key`` was most likely meant to be (for "did you mean" hints), or None."""
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    related = [n for n in names if len(n) > 1 and (n in key or key in n)]
    return max(related, key=len) if related else None
