"""The config reference, docs/config.md and docs/config.zh-CN.md, generated from the schema: each table between
``<!-- schema: NAME -->`` and ``<!-- /schema -->`` is written from that config dataclass's fields, their
defaults and their ``#:`` comments (English) or docs/config.zh-CN.yaml (the Chinese of each comment). The prose
around the tables is hand-written and kept. ``--check`` fails when a page is out of date or a field has no
Chinese text (tests/test_docs.py runs it).

    python scripts/config_reference.py [--check]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ppo_lm import config, reward_model, sft  # noqa: E402
from ppo_lm.pipeline import PipelineConfig  # noqa: E402

SCHEMAS = {c.__name__: c for c in (config.Config, config.ModelConfig, config.LoraConfig, config.DataConfig,
                                   config.RolloutConfig, config.RewardConfig, config.RewardSourceConfig,
                                   config.PPOConfig, config.KLConfig, config.TrainConfig, config.EvalConfig,
                                   config.DoctorConfig, config.EnvConfig, sft.OptimConfig,
                                   sft.StageRunConfig, sft.SFTDataConfig, reward_model.RMDataConfig, PipelineConfig)}
PAGES = {"en": ROOT / "docs" / "config.md", "zh": ROOT / "docs" / "config.zh-CN.md"}
ZH = ROOT / "docs" / "config.zh-CN.yaml"
HEADER = {"en": "| key | default | meaning |", "zh": "| 键 | 默认值 | 含义 |"}
BLOCK = re.compile(r"(<!-- schema: (\w+)(?: only=([\w,]+))? -->\n)(.*?)(<!-- /schema -->)", re.S)


def comments(cls) -> dict[str, str]:
    """Each field's ``#:`` comment lines, joined."""
    out, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
        elif re.match(r"^\w+\s*:", s) and pending:
            out[s.split(":")[0].strip()] = " ".join(pending)
            pending = []
        elif not s.startswith("#"):
            pending = []
    return out


def default(f: dataclasses.Field, cls=None) -> str:
    if cls is sft.StageRunConfig and f.name == "output_dir":  # each stage's own default
        return (f'`"{sft.SFTConfig().train.output_dir}"` (sft), '
                f'`"{reward_model.RewardModelConfig().train.output_dir}"` (reward-model)')
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value):
        return ""  # a section of its own
    if isinstance(value, float):
        text = repr(value)
        text = re.sub(r"e-0(\d)", r"e-\1", text)
        return f"`{text}`"
    return f"`{json.dumps(value)}`" if not (isinstance(value, list) and value and dataclasses.is_dataclass(value[0])) \
        else "one `sentiment` source"


def choices(cls, name: str, meaning: str) -> str:
    """The values of a ``Literal`` field, when its comment does not already name them all (the reward types
    come from the registry, so their list is not written by hand)."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is not typing.Literal or all(str(a) in meaning for a in typing.get_args(hint)):
        return ""
    return " | ".join(f"`{a}`" for a in typing.get_args(hint))


def table(cls, lang: str, zh: dict, only: list[str] | None, missing: list[str]) -> str:
    en = comments(cls)
    rows = [HEADER[lang], "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if (only and f.name not in only) or (f.default_factory is not dataclasses.MISSING
                                             and dataclasses.is_dataclass(f.default_factory())):
            continue  # a section of its own, with its own table
        meaning = en.get(f.name, "")
        if lang == "zh":
            key = f"{cls.__name__}.{f.name}"
            meaning = zh.get(key) or ""
            if not meaning:
                missing.append(key)
        if options := choices(cls, f.name, en.get(f.name, "")):
            meaning += f" One of: {options}." if lang == "en" else f"可选：{options}。"
        if "range" in f.metadata:  # the rule the config check applies (config.ranged)
            meaning += f" Range: {f.metadata['range']}." if lang == "en" else f"取值范围：{f.metadata['range']}。"
        rows.append(f"| `{f.name}` | {default(f, cls)} | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


def render(lang: str, zh: dict, missing: list[str]) -> str:
    text = PAGES[lang].read_text()

    def fill(m):
        cls = SCHEMAS[m.group(2)]
        only = m.group(3).split(",") if m.group(3) else None
        return m.group(1) + table(cls, lang, zh, only, missing) + m.group(5)
    return BLOCK.sub(fill, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if a page differs from what the schema gives")
    args = ap.parse_args()
    zh = yaml.safe_load(ZH.read_text()) or {}
    stale, missing = [], []
    for lang, page in PAGES.items():
        new = render(lang, zh, missing)
        if new != page.read_text():
            stale.append(str(page.relative_to(ROOT)))
            if not args.check:
                page.write_text(new)
    if missing:
        print("no Chinese text in docs/config.zh-CN.yaml for: " + ", ".join(sorted(set(missing))), file=sys.stderr)
        return 1
    if args.check and stale:
        print("out of date (run python scripts/config_reference.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
