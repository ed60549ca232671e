"""``ppo-lm eval``: measure a model on the prompts and rewards of a PPO config, and compare two models.

For each prompt of ``data`` one completion is sampled with the config's rollout settings (seeded), or decoded
greedily with ``greedy``. Reported: the reward (total, its standard error, and per source), response length and EOS
rate, distinct-1/2 diversity, the task's own metric when the config names a ``task`` (EM/F1, accuracy, ...), and,
when a reference model is given, the KL of the model to it, summed over the response (sampled: the k1 estimate log p - log q
on the model's samples; greedy: the exact KL of each next-token distribution along the greedy answer) and the
perplexity of the completions under the reference (a fluency measure).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import algo, tasks
from .config import Config
from .data import build_prompt_dataset, load_records
from .errors import UserError
from .models import check_causal_lm, lm_forward, load_causal_lm, load_tokenizer
from .rewards import build_reward
from .rollout import left_pad, sample_responses


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (Li et al. 2016); 0 when there are none."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def task_metrics(cfg: Config, completions: list[str], fields: dict[str, list], source: str | None = None
                 ) -> dict[str, float]:
    source = source or cfg.data.path
    try:
        return tasks.get(cfg.task).metrics(completions, fields)
    except KeyError as e:
        raise UserError(f"task {cfg.task!r} needs the field {e.args[0]!r} in every record "
                        f"(fields: {', '.join(sorted(fields)) or 'none'})", source) from None
    except (TypeError, ValueError) as e:
        raise UserError(f"task {cfg.task!r}: {e}", source) from None


def summary(completions: list[str], lengths: list[int], ended: list[bool]) -> dict[str, float]:
    """What every evaluation reports of the answers themselves: their length, EOS rate and diversity."""
    return {"response_length": sum(lengths) / max(1, len(lengths)), "eos_fraction": sum(ended) / max(1, len(ended)),
            "distinct_1": distinct_n(completions, 1), "distinct_2": distinct_n(completions, 2)}


@torch.no_grad()
def during_training(cfg: Config, model, tokenizer, dataset, reward, accelerator, autocast) -> dict[str, float]:
    """``train.eval_every``: the policy (a :class:`~ppo_lm.models.PolicyWithValue`) on the held-out prompts of
    ``eval.data``: greedy answers (or sampled with the rollout settings, from the run's seed, the same draws at
    every evaluation), the reward on them (total and per source), the task's metrics, length, EOS rate and
    diversity. On several processes each answers its share of the prompts and the results are gathered: every
    process returns the same numbers. The training's random streams are left where they were."""
    from . import distributed as dist

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(dataset), world))
    prompts_all, completions, lengths, ended, fields_all = [], [], [], [], {}
    was_training = model.training
    model.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), autocast():
        torch.manual_seed(cfg.train.seed + rank)
        for s in range(0, len(mine), cfg.rollout.batch_size):
            prompts, ids, fields = dataset.batch(mine[s:s + cfg.rollout.batch_size])
            prompt_ids, prompt_mask = left_pad(ids, tokenizer.pad_token_id)
            out = sample_responses(model.lm, tokenizer, prompt_ids.to(accelerator.device),
                                   prompt_mask.to(accelerator.device), cfg.rollout, greedy=cfg.eval.greedy)
            prompts_all += prompts
            completions += out.completions
            lengths += out.mask.sum(-1).tolist()
            ended += out.ended.tolist()
            for k, v in fields.items():
                fields_all.setdefault(k, []).extend(v)
    model.train(was_training)
    total, parts = reward.detailed(prompts_all, completions, fields_all) if completions else (torch.zeros(0), {})
    gather = lambda items: dist.gather_list(accelerator, list(items))  # noqa: E731
    scores = gather(total.tolist())
    parts = {name: gather(v.tolist()) for name, v in parts.items()}
    completions, lengths, ended = gather(completions), gather(lengths), gather(ended)
    fields_all = {k: gather(v) for k, v in fields_all.items()}
    n = len(scores)
    mean = sum(scores) / n
    return {"reward_mean": mean,
            "reward_std": math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1)) if n > 1 else 0.0,
            **{f"reward[{name}]": sum(v) / len(v) for name, v in parts.items() if v},
            **(task_metrics(cfg, completions, fields_all, cfg.eval.data) if cfg.task else {}),
            **summary(completions, lengths, ended)}


