"""Prompt datasets: records from .jsonl/.json/.csv/.parquet files, saved ``datasets`` folders or hub names;
chat templates when the tokenizer has one; and a deterministic, resumable sampler.

JSON Lines files are parsed here, line by line, so that a malformed line is reported with its number.
Everything else goes through the ``datasets`` library.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


def load_records(path: str, split: str = "train", field: str = "data.path") -> list[dict]:
    """All records of a dataset as dicts. Raises :class:`UserError` naming the file and line on bad input."""
    p = Path(path).expanduser()
    if p.suffix == ".jsonl" or (p.suffix == ".json" and p.is_file() and _first_char(p) == "{"):
        return _read_jsonl(p, field)
    if p.suffix == ".json" and p.is_file():
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"not valid JSON: {e.msg}", f"{p}:{e.lineno}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError("a .json dataset must be a list of objects", str(p))
        return data
    if p.suffix == ".csv" and p.is_file():
        with p.open(newline="", encoding="utf-8") as f:
            return [dict(row) for row in csv.DictReader(f)]
    if p.suffix in {".jsonl", ".json", ".csv", ".parquet"} and not p.exists():
        raise UserError(f"no such file: {p}", field)
    return _read_with_datasets(path, split, field)


def _first_char(p: Path) -> str:
    with p.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line.strip()[0]
    return ""


def _read_jsonl(p: Path, field: str) -> list[dict]:
    if not p.is_file():
        raise UserError(f"no such file: {p}", field)
    records = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"malformed JSON line: {e.msg} (column {e.colno})", f"{p}:{lineno}") from None
            if not isinstance(record, dict):
                raise UserError(f"each line must be a JSON object, got {type(record).__name__}", f"{p}:{lineno}")
            record["__line__"] = lineno
            records.append(record)
    return records


def _read_with_datasets(path: str, split: str, field: str) -> list[dict]:
    import datasets

    p = Path(path).expanduser()
    try:
        if p.suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
        elif p.is_dir() and any((p / n).exists() for n in ("dataset_info.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # datasets raises many kinds; all mean "cannot read this dataset"
        raise UserError(f"cannot load dataset {path!r}: {type(e).__name__}: {str(e).splitlines()[0]}", field) from None
    return [dict(r) for r in ds]


#: The fields key under which a conversation prompt reaches the rewards whole (the turns the policy answers), beside
#: the prompt text, which is its last user turn; a reward model reads it in its chat template.
PROMPT_MESSAGES = "prompt_messages"


@dataclass
class PromptDataset:
    """Tokenised prompts plus the other fields of each record (passed to reward functions)."""

    #: the prompt text the rewards see: the record's own text (the user message when a chat template wraps it
    #: for the model; a reward model applies its own template), or the decoded tokens after a truncation
    prompts: list[str]
    token_ids: list[list[int]]  #: its tokens, at most max_prompt_tokens
    fields: list[dict]  #: the record's other fields

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: list[int]) -> tuple[list[str], list[list[int]], dict[str, list]]:
        keys = sorted({k for i in indices for k in self.fields[i]})
        fields = {k: [self.fields[i].get(k) for i in indices] for k in keys}
        return [self.prompts[i] for i in indices], [self.token_ids[i] for i in indices], fields


def pad_right(rows: list[list], value, *, width: int = 0, dtype=None):
    """``[B]`` lists -> a ``[B, L]`` tensor, each row filled with ``value`` up to the longest row, or to ``width``
    when that is longer (a batch of empty rows still gives ``[B, width]``). ``dtype``: that of ``value`` by
    default (``torch.long`` for an int), so that a batch of empty rows keeps it too."""
    import torch

    width = max(width, *map(len, rows))
    dtype = dtype or (torch.long if isinstance(value, int) else torch.get_default_dtype())
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype)


def right_padded(rows: list[list[int]], pad_id: int):
    """``input_ids`` and ``attention_mask`` ``[B, L]`` of token-id rows padded on the right with ``pad_id``."""
    return pad_right(rows, pad_id), pad_right([[1] * len(r) for r in rows], 0)


def use_chat_template(tokenizer, mode: str, field: str = "data.chat_template") -> bool:
    has = getattr(tokenizer, "chat_template", None) is not None
    if mode == "on" and not has:
        raise UserError("the tokenizer has no chat template", field)
    return has if mode == "auto" else mode == "on"


#: The field a conversational record keeps its turns in (the layout of TRL and the hub's chat datasets).
MESSAGES = "messages"


def check_messages(value, where: str, field: str = MESSAGES) -> list[dict]:
    """A conversation as the chat templates take it: a non-empty list of ``{"role", "content"}`` string pairs."""
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise UserError(f"field {field!r} must be a non-empty list of messages, each "
                        '{"role": "...", "content": "..."} with string values', where)
    return value


def format_prompt(tokenizer, prompt: str | list[dict], chat: bool) -> str:
    """The text the model is given for a prompt: a string as it is (or as the one user message of the chat
    template, with ``chat``), a conversation (a list of messages) through the chat template, ending with the
    assistant's turn opened."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def conversation_prompt(value, chat: bool, where: str, field: str) -> list[dict]:
    """A conversation used as a prompt: checked, its last assistant turn (a demonstration, where the record has
    one) dropped, so that the policy answers the last user turn; it needs the chat template."""
    messages = check_messages(value, where, field)
    if not chat:
        raise UserError(f"field {field!r} holds a conversation, which needs the tokenizer's chat template "
                        "(the tokenizer has none, or data.chat_template is off)", where)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise UserError(f"field {field!r} holds only an assistant turn: there is nothing to answer", where)
    return messages


