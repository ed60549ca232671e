"""``ppo-lm reward-model``: the second pipeline stage. Trains an ``AutoModelForSequenceClassification``

* **pairwise** on (prompt, chosen, rejected) records with the Bradley-Terry loss
  ``-log sigmoid(r(chosen) - r(rejected))`` (Ouyang et al. 2022), reporting pairwise accuracy on a held-out split;
* **pointwise** on (text, label) records with cross-entropy, reporting accuracy.

The saved ``final/`` is what a ``{type: model, path: ...}`` reward source reads (1 label: the logit is the
reward; 2 labels: logit[1] - logit[0]).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .config import ModelConfig
from .configfile import ranged
from .data import check_messages, load_records, right_padded, use_chat_template
from .errors import UserError
from .gguf_source import is_gguf
from .models import apply_lora, load_pretrained, load_tokenizer
from .rewards.model import ENCODING_KEY, encode_for_reward
from .distributed import check_lora, on_main, whole
from .sft import (OptimConfig, StageRunConfig, fit, micro_batches, split_records, stage_accelerator, start_files,
                  validate_stage, write_final)
from .tracking import MetricsLog


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: ``-mean(log sigmoid(r_chosen - r_rejected))``."""
    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()


@dataclass
class RMDataConfig:
    #: Preference or labelled data: .jsonl/.json/.csv/.parquet, a datasets folder or a hub name. Required.
    path: str = ""
    #: Split to read when the source has splits.
    split: str = "train"
    #: "pairwise": (prompt, chosen, rejected) with a Bradley-Terry loss; "pointwise": (text, label) classification.
    mode: Literal["pairwise", "pointwise"] = "pairwise"
    #: pairwise: field with the shared prompt ("" or missing = none; chosen/rejected are then full texts), a text or
    #: a conversation (a list of {role, content} messages).
    prompt_field: str = "prompt"
    #: pairwise: field with the preferred completion: a text, or a conversation ending with the assistant's turn (the
    #: completion; the turns before it extend the prompt).
    chosen_field: str = "chosen"
    #: pairwise: field with the other completion.
    rejected_field: str = "rejected"
    #: pointwise: field with the text.
    text_field: str = "text"
    #: pointwise: field with the integer label (0 .. num_labels-1).
    label_field: str = "label"
    #: pointwise: number of classes (2 gives a reward of logit[1] - logit[0]).
    num_labels: int = ranged(2, ">= 2")
    #: Texts are cut to this many tokens (from the left, so the end of a dialogue is kept).
    max_length: int = ranged(512, "> 0")
    #: pairwise: read (prompt, completion) as a user/assistant exchange in the tokenizer's chat template: "auto"
    #: (when it has one), "on" or "off". Saved with the model, so PPO scores completions the same way.
    chat_template: Literal["auto", "on", "off"] = "auto"
    #: Fraction of the records held out for evaluation (pairwise accuracy / accuracy); unused with eval_path.
    eval_fraction: float = ranged(0.1, "[0, 1)")
    #: Train on only the first N records of path (null = all of them); a smaller, quicker stage.
    limit: int | None = ranged(None, "> 0")
    #: A separate file of evaluation records, in the layout of path ("" = hold out eval_fraction of path instead);
    #: all of path is then trained on.
    eval_path: str = ""


