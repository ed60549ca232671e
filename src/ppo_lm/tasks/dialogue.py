"""Dialogue: the InstructGPT recipe on Anthropic's HH-RLHF (harmless-base) preference data. Supervised fine-tuning
on the preferred replies, a pairwise (Bradley-Terry) reward model on the preference pairs, then PPO against that
reward model; the policy answers the last human turn of a real conversation.

The measure of success is the reward model's own preference: on prompts no stage saw, the share of them on which
the PPO policy's reply scores higher than the SFT policy's (``ppo-lm eval --compare`` reports it as
``after_preferred``), with the KL between the two; and the reward model's pairwise accuracy on held-out pairs
(``pairs_heldout.jsonl``, which no stage trains on). The task's own metrics are about the replies alone.

Files: ``sft.jsonl`` (chosen conversations), ``pairs.jsonl`` (prompt conversation, chosen and rejected reply),
``train.jsonl`` (PPO prompts), ``heldout.jsonl`` (evaluation prompts) and ``pairs_heldout.jsonl`` (their pairs).
The three training sets are drawn from the same pool of conversations; the held-out ones share no prompt with it.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

NAME = "dialogue"
SUMMARY = ("answer the last turn of a conversation (HH-RLHF harmless); SFT -> pairwise reward model -> PPO; "
           "metric = reward-model preference over the SFT policy")
#: ``hh_harmless``: ../shared/assets/hh_rlhf_harmless_base (2012 preference pairs of real dialogues).
SOURCES = ("hh_harmless",)
#: Conversations held out from every stage (the evaluation prompts and the reward model's unseen pairs).
N_HELDOUT = 300
#: How many of the training pool (about 1700 conversations) SFT and PPO read: sized so that the recipe on
#: SmolLM2-135M fits its share of ``make results`` on 2 CPU cores. The reward model reads every pair of the pool:
#: its accuracy is what data buys (1024 pairs: 0.60 held-out accuracy, measured on SmolLM2-135M).
N_SFT, N_PPO = 512, 1024

_TURN = re.compile(r"\n\n(Human|Assistant): ")


def conversation(text: str) -> list[dict] | None:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` as chat messages (user/assistant, alternating, starting with the
    user); None when the text does not have that shape or a turn is empty."""
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        return None
    messages = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
                for who, said in zip(parts[1::2], parts[2::2])]
    roles_alternate = all(m["role"] == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(messages))
    if not roles_alternate or not all(m["content"] for m in messages):
        return None
    return messages


def pair(record: dict) -> dict | None:
    """A preference record as ``{prompt: messages, chosen: reply, rejected: reply}``: both dialogues must end with
    an assistant reply after the same turns, and the replies must differ."""
    chosen, rejected = conversation(record["chosen"]), conversation(record["rejected"])
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or chosen[:-1] != rejected[:-1]:
        return None
    if chosen[-1]["content"] == rejected[-1]["content"]:
        return None
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def build(assets: Path, source: str) -> dict[str, list[dict]]:
    from . import read_jsonl

    pairs = [p for p in map(pair, read_jsonl(assets / "hh_rlhf_harmless_base" / "test_dev.jsonl")) if p]
    random.Random(1).shuffle(pairs)
    heldout = pairs[:N_HELDOUT]
    seen = {repr(p["prompt"]) for p in heldout}
    pool = [p for p in pairs[N_HELDOUT:] if repr(p["prompt"]) not in seen]
    return {
        "sft.jsonl": [{"messages": [*p["prompt"], {"role": "assistant", "content": p["chosen"]}]} for p in pool[:N_SFT]],
        "pairs.jsonl": pool,
        "train.jsonl": [{"messages": p["prompt"]} for p in pool[:N_PPO]],
        "heldout.jsonl": [{"messages": p["prompt"]} for p in heldout],
        "pairs_heldout.jsonl": heldout,
    }


def metrics(completions: list[str], fields: dict[str, list]) -> dict[str, float]:
    """About the replies alone (the reward model's preference is the measure of success): the share that are
    empty, and the mean number of words."""
    n = max(1, len(completions))
    return {"empty_reply": sum(not c.strip() for c in completions) / n,
            "reply_words": sum(len(c.split()) for c in completions) / n}