@torch.no_grad()
def evaluate(cfg: Config, model_path: str, *, reference: str | None = None, limit: int | None = None,
             seed: int = 0, batch_size: int = 32, greedy: bool = False, notice=lambda message: None) -> dict:
    if cfg.env.id is not None:
        return evaluate_env(cfg, model_path, limit=limit, seed=seed, greedy=greedy)
    check_causal_lm(model_path, "--model")
    if reference is not None:
        check_causal_lm(reference, "--reference")
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path, notice=lambda m: None,
                               field="model.tokenizer" if cfg.model.tokenizer else "--model")
    records = load_records(cfg.data.path, cfg.data.split)
    records = records[:limit] if limit else records
    dataset = build_prompt_dataset(records, tokenizer, cfg.data, warn=notice)
    reward = build_reward(cfg.reward)
    model = load_causal_lm(model_path, field="--model").eval()
    if reference is None:
        ref = None
    elif str(reference) == str(model_path):  # compare() measures the "before" model against itself
        ref = model
    else:
        ref = load_causal_lm(reference, field="--reference").eval()
    torch.manual_seed(seed)
    with precision(cfg):
        return _evaluate(cfg, model, ref, tokenizer, dataset, reward, model_path, seed, batch_size, greedy)


def evaluate_env(cfg: Config, model_path: str, *, limit: int | None = None, seed: int = 0,
                 greedy: bool = False) -> dict:
    """A model on the environment's held-out episodes (env.eval_episodes, or ``limit``): success rate, mean
    return and turns, each episode's return (``scores``, which :func:`compare` pairs) and the first transcripts."""
    from . import envs, episodes
    from .data import use_chat_template
    from .models import load_config_checked

    n = limit or cfg.env.eval_episodes
    pool = [envs.make(cfg.env.id, cfg.env.kwargs) for _ in range(min(n, cfg.rollout.batch_size))]
    room = episodes.prompt_room(cfg, load_config_checked(model_path, kind="causal", field="--model",
                                                         trust_remote_code=False))
    tokenizer = load_tokenizer(cfg.model.tokenizer or model_path, notice=lambda m: None,
                               field="model.tokenizer" if cfg.model.tokenizer else "--model")
    model = load_causal_lm(model_path, field="--model").eval()
    torch.manual_seed(seed)
    with precision(cfg):
        summary, played = episodes.evaluate(model, tokenizer, pool, episodes.eval_seeds(n), cfg, greedy=greedy,
                                            chat=use_chat_template(tokenizer, cfg.data.chat_template),
                                            max_prompt_tokens=room, device="cpu")
    return {"model": str(model_path), "samples": n, **summary, "scores": [e.total_reward for e in played],
            "examples": [{"observation": e.first_observation, "episode": episodes.transcript(e),
                          "return": e.total_reward, "success": e.success} for e in played[:8]]}


def precision(cfg: Config):
    """The evaluation's forwards (on the CPU, where it loads the models) in the precision the config trains in:
    bf16 autocast when train.mixed_precision is bf16 (a SmolLM2-135M forward of 32 x 110 tokens: 2.2 s against
    4.2 s in float32, measured on 2 cores), float32 otherwise."""
    import contextlib

    return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.train.mixed_precision == "bf16" else \
        contextlib.nullcontext()


def _evaluate(cfg: Config, model, ref, tokenizer, dataset, reward, model_path, seed, batch_size, greedy) -> dict:
    completions, prompts_all, kls, ref_nll, ref_tokens, lengths, ended = [], [], [], 0.0, 0, [], []
    fields_all: dict[str, list] = {}
    for s in range(0, len(dataset), batch_size):
        prompts, ids, fields = dataset.batch(list(range(s, min(s + batch_size, len(dataset)))))
        prompt_ids, prompt_mask = left_pad(ids, tokenizer.pad_token_id)
        response, mask, has_eos, texts, _ = sample_responses(model, tokenizer, prompt_ids, prompt_mask, cfg.rollout,
                                                             greedy=greedy)
        completions += texts
        prompts_all += prompts
        for k, v in fields.items():
            fields_all.setdefault(k, []).extend(v)
        lengths += mask.sum(-1).tolist()
        ended += has_eos.tolist()
        if ref is not None:
            kl, nll = reference_divergence(model, ref, torch.cat([prompt_ids, response], 1),
                                           torch.cat([prompt_mask, mask], 1).long(), response, mask,
                                           cfg.rollout.temperature, greedy)
            kls, ref_nll, ref_tokens = kls + kl, ref_nll + nll, ref_tokens + int(mask.sum())
    total, parts = reward.detailed(prompts_all, completions, fields_all)
    n = len(completions)
    std = total.std().item() if n > 1 else 0.0
    out = {
        "model": str(model_path), "samples": n, "decoding": "greedy" if greedy else "sampled",
        "reward_mean": total.mean().item(), "reward_std": std, "reward_sem": std / math.sqrt(n),
        **{f"reward[{name}]": v.mean().item() for name, v in parts.items()},
        **(task_metrics(cfg, completions, fields_all) if cfg.task else {}),
        **summary(completions, lengths, ended),
    }
    if ref is not None:
        out["kl_to_reference"] = sum(kls) / len(kls)
        out["reference_perplexity"] = math.exp(ref_nll / max(1, ref_tokens))
    out["scores"] = total.tolist()  # per prompt, in order: lets a comparison pair the two models' outcomes
    out["examples"] = [{"prompt": p, "completion": c, "reward": r}  # every one: what a report quotes, in order
                       for p, c, r in zip(prompts_all, completions, total.tolist())]
    return out


