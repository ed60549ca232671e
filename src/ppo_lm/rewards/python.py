"""User rewards given as ``module:function`` or ``path/to/file.py:function``.

The function is imported only because the config names it. It is called as
``function(prompts, completions, **fields, **kwargs)`` and returns one float per completion.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ..errors import UserError


def import_function(spec: str, field: str = "reward.function"):
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise UserError(f"expected 'module:function', got {spec!r}", field)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"no such file: {path}", field)
            mod_spec = importlib.util.spec_from_file_location(f"ppo_lm_user_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # like `python -m`: modules beside the user's config work
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot import {module_name!r}: {type(e).__name__}: {e}", field) from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UserError(f"{module_name!r} has no function {func_name!r}", field)
    return fn


class PythonReward:
    """A user's function as a reward source (``type: python``)."""

    options = ("function", "kwargs")

    @staticmethod
    def check(src):
        if not src.function or ":" not in src.function:
            yield "function", "a 'python' reward needs function: 'module:function'"

    @classmethod
    def from_config(cls, src, *, device=None, key: str = "reward.sources.0"):
        return cls(src.function, src.kwargs, field=f"{key}.function")

    def __init__(self, spec: str, kwargs: dict | None = None, field: str = "reward.function"):
        self.fn = import_function(spec, field)
        self.kwargs = dict(kwargs or {})

    def __call__(self, prompts, completions, fields):
        return self.fn(list(prompts), list(completions), **fields, **self.kwargs)
