"""``ppo-lm sft``: supervised fine-tuning on (prompt, response) demonstrations, the first stage of
SFT -> reward model -> PPO. The loss is the next-token cross-entropy on the response tokens only; prompts are
wrapped in the chat template when the tokenizer has one. The saved ``final/`` is a plain transformers folder that
``ppo-lm train`` takes as its policy.

:func:`fit` is the small supervised loop shared with :mod:`ppo_lm.reward_model`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import torch

from .config import ModelConfig
from .configfile import check_ranges, located_error, looks_local, ranged
from .data import (MESSAGES, check_messages, format_prompt, load_records, pad_right, right_padded,
                   use_chat_template)
from .distributed import accelerator_for, check_lora, fit_engine, global_mean, on_main, whole
from .errors import UserError
from .models import apply_lora, check_causal_lm, load_causal_lm, load_tokenizer, save_merged
from .tracking import MetricsLog

IGNORE = -100  # label of tokens that carry no loss (prompt and padding), as torch's cross_entropy expects

# ------------------------------------------------------------------------ the config of the SFT stage (and of
# the reward-model stage, which shares model, optim and train)


@dataclass
class OptimConfig:
    #: Passes over the training split.
    epochs: int = ranged(1, "> 0")
    #: Examples per optimiser step (split into gradient_accumulation_steps micro-batches). In pairwise mode an
    #: example is a pair.
    batch_size: int = ranged(16, "> 0")
    #: Micro-batches accumulated per optimiser step.
    gradient_accumulation_steps: int = ranged(1, "> 0")
    #: Learning rate (AdamW).
    lr: float = ranged(5e-5, "> 0")
    #: Learning-rate schedule: constant, linear or cosine.
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    #: Linear warm-up steps.
    warmup_steps: int = ranged(0, ">= 0")
    #: AdamW weight decay.
    weight_decay: float = ranged(0.0, ">= 0")
    #: Clip the gradient norm to this value (null = no clipping).
    max_grad_norm: float | None = ranged(1.0, "> 0")


@dataclass
class StageRunConfig:
    #: Where metrics.jsonl and final/ are written.
    output_dir: str = "runs/stage"
    #: Random seed (also decides the held-out split).
    seed: int = 0
    #: Mixed precision through accelerate: no, bf16 or fp16.
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    #: Force the CPU even when a GPU is present.
    cpu: bool = False
    #: Show the rich progress display.
    progress: bool = True


@dataclass
class SFTDataConfig:
    #: Demonstrations: .jsonl/.json/.csv/.parquet, a datasets folder or a hub name. Required.
    path: str = ""
    #: Split to read when the source has splits.
    split: str = "train"
    #: Field holding the prompt. A record may instead hold a conversation (a list of {role, content} messages, in
    #: "messages" or in this field) whose last turn, the assistant's, is the response to imitate.
    prompt_field: str = "prompt"
    #: Field holding the response to imitate (the loss is on these tokens only).
    response_field: str = "response"
    #: Prompt + response are cut to this many tokens (the prompt is shortened first, from the left).
    max_length: int = ranged(512, "> 0")
    #: Wrap prompts in the tokenizer's chat template: "auto" (when it has one), "on" or "off".
    chat_template: Literal["auto", "on", "off"] = "auto"
    #: Fraction of the records held out for evaluation.
    eval_fraction: float = ranged(0.1, "[0, 1)")


@dataclass
class SFTConfig:
    """``ppo-lm sft``: supervised fine-tuning on (prompt, response) records."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: StageRunConfig = field(default_factory=lambda: StageRunConfig(output_dir="runs/sft"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate_stage(cfg, *, source: str = "config", lines: dict[str, int] | None = None,
                   check_paths: bool = True) -> None:
    """Checks for the SFT and reward-model configs."""
    lines = lines or {}

    def fail(key: str, what: str) -> None:
        raise located_error(key, what, source, lines.get(key))

    if not cfg.model.name_or_path:
        fail("model.name_or_path", "is required (a transformers folder or a hub model name)")
    check_ranges(cfg, fail)
    o = cfg.optim
    if o.batch_size % o.gradient_accumulation_steps:
        fail("optim.gradient_accumulation_steps", f"optim.batch_size ({o.batch_size}) must be divisible by it")
    if not cfg.data.path:
        fail("data.path", "is required (a .jsonl/.csv/.parquet file, a datasets folder or a hub dataset name)")
    if check_paths:
        for key, value in [("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer),
                           ("data.path", cfg.data.path), ("data.eval_path", getattr(cfg.data, "eval_path", ""))]:
            if value and looks_local(value) and not Path(value).expanduser().exists():
                fail(key, f"no such file or directory: {value}")


SFTConfig.validate_config = staticmethod(validate_stage)


# ------------------------------------------------------------------------------------------- the stage


def split_records(records: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the first ``eval_fraction`` of it held out (at least one record when asked for)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(records) - 1, max(1, round(eval_fraction * len(records)))) if eval_fraction > 0 else 0
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


def encode_example(tokenizer, prompt: str | list[dict], response: str, max_length: int,
                   chat: bool) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + EOS and their labels: IGNORE on the prompt, the token itself on the
    response. Too long: the prompt is shortened from the left first, then the response from the right."""
    prompt_ids = tokenizer(format_prompt(tokenizer, prompt, chat), add_special_tokens=not chat)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    keep_prompt = max(1, max_length - len(response_ids)) if len(prompt_ids) + len(response_ids) > max_length else len(prompt_ids)
    prompt_ids = prompt_ids[-keep_prompt:]
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the response tokens of a right-padded batch, and how many tokens it covers."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE)
    return loss, int((labels != IGNORE).sum())


STAGE_FIELDS = {"train_micro_batch_size_per_gpu": "optim.batch_size", "gradient_clipping": "optim.max_grad_norm",
                "gradient_accumulation_steps": "optim.gradient_accumulation_steps",
                "train_batch_size": "optim.batch_size"}  #: the stage's fields behind DeepSpeed's entries


def stage_accelerator(run: StageRunConfig, optim: OptimConfig, console):
    """The stage's ``Accelerator`` (made after the output folder is checked, before anything is written). On
    several processes, only the main one prints and writes."""
    return accelerator_for(console, cpu=run.cpu, mixed_precision=run.mixed_precision,
                           gradient_accumulation_steps=optim.gradient_accumulation_steps)


def fit(accelerator, model, train_batches: Callable[[int], Iterable[dict]], n_steps_per_epoch: int, loss_fn,
        optim: OptimConfig, *, evaluate: Callable[[], dict], log: MetricsLog, console) -> list[dict]:
    """AdamW + schedule + gradient accumulation + clipping through accelerate; one metrics row per epoch (and
    one before training), each with the held-out evaluation. ``train_batches`` gives this process's share."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = get_scheduler(optim.lr_schedule, optimizer, num_warmup_steps=optim.warmup_steps,
                              num_training_steps=max(1, optim.epochs * n_steps_per_epoch))
    # the schedule stays unprepared: accelerate would step it once per process at each optimiser step
    fit_engine(accelerator, micro_batch=optim.batch_size // optim.gradient_accumulation_steps,
               max_grad_norm=optim.max_grad_norm, fields=STAGE_FIELDS)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them with its sharded ones
    rows = [{"epoch": 0, "train_loss": None, **evaluate(), "time_s": 0.0}]
    log.log(rows[0], step=0)
    console.print(f"before training: {json.dumps({k: v for k, v in rows[0].items() if v is not None})}")
    for epoch in range(1, optim.epochs + 1):
        start, losses = time.perf_counter(), []
        model.train()
        for batch in train_batches(epoch):
            batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with accelerator.accumulate(model), accelerator.autocast():
                loss = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and optim.max_grad_norm:
                    accelerator.clip_grad_norm_(params, optim.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not optimizer.step_was_skipped:  # fp16: a skipped step
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        model.eval()
        train_loss = global_mean(accelerator, sum(losses) / max(1, len(losses)))
        row = {"epoch": epoch, "train_loss": train_loss, **evaluate(),
               "lr": scheduler.get_last_lr()[0], "time_s": time.perf_counter() - start}
        rows.append(row)
        log.log(row, step=epoch)
        console.print(f"epoch {epoch}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}")
    return rows


def micro_batches(examples: list, optim: OptimConfig, seed: int, collate, rank: int = 0,
                  world: int = 1) -> Callable[[int], Iterable[dict]]:
    """A fresh seeded shuffle each epoch (the same on every process), cut into micro-batches of
    batch_size / gradient_accumulation_steps examples; process ``rank`` of ``world`` gets every world-th example
    of each, so that the processes share the data and each sees as many batches (a last micro-batch with fewer
    examples than processes is filled from the start of the shuffle)."""
    micro = optim.batch_size // optim.gradient_accumulation_steps

    def batches(epoch: int):
        order = list(range(len(examples)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        for s in range(0, len(order), micro):
            chunk = order[s:s + micro]
            chunk += order[:max(0, world - len(chunk))]
            yield collate([examples[i] for i in chunk[rank::world]])
    return batches


def encode_examples(d: SFTDataConfig, tokenizer, records: list[dict] | None) -> list[tuple[list[int], list[int]]]:
    """The demonstrations (``records``, or the file ``d.path``) as (ids, labels) pairs; a record without its
    two string fields is an error naming its line."""
    records = records if records is not None else load_records(d.path, d.split)
    if not records:
        raise UserError("the dataset is empty", d.path)
    chat = use_chat_template(tokenizer, d.chat_template)
    examples = []
    for i, r in enumerate(records):
        where = f"{d.path}:{r.get('__line__', i + 1)}"
        prompt, response = demonstration(r, d, chat, where)
        examples.append(encode_example(tokenizer, prompt, response, d.max_length, chat))
    return examples


def demonstration(record: dict, d: SFTDataConfig, chat: bool, where: str) -> tuple[str | list[dict], str]:
    """A record's (prompt, response): two string fields; a conversation in the prompt field and the string response
    that answers it; or a conversation (``messages``, or a list in the prompt field) whose last turn, the
    assistant's, is the response to learn and the turns before it the prompt."""
    key = d.prompt_field if isinstance(record.get(d.prompt_field), list) else MESSAGES
    conversation = record.get(key)
    if conversation is not None:
        messages = check_messages(conversation, where, key)
        if not chat:
            raise UserError(f"field {key!r} holds a conversation, which needs the tokenizer's chat template (the "
                            "tokenizer has none, or data.chat_template is off)", where)
        if key == d.prompt_field and isinstance(record.get(d.response_field), str):
            return messages, record[d.response_field]
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise UserError(f"a demonstration conversation in {key!r} must end with an assistant turn after at least "
                            "one other turn", where)
        return messages[:-1], messages[-1]["content"]
    for f in (d.prompt_field, d.response_field):
        if not isinstance(record.get(f), str):
            raise UserError(f"record needs a string field {f!r} (or a {MESSAGES!r} conversation)", where)
    return record[d.prompt_field], record[d.response_field]


@torch.no_grad()
def held_out_loss(model, eval_set: list, collate) -> dict:
    """Token-mean NLL and perplexity of ``model`` on the held-out examples (``{}`` when there are none)."""
    if not eval_set:
        return {}
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for s in range(0, len(eval_set), 32):
        batch = {k: v.to(device) for k, v in collate(eval_set[s:s + 32]).items()}
        loss, n = lm_loss(model, batch)
        total, tokens = total + float(loss) * n, tokens + n
    nll = total / max(1, tokens)
    return {"eval_loss": nll, "eval_perplexity": math.exp(min(nll, 50.0))}


def write_final(model, tokenizer, out: Path, summary: dict) -> None:
    """``final/`` (LoRA merged) and ``summary.json``; a failure to write is one line naming the folder."""
    try:
        save_merged(model, tokenizer, out / "final")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    except OSError as e:
        raise UserError(f"could not write {out}: {e.strerror or e}", "train.output_dir") from None


def start_files(accelerator, out: Path) -> None:
    """The main process makes the output folder and an empty metrics.jsonl."""
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    accelerator.wait_for_everyone()


def run(cfg: SFTConfig, *, records: list[dict] | None = None, console=None) -> dict:
    """Fine-tune ``cfg.model`` on the demonstrations; returns a summary (also in ``summary.json``)."""
    from rich.console import Console

    from .runtime import check_output_dir, seed_everything

    console = console or Console(stderr=True, soft_wrap=True)
    out = check_output_dir(cfg.train.output_dir)
    accelerator = stage_accelerator(cfg.train, cfg.optim, console)
    check_lora(accelerator, cfg.model.lora.enabled)
    seed_everything(cfg.train.seed)
    check_causal_lm(cfg.model.name_or_path, "model.name_or_path", trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                               trust_remote_code=cfg.model.trust_remote_code, notice=console.print,
                               field="model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    tokenizer.padding_side = "right"
    examples = encode_examples(cfg.data, tokenizer, records)
    train_set, eval_set = split_records(examples, cfg.data.eval_fraction, cfg.train.seed)

    model = load_causal_lm(cfg.model.name_or_path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora, "CAUSAL_LM")
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def collate(rows):
        ids, mask = right_padded([r[0] for r in rows], tokenizer.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": pad_right([r[1] for r in rows], IGNORE)}

    evaluate = functools.partial(held_out_loss, model, eval_set, collate)
    start_files(accelerator, out)
    steps = math.ceil(len(train_set) / cfg.optim.batch_size)
    rows = fit(accelerator, model, micro_batches(train_set, cfg.optim, cfg.train.seed, collate,
                                                 accelerator.process_index, accelerator.num_processes),
               steps, lambda m, b: lm_loss(m, b)[0], cfg.optim, evaluate=evaluate,
               log=MetricsLog(out / "metrics.jsonl", accelerator), console=console)
    tokenizer.padding_side = "left"  # the saved model is a policy: prompts are left-padded for generation
    summary = {"train_examples": len(train_set), "eval_examples": len(eval_set),
               "eval_loss_before": rows[0].get("eval_loss"), "eval_loss_after": rows[-1].get("eval_loss"),
               "output": str(out / "final")}
    with whole(accelerator, model):  # ZeRO-3's shards gathered
        on_main(accelerator, lambda: write_final(model, tokenizer, out, summary), "train.output_dir")
    return summary
