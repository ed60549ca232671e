"""Reading config files, knowing no field names: YAML with the line of every key (``yaml.safe_load`` semantics),
dotted ``key=value`` overrides, typed building into dataclasses with did-you-mean for unknown keys, ranges
declared on the fields, and renamed keys. Errors name the field, the file and the line: ``cfg.yaml:7:
ppo.lr_rate: unknown key (did you mean 'lr'?)``. The schemas live with their commands (:mod:`ppo_lm.config` for
PPO, :mod:`ppo_lm.sft` and :mod:`ppo_lm.reward_model` for the stages, :mod:`ppo_lm.pipeline`)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import warnings
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError, closest_name

# ------------------------------------------------------------------------------------------ ranges


RANGES = ("> 0", ">= 0", "> 1", ">= 2", "[0, 1]", "(0, 1]", "[0, 1)")


def ranged(default, rule: str):
    """A config field whose value must satisfy ``rule`` (one of :data:`RANGES`); null passes. The rule sits on
    the field, so the checks and the generated config reference read it from one place."""
    assert rule in RANGES, rule
    return field(default=default, metadata={"range": rule})


def range_problem(value, rule: str) -> str | None:
    """What is wrong with ``value`` under ``rule``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    low, high = {"> 0": (0, None), ">= 0": (0, None), "> 1": (1, None), ">= 2": (2, None), "[0, 1]": (0, 1), "(0, 1]": (0, 1),
                 "[0, 1)": (0, 1)}[rule]
    if value < low or (high is not None and value > high) or (rule == "[0, 1)" and value >= 1):
        return f"must be {'in ' + rule if high is not None else rule}, got {value}"
    if value == 1 and rule == "> 1":
        return f"must be > 1, got {value}"
    if value == 0 and rule in ("> 0", "(0, 1]"):
        return "must be > 0" if rule == "(0, 1]" else f"must be > 0, got {value}"
    return None


def check_ranges(obj, fail, prefix: str = "") -> None:
    """Every ranged field of a config dataclass (nested sections and lists of them included): ``fail(key,
    what)`` on the first value out of its range."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, fail, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_ranges(item, fail, f"{key}.{i}.")
        elif "range" in f.metadata and value is not None and not isinstance(value, bool):
            problem = range_problem(value, f.metadata["range"])
            if problem:
                fail(key, problem)


# ------------------------------------------------------------------------------------ renamed keys


class ConfigDeprecationWarning(FutureWarning):
    """A config key that was renamed: it still works, under its new name."""


def move_renamed_keys(raw: dict, renamed_keys: dict[str, dict[str, str]], source: str = "config",
                      defaults: dict | None = None) -> dict:
    """Move the renamed keys of ``raw`` (a nested config dict) to their new places, in place, warning once per
    key. ``renamed_keys``: per section, old key -> its new dotted place in the section. Giving a key under both
    names, with different values, is an error. ``defaults`` (the schema's defaults as a dict) tells a new key set
    by the user from one only filled in with its default."""
    for section, renamed in renamed_keys.items():
        node = raw.get(section)
        if not isinstance(node, dict):
            continue
        lines = getattr(node, "lines", {})
        for old in [k for k in node if k in renamed]:
            new = renamed[old]
            *parents, last = new.split(".")
            target, default = node, (defaults or {}).get(section, {})
            for part in parents:
                if not isinstance(target.get(part), dict):
                    target[part] = _Located()
                    target[part].lines = {}
                target, default = target[part], default.get(part, {}) if isinstance(default, dict) else {}
            line = lines.get(old)
            if last in target and target[last] != node[old] and target[last] != default.get(last, object()):
                raise located_error(f"{section}.{old}", f"is the old name of {section}.{new}, which is also set; keep only "
                                                 f"{section}.{new}", source, line)
            target[last] = node.pop(old)
            if isinstance(target, _Located):
                target.lines[last] = line if line is not None else COMMAND_LINE
            place = "command line" if line == COMMAND_LINE else f"{source}:{line}" if line else source
            warnings.warn(f"{place}: {section}.{old} is deprecated; use {section}.{new}", ConfigDeprecationWarning,
                          stacklevel=2)
    return raw


# ----------------------------------------------------------------------------------------- YAML with lines


COMMAND_LINE = 0  # the "line" of a value that came from a key=value override


class _Located(dict):
    """A mapping that remembers the source line of each of its keys."""

    lines: dict[str, int]


def _compose(text: str, source: str) -> Any:
    """Parse YAML like ``yaml.safe_load`` but keep the line number of every mapping key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)  # where the broken construct began
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("(yaml)", f"not valid YAML: {problem}", source, line) from None
    if node is None:
        return _Located()
    constructor = yaml.SafeLoader("")

    def build(n: yaml.Node) -> Any:
        if isinstance(n, yaml.MappingNode):
            out = _Located()
            out.lines = {}
            for k, v in n.value:
                key = constructor.construct_object(k, deep=True)
                out[str(key)] = build(v)
                out.lines[str(key)] = k.start_mark.line + 1
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(v) for v in n.value]
        return constructor.construct_object(n, deep=True)

    return build(node)