@dataclass
class RewardModelConfig:
    """``ppo-lm reward-model``: a reward model from preferences (Bradley-Terry) or labels."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: StageRunConfig = field(default_factory=lambda: StageRunConfig(output_dir="runs/reward-model"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RewardModelConfig.validate_config = staticmethod(validate_stage)


def load_records_checked(cfg: RewardModelConfig, records: list[dict] | None, path: str | None = None) -> list[tuple]:
    """The training records (``path``: another file of the same layout, e.g. data.eval_path) as examples, each
    checked; the first bad one is an error naming its file and line."""
    d = cfg.data
    path = path or d.path
    records = records if records is not None else load_records(path, d.split)
    if not records:
        raise UserError("the dataset is empty", path)
    out = []
    for i, r in enumerate(records):
        where = f"{path}:{r.get('__line__', i + 1)}"
        if d.mode == "pairwise":
            out.append(tuple(preference_side(r, d, f, where) for f in (d.chosen_field, d.rejected_field)))
        else:
            label = r.get(d.label_field)
            if not isinstance(r.get(d.text_field), str):
                raise UserError(f"record needs a string field {d.text_field!r} (data.mode: pointwise)", where)
            try:
                label = int(label)
            except (TypeError, ValueError):
                raise UserError(f"label {label!r} in field {d.label_field!r} is not an integer", where) from None
            if not 0 <= label < d.num_labels:
                raise UserError(f"label {label} is outside 0..{d.num_labels - 1} (data.num_labels)", where)
            out.append((r[d.text_field], label))
    return out


def preference_side(record: dict, d: RMDataConfig, key: str, where: str) -> tuple[str | list[dict], str]:
    """One side of a preference pair as (prompt, completion). The prompt is a text ("" for none) or a conversation;
    the side is a text, or a conversation whose last turn, the assistant's, is the completion (then the turns before
    it, after the prompt's, are part of the prompt: both layouts of the hub's conversational preference data)."""
    prompt, side = record.get(d.prompt_field) or "", record.get(key)
    if isinstance(prompt, list):
        check_messages(prompt, where, d.prompt_field)
    elif not isinstance(prompt, str):
        raise UserError(f"field {d.prompt_field!r} must be a string or a list of messages", where)
    if isinstance(side, str):
        return prompt, side
    if not isinstance(side, list):
        raise UserError(f"record needs a string field {key!r} or a conversation (data.mode: pairwise)", where)
    turns = check_messages(side, where, key)
    if turns[-1]["role"] != "assistant":
        raise UserError(f"the conversation in {key!r} must end with an assistant turn", where)
    if isinstance(prompt, str) and prompt:
        turns = [{"role": "user", "content": prompt}, *turns]
    before = (prompt if isinstance(prompt, list) else []) + turns[:-1]
    if not before:
        raise UserError(f"the conversation in {key!r} has no turn before the assistant's", where)
    return before, turns[-1]["content"]


def run(cfg: RewardModelConfig, *, records: list[dict] | None = None, console=None) -> dict:
    """Train the reward model; returns a summary with held-out accuracy before and after (``summary.json``)."""
    from rich.console import Console

    from .models import load_config_checked
    from .runtime import check_output_dir, seed_everything

    console = console or Console(stderr=True, soft_wrap=True)
    out = check_output_dir(cfg.train.output_dir)
    accelerator = stage_accelerator(cfg.train, cfg.optim, console)
    check_lora(accelerator, cfg.model.lora.enabled)
    seed_everything(cfg.train.seed)
    d = cfg.data
    kind = "classifier" if is_classifier(cfg.model.name_or_path) else "causal"  # start from a classifier or an LM
    config = load_config_checked(cfg.model.name_or_path, kind=kind, field="model.name_or_path",
                                 trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                               trust_remote_code=cfg.model.trust_remote_code, notice=console.print,
                               field="model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    examples = load_records_checked(cfg, records)[:d.limit]
    held = load_records_checked(cfg, None, d.eval_path) if d.eval_path else None
    for path, rows in ((d.path, examples), (d.eval_path, held or [])):
        if d.mode == "pairwise" and any(isinstance(prompt, list) for pair in rows for prompt, _ in pair) \
                and not use_chat_template(tokenizer, d.chat_template):
            raise UserError("the preference data hold conversations, which need the tokenizer's chat template (the "
                            "tokenizer has none, or data.chat_template is off)", path)
    train_set, eval_set = (examples, held) if held is not None else split_records(examples, d.eval_fraction,
                                                                                  cfg.train.seed)
    model, chat = _load_model(cfg, config, tokenizer)
    collate, loss_fn = objective(d.mode, tokenizer, lambda p, c: encode_for_reward(tokenizer, p, c, d.max_length, chat))

    start_files(accelerator, out)
    steps = math.ceil(len(train_set) / cfg.optim.batch_size)
    rows = fit(accelerator, model, micro_batches(train_set, cfg.optim, cfg.train.seed, collate,
                                                 accelerator.process_index, accelerator.num_processes),
               steps, loss_fn, cfg.optim, evaluate=lambda: held_out(model, eval_set, d.mode, collate, loss_fn),
               log=MetricsLog(out / "metrics.jsonl", accelerator), console=console)
    final = out / "final"
    summary = {"mode": d.mode, "train_examples": len(train_set), "eval_examples": len(eval_set),
               "eval_accuracy_before": rows[0].get("eval_accuracy"), "eval_accuracy_after": rows[-1].get("eval_accuracy"),
               "output": str(final)}
    with whole(accelerator, model):  # ZeRO-3's shards gathered
        on_main(accelerator, lambda: write_final(model, tokenizer, out, summary), "train.output_dir")
    return summary


def _load_model(cfg: RewardModelConfig, config, tokenizer):
    """The classifier to train (a new score head on a causal LM, or an existing classifier), with the record of
    how its texts are encoded in its config (saved in config.json, where the reward source reads it); returns
    the model and whether texts go through the chat template."""
    from transformers import AutoModelForSequenceClassification

    d = cfg.data
    config.num_labels, config.pad_token_id = 1 if d.mode == "pairwise" else d.num_labels, tokenizer.pad_token_id
    chat = d.mode == "pairwise" and use_chat_template(tokenizer, d.chat_template)
    setattr(config, ENCODING_KEY, {"chat_template": chat, "max_length": d.max_length, "truncation_side": "left"})
    model = load_pretrained(AutoModelForSequenceClassification, cfg.model.name_or_path, kind="classifier",
                            field="model.name_or_path", config=config, dtype=cfg.model.dtype,
                            trust_remote_code=cfg.model.trust_remote_code, ignore_mismatched_sizes=True)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora, "SEQ_CLS")
    return model, chat


def objective(mode: str, tokenizer, encode):
    """``(collate, loss_fn)`` of a training mode. pairwise: rows of ((prompt, chosen), (prompt, rejected)),
    batched interleaved (chosen, rejected, chosen, ...) under the Bradley-Terry loss; pointwise: rows of
    (text, label) under cross-entropy."""
    if mode == "pairwise":
        def collate(rows):
            ids, mask = right_padded([encode(*pair) for r in rows for pair in r], tokenizer.pad_token_id)
            return {"input_ids": ids, "attention_mask": mask}

        def loss_fn(m, b):
            scores = m(**b).logits[:, 0].float()
            return pairwise_loss(scores[0::2], scores[1::2])
    else:
        def collate(rows):
            ids, mask = right_padded([encode("", r[0]) for r in rows], tokenizer.pad_token_id)
            return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r[1] for r in rows])}

        def loss_fn(m, b):
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            return torch.nn.functional.cross_entropy(logits, b["labels"])
    return collate, loss_fn


@torch.no_grad()
def held_out(model, eval_set: list, mode: str, collate, loss_fn) -> dict:
    """Loss and accuracy on the held-out split: pairwise, the fraction of pairs scored chosen > rejected;
    pointwise, argmax accuracy."""
    if not eval_set:
        return {}
    device = next(model.parameters()).device
    correct, losses = 0, []
    for s in range(0, len(eval_set), 16):
        b = {k: v.to(device) for k, v in collate(eval_set[s:s + 16]).items()}
        losses.append(float(loss_fn(model, b)))
        if mode == "pairwise":
            scores = model(**b).logits[:, 0]
            correct += int((scores[0::2] > scores[1::2]).sum())
        else:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            correct += int((logits.argmax(-1) == b["labels"]).sum())
    return {"eval_loss": sum(losses) / len(losses), "eval_accuracy": correct / len(eval_set)}


def is_classifier(name_or_path: str) -> bool:
    """Whether a local folder's config names a sequence-classification architecture (False when it cannot be
    read: the model check then says why)."""
    if is_gguf(name_or_path):  # GGUF files hold causal LMs
        return False
    p = Path(name_or_path, "config.json")
    try:
        archs = json.loads(p.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in archs)
