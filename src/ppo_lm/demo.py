"""The embedded offline demo: no network, no downloaded weights.

1. Generate a corpus of short movie reviews, half glowing and half scathing, from a small grammar.
2. Pre-train a small GPT-2 on it with a word-level tokenizer (our code, about a minute on 2 CPU cores; cached).
3. PPO with the VADER sentiment scorer as reward: continuations of neutral review openings become positive,
   while the KL penalty keeps them fluent and close to the pre-trained model.
4. Print a before/after table, write metrics.jsonl and PNG plots.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch

from . import toy
from .runtime import cache_root

NOUNS = ["movie", "film", "story", "acting", "plot", "ending", "soundtrack", "cast", "script", "music",
         "dialogue", "pacing", "characters", "camera work", "lead actor", "villain", "humor", "finale"]
POSITIVE = ["great", "wonderful", "beautiful", "brilliant", "amazing", "excellent", "fun", "charming",
            "delightful", "funny", "good", "lovely", "superb", "moving", "clever", "fantastic"]
NEGATIVE = ["terrible", "boring", "awful", "bad", "dull", "horrible", "poor", "weak", "stupid", "painful",
            "ugly", "disappointing", "annoying", "messy", "lazy", "pointless"]
ADVERBS = ["really", "truly", "very", "quite", "so", "rather", "simply"]
PEOPLE = ["sister", "brother", "friends", "parents", "kids", "wife", "husband", "roommate", "class"]
DAYS = ["monday", "friday", "saturday", "sunday", "a rainy night", "a long flight", "the weekend"]
SUBJECTS = ["a detective", "a family", "two sisters", "a young teacher", "an old sailor", "a robot", "a singer",
            "a small town", "a dog", "a chef"]
PLACES = ["paris", "the mountains", "a big city", "space", "the desert", "a tiny village", "new york", "london"]
LIKE = {"pos": ["loved", "enjoyed", "adored", "liked"], "neg": ["hated", "disliked", "regretted", "could not stand"]}
RECOMMEND = {"pos": ["i would recommend it to everyone", "i want to see it again", "i will watch it again"],
             "neg": ["i would not recommend it to anyone", "i want my money back", "i will never watch it again"]}
PROMPTS = ["the movie was", "i watched this film with my", "the story is about", "honestly , the",
           "i saw it on", "the acting", "my friends said the", "after the first hour , the", "overall the",
           "this film is about", "the ending", "i went to see it with my", "the director", "in the end the"]
# Openings never used in training, for the before/after evaluation (built from corpus words only).
HELDOUT_PROMPTS = ["the soundtrack was", "my sister said the", "i watched it on friday with my", "the cast",
                   "this movie is", "the plot was", "overall , the film", "the music"]


def _adj(rng: random.Random, mood: str) -> str:
    words = POSITIVE if mood == "pos" else NEGATIVE
    return rng.choice(words)


def review(rng: random.Random) -> str:
    """One review: a neutral opener and two to four sentences that mostly share one mood."""
    mood = rng.choice(["pos", "neg"])
    sentences = []
    if rng.random() < 0.6:
        sentences.append(rng.choice([
            f"i watched it on {rng.choice(DAYS)} with my {rng.choice(PEOPLE)} .",
            f"the story is about {rng.choice(SUBJECTS)} in {rng.choice(PLACES)} .",
            f"i saw it on {rng.choice(DAYS)} .",
            f"this film is about {rng.choice(SUBJECTS)} .",
        ]))
    for _ in range(rng.randint(2, 4)):
        m = mood if rng.random() < 0.85 else ("neg" if mood == "pos" else "pos")
        a, n = _adj(rng, m), rng.choice(NOUNS)
        sentences.append(rng.choice([
            f"the {n} was {rng.choice(ADVERBS)} {a} .",
            f"the {n} was {a} and the {rng.choice(NOUNS)} was {_adj(rng, m)} .",
            f"i {rng.choice(LIKE[m])} the {n} .",
            f"it is a {a} film .",
            f"what a {a} movie .",
            f"overall , the {n} is {a} .",
            f"my {rng.choice(PEOPLE)} said the {n} was {a} .",
            f"{RECOMMEND[m][rng.randrange(3)]} .",
        ]))
    return " ".join(sentences)


def vocabulary() -> list[str]:
    words: set[str] = set()
    for group in (NOUNS, POSITIVE, NEGATIVE, ADVERBS, PEOPLE, DAYS, SUBJECTS, PLACES, PROMPTS,
                  LIKE["pos"], LIKE["neg"], RECOMMEND["pos"], RECOMMEND["neg"]):
        for phrase in group:
            words.update(phrase.split())
    words.update("i watched it on with my the story is about a in saw this film was and what movie overall , "
                 "said . to".split())
    return sorted(words)


# ------------------------------------------------------------------------------------ pre-training

MODEL_SHAPE = dict(n_layer=3, n_embd=128, n_head=4, n_positions=96)
PRETRAIN = dict(reviews=40000, steps=1200, batch=64, lr=3e-3, seed=0)


def cache_dir() -> Path:
    key = hashlib.sha256(json.dumps([MODEL_SHAPE, PRETRAIN, vocabulary(), review(random.Random(7))]).encode())
    return cache_root() / f"demo-model-{key.hexdigest()[:12]}"


def pretrain(out_dir: Path, log=print) -> Path:
    """Train the demo's language model on the generated corpus and save it as a transformers folder."""
    rng = random.Random(PRETRAIN["seed"])
    tokenizer = toy.word_tokenizer(vocabulary(), model_max_length=MODEL_SHAPE["n_positions"])
    model = toy.gpt2(tokenizer, seed=PRETRAIN["seed"], **MODEL_SHAPE)
    eos = tokenizer.eos_token_id
    docs = [tokenizer(review(rng))["input_ids"] + [eos] for _ in range(PRETRAIN["reviews"])]
    assert tokenizer.unk_token_id not in {t for d in docs[:2000] for t in d}, "corpus word missing from vocabulary"
    stream = torch.tensor([t for d in docs for t in d])
    block = 64
    n_blocks = stream.numel() // (block + 1)
    data = stream[: n_blocks * (block + 1)].view(n_blocks, block + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01)
    steps = PRETRAIN["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(PRETRAIN["seed"])
    model.train()
    start = time.time()
    for step in range(steps):
        batch = data[torch.randint(0, n_blocks, (PRETRAIN["batch"],), generator=g)]
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            log(f"  pre-training step {step + 1:4d}/{steps}  loss {out.loss.item():.3f}  ({time.time() - start:.0f}s)")
    model.eval()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    toy.save_model(model, tokenizer, tmp)
    tmp.rename(out_dir)
    return out_dir


def demo_model(log=print) -> Path:
    path = cache_dir()
    if (path / "config.json").exists():
        log(f"using the cached demo model in {path}")
        return path
    log(f"pre-training the demo language model on generated movie reviews (cached in {path}) ...")
    path.parent.mkdir(parents=True, exist_ok=True)
    return pretrain(path, log)


# ---------------------------------------------------------------------------------------------- PPO


def demo_config(model_path: Path, output_dir: Path, iterations: int):
    from .config import config_from_dict

    return config_from_dict({
        "model": {"name_or_path": str(model_path)},
        "data": {"path": "(generated)", "max_prompt_tokens": 32},
        "rollout": {"batch_size": 64, "max_new_tokens": 24, "temperature": 1.0},
        "reward": {"sources": [{"type": "sentiment"}]},
        "ppo": {"epochs": 4, "num_minibatches": 4, "lr": 1e-4, "kl": {"coef": 0.1}, "vf_coef": 0.1,
                "gae_lambda": 0.95},
        "train": {"output_dir": str(output_dir), "iterations": iterations, "seed": 0, "log_samples": 2,
                  "log_samples_every": 10},
    })


@torch.no_grad()
def sample_table(model, tokenizer, prompts: list[str], reward, seed: int, max_new_tokens: int = 24):
    """Sample one completion per prompt (seeded) and score it."""
    torch.manual_seed(seed)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    completions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    scores = reward(prompts, completions, {})
    return completions, scores


def before_after_table(prompts, before, before_scores, after, after_scores):
    """A rich table of one sample per held-out prompt before and after PPO, with their scores."""
    from rich.table import Table

    table = Table(title="before / after PPO on held-out openings (one sample each, same seed)", show_lines=True)
    table.add_column("prompt", style="bold")
    table.add_column("before", max_width=48)
    table.add_column("score", justify="right")
    table.add_column("after", max_width=48)
    table.add_column("score", justify="right")
    for row in zip(prompts, before, before_scores.tolist(), after, after_scores.tolist()):
        table.add_row(row[0], row[1], f"{row[2]:+.2f}", row[3], f"{row[4]:+.2f}")
    return table


def run(output_dir: str | Path = "runs/demo", iterations: int = 30, console=None) -> dict:
    """The whole demo; returns a summary dict (also written to ``summary.json``)."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .rewards.builtin import Sentiment
    from .tracking import plot_metrics
    from .trainer import train

    console = console or Console(soft_wrap=True)
    t0 = time.time()
    out = Path(output_dir)
    model_path = demo_model(log=console.print)
    t_model = time.time() - t0
    cfg = demo_config(model_path, out, iterations)
    records = [{"prompt": p} for p in PROMPTS]
    sentiment = Sentiment()
    eval_prompts = [p for p in HELDOUT_PROMPTS for _ in range(16)]
    before_model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    before_c, before_s = sample_table(before_model, tokenizer, eval_prompts, sentiment, seed=1)

    console.print(f"\n[bold]PPO[/]: {iterations} iterations of {cfg.rollout.batch_size} prompts, reward = VADER "
                  f"sentiment of the continuation, kl.coef {cfg.ppo.kl.coef}")
    result = train(cfg, records=records, console=console)
    after_model = result.policy.lm
    after_model.eval()
    after_c, after_s = sample_table(after_model, tokenizer, eval_prompts, sentiment, seed=1)

    console.print(before_after_table(eval_prompts[::16], before_c[::16], before_s[::16], after_c[::16],
                                     after_s[::16]))
    rows = result.metrics
    plot_metrics(rows, out / "reward_kl.png", keys=("reward_mean", "kl"), title="ppo-lm demo: sentiment reward and KL")
    first = sum(r["reward_mean"] for r in rows[:3]) / min(3, len(rows))
    last = sum(r["reward_mean"] for r in rows[-3:]) / min(3, len(rows))
    summary = {
        "reward_first3": round(first, 4), "reward_last3": round(last, 4),
        "eval_reward_before": round(before_s.mean().item(), 4), "eval_reward_after": round(after_s.mean().item(), 4),
        "eval_samples": len(eval_prompts), "final_kl": round(rows[-1]["kl"], 4), "iterations": len(rows),
        "model_seconds": round(t_model, 1), "total_seconds": round(time.time() - t0, 1),
        "output_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(
        f"\n[bold green]mean reward (training batches): {first:+.3f} (first 3 iterations) -> {last:+.3f} (last 3)[/]\n"
        f"held-out samples ({len(eval_prompts)}): {summary['eval_reward_before']:+.3f} before -> "
        f"{summary['eval_reward_after']:+.3f} after;  final KL to the reference {rows[-1]['kl']:.3f} nats/response\n"
        f"wrote {out / 'metrics.jsonl'}, {out / 'reward_kl.png'}, {out / 'training.png'}, {out / 'final'}  "
        f"({summary['total_seconds']:.0f}s)")
    return summary