# ----------------------------------------------------------------------------------------- overrides


def apply_override(raw: dict, item: str) -> None:
    """Apply one command-line override ``key.path=value`` (the value read as YAML) to a raw config dict in place."""
    if "=" not in item:
        raise ConfigError(item, "override must look like key=value (e.g. ppo.lr=1e-5)", "command line")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(part, node, ".".join(parts[: i + 1]))]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = _Located()
            node[part].lines = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, key)] = value
    else:
        node[last] = value
        if isinstance(node, _Located):
            node.lines[last] = COMMAND_LINE


def _index(part: str, seq: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(seq):
        raise ConfigError(key, f"no list item {part!r} (the list has {len(seq)} items)", "command line")
    return int(part)


# ----------------------------------------------------------------------------------- typed building


def located_error(field: str, what: str, source: str, line: int | None) -> ConfigError:
    if line == COMMAND_LINE:
        return ConfigError(field, what, "command line")
    return ConfigError(field, what, source, line)


class Builder:
    def __init__(self, source: str):
        self.source = source

    def where(self, lines: dict | None, key: str) -> int | None:
        return (lines or {}).get(key)

    def build(self, cls: type, raw: Any, prefix: str, line: int | None) -> Any:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise located_error(prefix or "(top level)", f"expected a mapping, got {_describe(raw)}", self.source, line)
        lines = getattr(raw, "lines", None)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in raw.items():
            dotted = f"{prefix}.{key}" if prefix else key
            key_line = self.where(lines, key)
            if key not in names:
                close = closest_name(key, names)
                hint = f" (did you mean '{close}'?)" if close else f" (known keys: {', '.join(names)})"
                raise located_error(dotted, f"unknown key{hint}", self.source, key_line)
            kwargs[key] = self.convert(hints[key], value, dotted, key_line)
        return cls(**kwargs)

    def convert(self, tp: Any, value: Any, dotted: str, line: int | None) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, dotted, line)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            errors = []
            for arg in (a for a in args if a is not type(None)):
                try:
                    return self.convert(arg, value, dotted, line)
                except ConfigError as e:
                    errors.append(e)
            if len(errors) == 1:
                raise errors[0]
            raise located_error(dotted, f"expected {_type_name(tp)}, got {_describe(value)}", self.source, line)
        if origin is Literal:
            if isinstance(value, bool) and {"on", "off"} <= set(args):
                value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
            if value not in args:
                choices = ", ".join("null" if a is None else str(a) for a in args)
                close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise located_error(dotted, f"must be one of {choices}, got {value!r}{hint}", self.source, line)
            return value
        if origin is list:
            if not isinstance(value, list):
                raise located_error(dotted, f"expected a list, got {_describe(value)}", self.source, line)
            return [self.convert(args[0], v, f"{dotted}.{i}", line) for i, v in enumerate(value)]
        if tp is dict or origin is dict:
            if not isinstance(value, dict):
                raise located_error(dotted, f"expected a mapping, got {_describe(value)}", self.source, line)
            return dict(value)
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string; accept it as the number it is
                try:
                    return float(value)
                except ValueError:
                    pass
        elif tp is str:
            if isinstance(value, str):
                return value
        raise located_error(dotted, f"expected {_type_name(tp)}, got {_describe(value)}", self.source, line)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "null"
    kind = {int: "an integer", float: "a number", str: "a string", list: "a list"}.get(type(value))
    if isinstance(value, dict):
        kind = "a mapping"
    return f"{value!r} ({kind})" if kind and not isinstance(value, (dict, list)) else (kind or type(value).__name__)