@torch.no_grad()
def reference_divergence(model, ref, full, full_mask, response, mask, temperature: float,
                         greedy: bool) -> tuple[list[float], float]:
    """Per sequence, the KL of ``model`` to ``ref`` over the response tokens, and the reference's summed NLL of
    those tokens (for its perplexity). Greedy tokens are no sample of the model, so there the KL is the exact KL
    of each next-token distribution; sampled ones give the k1 estimate at the sampling temperature."""
    T = response.shape[1]
    logits, _ = lm_forward(model, full, full_mask, T)
    ref_logits = logits if ref is model else lm_forward(ref, full, full_mask, T)[0]
    if greedy:
        logp, logq = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
        per_token = (logp.exp() * (logp - logq)).sum(-1)
    else:
        per_token = algo.kl_k1(algo.logprobs_from_logits(logits, response, temperature),
                               algo.logprobs_from_logits(ref_logits, response, temperature))
    nll = -float((algo.logprobs_from_logits(ref_logits, response) * mask).sum())
    return (per_token * mask).sum(-1).tolist(), nll


def compare(cfg: Config, before: str, after: str, *, limit: int | None = None, seed: int = 0,
            greedy: bool = False, notice=lambda message: None) -> dict:
    """Both models on the same prompts and seed; KL and perplexity are measured against ``before``."""
    check_causal_lm(before, "--compare BEFORE")
    check_causal_lm(after, "--compare AFTER")
    a = evaluate(cfg, before, reference=before, limit=limit, seed=seed, greedy=greedy, notice=notice)
    b = evaluate(cfg, after, reference=before, limit=limit, seed=seed, greedy=greedy)
    keys = [k for k in a if isinstance(a[k], float) and k in b]
    diff = torch.tensor(b["scores"]) - torch.tensor(a["scores"])
    paired_sem = diff.std().item() / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
    preferred, preferred_sem = preference(diff)
    return {"before": a, "after": b, "reward_change_paired_sem": paired_sem,
            "after_preferred": preferred, "after_preferred_sem": preferred_sem,
            "rows": [{"metric": k, "before": a[k], "after": b[k], "change": b[k] - a[k]} for k in keys]}


def preference(diff: torch.Tensor) -> tuple[float, float]:
    """From per-prompt reward differences (after - before): the share of prompts on which the reward prefers the
    after model's answer (a tie counts half; the win rate of RLHF papers when the reward is a reward model), and
    its standard error."""
    if not len(diff):
        return 0.0, 0.0
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()  # float64: 130 of 200 is 0.65, not 0.6499999762
    return wins.mean().item(), (wins.std().item() / math.sqrt(len(wins)) if len(wins) > 1 else 0.0)


def add_base(result: dict, base: dict) -> dict:
    """A third model beside a comparison (the one an SFT stage started from): its measures as the rows' ``base``
    (KL and perplexity against "before" are not measured for it)."""
    result["base"] = base
    for r in result["rows"]:
        if isinstance(base.get(r["metric"]), float):
            r["base"] = base[r["metric"]]
    return result


def markdown_table(result: dict) -> str:
    with_base = "base" in result
    lines = ["| metric |" + (" base |" if with_base else "") + " before | after | change |",
             "|---|---|---|---|" + ("---|" if with_base else "")]
    for r in result["rows"]:
        base = (f" {r['base']:.4f} |" if "base" in r else " - |") if with_base else ""
        lines.append(f"| {r['metric']} |{base} {r['before']:.4f} | {r['after']:.4f} | {r['change']:+.4f} |")
    if "after_preferred" in result:
        lines.append(f"\nThe reward prefers the after model's answer on {result['after_preferred']:.1%} "
                     f"(± {result['after_preferred_sem']:.1%} s.e.) of the {result['after']['samples']} prompts "
                     "(a tie counts half).")
    return "\n".join(lines)


def write(result: dict, out_dir: str | Path, name: str = "eval") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    if "rows" in result:
        (out / f"{name}.md").write_text(markdown_table(result) + "\n")
    return out