def build_prompt_dataset(records: list[dict], tokenizer, data_cfg, *, source: str | None = None,
                         warn=warnings.warn) -> PromptDataset:
    """Check, template and tokenise prompt records (``data_cfg``: a DataConfig)."""
    source = source or data_cfg.path
    if not records:
        raise UserError("the dataset is empty", source)
    chat = use_chat_template(tokenizer, data_cfg.chat_template)
    prompts, ids, fields, truncated = [], [], [], 0
    for i, record in enumerate(records):
        line = record.get("__line__", i + 1)
        where = f"{source}:{line}"
        key = data_cfg.prompt_field if data_cfg.prompt_field in record or MESSAGES not in record else MESSAGES
        if key not in record:
            known = ", ".join(k for k in record if k != "__line__")
            raise UserError(f"record has no field {data_cfg.prompt_field!r} (data.prompt_field; it has: {known}) "
                            f"and no {MESSAGES!r}", where)
        text = record[key]
        if isinstance(text, list):  # a conversation: the rewards see its last turn, the model all of it
            messages = conversation_prompt(text, chat, where, key)
            raw, text = messages[-1]["content"], format_prompt(tokenizer, messages, chat)
        elif isinstance(text, str):
            raw, text = text, format_prompt(tokenizer, text, chat)
        else:
            raise UserError(f"field {key!r} must be a string or a list of messages, got {type(text).__name__}", where)
        tokens = tokenizer(text, add_special_tokens=not chat)["input_ids"]
        if len(tokens) > data_cfg.max_prompt_tokens:
            if data_cfg.prompt_overflow == "error":
                raise UserError(f"prompt has {len(tokens)} tokens, over data.max_prompt_tokens "
                                f"({data_cfg.max_prompt_tokens}); raise it or set data.prompt_overflow: truncate", where)
            tokens = tokens[-data_cfg.max_prompt_tokens:]
            raw = tokenizer.decode(tokens, skip_special_tokens=False)
            truncated += 1
        if not tokens:
            raise UserError("prompt is empty after tokenisation", where)
        prompts.append(raw)
        ids.append(tokens)
        fields.append({k: v for k, v in record.items() if k not in ("__line__",)})
        if isinstance(record[key], list):
            fields[-1][PROMPT_MESSAGES] = messages
    if truncated:
        warn(f"{truncated} of {len(records)} prompts were longer than data.max_prompt_tokens "
             f"({data_cfg.max_prompt_tokens}) and were truncated from the left")
    return PromptDataset(prompts=prompts, token_ids=ids, fields=fields)


class PromptSampler:
    """Draws batches of indices epoch by epoch (a fresh permutation per epoch when shuffling). Its state is two
    integers, so a resumed run draws exactly the batches the uninterrupted run would have."""

    def __init__(self, n: int, *, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(k - len(out), self.n - self.position)
            out += self._order[self.position:self.position + take]
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