# ------------------------------------------------------------------------------------------ loading


def load(schema: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
         renamed: dict[str, dict[str, str]] | None = None, check=None, check_paths: bool = True) -> Any:
    """``schema`` (a config dataclass) from the YAML file at ``path`` (defaults when None), with ``key=value``
    overrides applied, renamed keys moved (with a warning), then ``check(cfg, source=, lines=, check_paths=)``:
    the schema's own validation. Raises :class:`ConfigError` naming the field, file and line."""
    source = str(path) if path is not None else "command line"
    raw: Any = _Located()
    raw.lines = {}
    if path is not None:
        raw = _read_yaml(path)
    defaults = dataclasses.asdict(schema())
    raw = _with_defaults(defaults, raw)
    for item in overrides:
        apply_override(raw, item)
    if renamed:
        move_renamed_keys(raw, renamed, source, defaults)
    cfg = Builder(source).build(schema, raw, "", None)
    if check is not None:
        check(cfg, source=source, lines=_flatten_lines(raw), check_paths=check_paths)
    return cfg


def read_config(schema: type, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """``schema`` (a config dataclass) from the YAML file at ``path`` with ``key=value`` overrides applied: the same
    YAML rules and the same errors (field, file and line) for unknown keys and wrong types as every config, and no
    other checks (the caller validates what its schema means)."""
    raw = _read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    return Builder(str(path)).build(schema, raw, "", None)


def _read_yaml(path: str | Path) -> _Located:
    """The mapping of sections in the YAML file at ``path``, each key with its line."""
    p, source = Path(path), str(path)
    if not p.is_file():
        raise ConfigError("config", f"no such file: {p}", str(p))
    raw = _compose(p.read_text(encoding="utf-8"), source)
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", f"expected a mapping of sections, got {_describe(raw)}", source, 1)
    return raw


def _with_defaults(defaults: Any, raw: Any) -> Any:
    """``raw`` with every section and field it leaves out filled from ``defaults`` (so overrides can reach into
    default lists such as ``reward.sources.0``). Lists in ``raw`` replace the default list whole."""
    if not isinstance(raw, dict) or not isinstance(defaults, dict):
        return raw
    out = _Located()
    out.lines = dict(getattr(raw, "lines", {}))
    for key, value in defaults.items():
        if key not in raw:
            out[key] = _located_copy(value)
    for key, value in raw.items():
        out[key] = _with_defaults(defaults[key], value) if key in defaults else value
    return out


def _located_copy(value: Any) -> Any:
    if isinstance(value, dict):
        out = _Located()
        out.lines = {}
        out.update({k: _located_copy(v) for k, v in value.items()})
        return out
    if isinstance(value, list):
        return [_located_copy(v) for v in value]
    return value


def _flatten_lines(raw: Any, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            dotted = f"{prefix}.{key}" if prefix else key
            if key in getattr(raw, "lines", {}):
                out[dotted] = raw.lines[key]
            out.update(_flatten_lines(value, dotted))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            out.update(_flatten_lines(value, f"{prefix}.{i}"))
    return out


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in {".jsonl", ".json", ".csv", ".parquet", ".txt", ".gguf"} \
        or name.count("/") > 1 or Path(name).exists()
