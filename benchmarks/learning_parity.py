#!/usr/bin/env python
"""Is learning traded for speed? Train the same random-init `tiny` policy on the same task, seed and
hyper-parameters with TRL's PPOTrainer and with ppo-lm, and plot both reward curves against samples seen.

    TRL_PEER_VENV=/tmp/trl-peer/trl-venv python benchmarks/learning_parity.py --iters 30

Task: reward = fraction of the 32 response tokens whose id is in [3, 4096) of an 8192-word vocabulary (so a
random policy starts near 0.5). Configuration otherwise as `ppo-lm bench` (64 prompts of 16 tokens, 4 epochs x 4
minibatches, kl_coef 0.05 k1, gamma 1, lambda 0.95, clip 0.2/0.2, vf_coef 0.1, fp32). One difference is by
design: TRL trains a separate value model, ppo-lm a value head on the policy's trunk (``--critic``: a separate one).

With ``--pretrained DIR --stories FILE`` the policy is a real pretrained model (e.g. stories260K from
../shared/assets) instead, the prompts are story openings of equal token length from FILE (TinyStories jsonl),
and the reward is the VADER sentiment of the response on both sides (TRL gets it through a reward module that
decodes the response):

    TRL_PEER_VENV=... python benchmarks/learning_parity.py --pretrained ../shared/assets/stories260K/hf \
        --stories ../shared/assets/tinystories_text/tinystories_train_head.jsonl --lr 3e-4 --critic --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VOCAB, BELOW = 8192, 4096


def story_prompts(model_dir: str, stories: str, n: int = 256, length: int = 10) -> list[str]:
    """Openings of ``n`` stories cut to ``length`` tokens (BOS included) that re-tokenise to exactly those tokens,
    so that every prompt has one length (TRL's PPOTrainer takes no padded prompts)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for line in Path(stories).read_text(encoding="utf-8").splitlines():
        ids = tok(json.loads(line)["text"])["input_ids"][:length]
        text = tok.decode(ids, skip_special_tokens=True)
        if len(ids) == length and tok(text)["input_ids"] == ids:
            out.append(text)
        if len(out) == n:
            break
    return out


def model_name(folder: str) -> str:
    """stories260K for ../shared/assets/stories260K/hf: the folder's name, or its parent's for an ``hf`` folder."""
    path = Path(folder).resolve()
    return path.parent.name if path.name == "hf" else path.name


def ppo_lm_config(root: str, iters: int, *, lr: float, kl_coef: float, seed: int, mixed_precision: str,
                  value_lr: float | None = None, vf_coef: float = 0.1, critic: bool = False) -> dict:
    """ppo-lm's side of a parity run, as a config dict: the `ppo-lm bench` configuration on ``root/policy``
    (output in ``root/ours``) with the run's settings, and the VADER sentiment reward (the count task passes a
    reward_fn to ``train`` instead)."""
    from ppo_lm.bench import bench_config

    d = bench_config(root, str(Path(root) / "ours"), iters, lora=False, mixed_precision=mixed_precision).to_dict()
    d["ppo"].update(lr=lr, value_lr=value_lr, vf_coef=vf_coef)
    d["ppo"]["kl"]["coef"] = kl_coef
    d["train"]["seed"] = seed
    if critic:
        d["model"]["critic"] = "policy"
    d["reward"] = {"sources": [{"type": "sentiment"}]}
    return d


def compare(trl: list[float], ours: list[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """Both libraries' final rewards over runs (one number per run): mean and sample standard deviation of
    each side, and ppo-lm's mean minus TRL's with a 95% bootstrap interval (each side resampled on its own,
    since the two libraries' runs with one seed share no random draws)."""
    import numpy as np

    a, b = np.asarray(trl, dtype=float), np.asarray(ours, dtype=float)
    rng = np.random.default_rng(seed)
    diffs = (rng.choice(b, (resamples, len(b))).mean(1) - rng.choice(a, (resamples, len(a))).mean(1))
    low, high = np.quantile(diffs, [0.025, 0.975])
    side = lambda x: {"n": len(x), "mean": round(float(x.mean()), 4),  # noqa: E731
                      "sd": round(float(x.std(ddof=1)), 4) if len(x) > 1 else None}
    return {"trl": side(a), "ppo_lm": side(b), "difference": round(float(b.mean() - a.mean()), 4),
            "difference_95ci": [round(float(low), 4), round(float(high), 4)]}


def combine(files: list[str], out: Path) -> int:
    """One figure with both libraries' curves of several runs (one colour per library, one line per run), and
    the statistics of their final rewards (:func:`compare`) printed and written beside it as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(f).read_text()) for f in files]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, run in enumerate(runs):
        for key, colour, name in (("trl_reward", "tab:blue", "TRL 1.12.0"), ("ppo_lm_reward", "tab:orange", "ppo-lm")):
            xs = [64 * (k + 1) for k in range(len(run[key]))]
            ax.plot(xs, run[key], color=colour, alpha=0.8, lw=1.2, label=name if i == 0 else None)
    save_reward_plot(fig, ax, f"{len(files)} seeds, same task and hyper-parameters", out)
    stats = {"runs": [{"file": Path(f).name, "seed": r["seed"], "trl": r["trl_last5_mean"], "ppo_lm": r["ppo_lm_last5_mean"]}
                      for f, r in zip(files, runs)],
             **compare([r["trl_last5_mean"] for r in runs], [r["ppo_lm_last5_mean"] for r in runs])}
    out.with_suffix(".json").write_text(json.dumps(stats, indent=1))
    print(json.dumps({k: v for k, v in stats.items() if k != "runs"}))
    print(out, out.with_suffix(".json"))
    return 0


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--critic", action="store_true",
                    help="ppo-lm with a separate critic (model.critic), like TRL's separate value model")
    ap.add_argument("--pretrained", help="a pretrained causal LM folder to use as the policy (reward: sentiment)")
    ap.add_argument("--stories", help="with --pretrained: TinyStories jsonl to cut the prompts from")
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--value-lr", type=float, default=None,
                    help="ppo-lm's ppo.value_lr (learning rate of the value head / critic; default: --lr)")
    ap.add_argument("--vf-coef", type=float, default=0.1,
                    help="ppo-lm's ppo.vf_coef (TRL keeps its 0.1: its value model is separate)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "perf" / "learning_parity.json"))
    ap.add_argument("--trl-from", metavar="JSON",
                    help="reuse TRL's curve from an earlier run's JSON with the same task, seed, lr, kl_coef and "
                         "iterations instead of running TRL again (a ppo-lm change does not change TRL's side)")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="only plot these earlier runs in one figure (--out .png)")
    return ap, ap.parse_args()


def trl_curve(a, venv: str, tmp: str, task: list[str]) -> list[float] | None:
    """TRL's mean reward per iteration on the same models and prompts (in ``tmp``), run in its own virtual
    environment; None (with its stderr printed) when it fails."""
    cmd = [str(Path(venv, "bin", "python")), str(ROOT / "benchmarks" / "parity_trl.py"), "--models", tmp,
           "--prompts", str(Path(tmp) / "prompts.json"), "--iters", str(a.iters), "--lr", str(a.lr),
           "--seed", str(a.seed), "--kl-coef", str(a.kl_coef), *task]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["reward_mean"]


def plot(a, trl: list[float], ours: list[float], path: Path) -> None:
    """Both reward curves against samples seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([64 * (i + 1) for i in range(len(trl))], trl, marker=".", label="TRL 1.12.0 PPOTrainer")
    ax.plot([64 * (i + 1) for i in range(len(ours))], ours, marker=".",
            label=f"ppo-lm ({'separate critic' if a.critic else 'shared trunk'}, {a.mixed_precision}"
                  f"{f', value_lr {a.value_lr:g}' if a.value_lr else ''}{f', vf_coef {a.vf_coef:g}' if a.vf_coef != 0.1 else ''})")
    save_reward_plot(fig, ax, f"same task, seed {a.seed}, lr {a.lr}", path)


def save_reward_plot(fig, ax, title: str, path) -> None:
    """The axes, grid and legend every reward-curve figure here shares; written to ``path``."""
    ax.set_xlabel("samples seen")
    ax.set_ylabel("mean reward of the batch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def count_task():
    """The random-init task's tokenizer (the benchmark's words, padded to VOCAB) and its reward: the share of
    the 32 response tokens whose id is below BELOW."""
    import torch

    from ppo_lm import toy
    from ppo_lm.bench import WORDS

    words = list(dict.fromkeys(WORDS))
    words += [f"w{i}" for i in range(VOCAB - len(toy.SPECIAL_TOKENS) - len(words))]
    tok = toy.word_tokenizer(words)
    assert len(tok) == VOCAB
    targets = {tok.convert_ids_to_tokens(i) for i in range(3, BELOW)}

    def reward(prompts, completions, fields):
        return torch.tensor([sum(w in targets for w in c.split()) / 32 for c in completions])

    return tok, reward


def main() -> int:
    ap, a = parse_args()
    if a.combine:
        return combine(a.combine, Path(a.out).with_suffix(".png"))
    if a.pretrained and not a.stories:
        ap.error("--pretrained needs --stories (a TinyStories jsonl to cut the prompts from)")
    venv = os.environ.get("TRL_PEER_VENV")
    earlier = json.loads(Path(a.trl_from).read_text()) if a.trl_from else None
    if earlier is not None:
        want = {"iterations": a.iters, "lr": a.lr, "kl_coef": a.kl_coef, "seed": a.seed}
        differ = [k for k, v in want.items() if earlier.get(k) != v]
        if differ or bool(a.pretrained) != ("VADER" in earlier.get("task", "")):
            ap.error(f"--trl-from {a.trl_from}: that run differs in {', '.join(differ) or 'task'}")
    elif not venv or not Path(venv, "bin", "python").exists():
        print("learning-parity skipped: set TRL_PEER_VENV to a virtual environment with trl==1.12.0")
        return 0

    from ppo_lm import toy
    from ppo_lm.bench import SHAPES, synthetic_prompts
    from ppo_lm.config import config_from_dict
    from ppo_lm.trainer import train

    tok, reward = count_task()

    with tempfile.TemporaryDirectory(prefix="ppo-lm-parity-") as tmp:
        if a.pretrained:
            import shutil

            shutil.copytree(a.pretrained, Path(tmp) / "policy")
            prompts = story_prompts(a.pretrained, a.stories)
            task = ["--reward", "sentiment"]
        else:
            toy.save_model(toy.gpt2(tok, seed=1, **SHAPES["tiny"]), tok, Path(tmp) / "policy")
            prompts = synthetic_prompts()
            task = ["--target-below", str(BELOW)]
        (Path(tmp) / "prompts.json").write_text(json.dumps(prompts))
        trl = earlier["trl_reward"] if earlier is not None else trl_curve(a, venv, tmp, task)
        if trl is None:
            return 1
        d = ppo_lm_config(tmp, a.iters, lr=a.lr, kl_coef=a.kl_coef, seed=a.seed, mixed_precision=a.mixed_precision,
                          value_lr=a.value_lr, vf_coef=a.vf_coef, critic=a.critic)
        result = train(config_from_dict(d), reward_fn=None if a.pretrained else reward,
                       records=[{"prompt": p} for p in prompts])
        ours = [m["reward_mean"] for m in result.metrics]

    def tail(xs):
        return round(sum(xs[-5:]) / len(xs[-5:]), 4)

    summary = {"iterations": a.iters, "lr": a.lr, "kl_coef": a.kl_coef, "seed": a.seed,
               "mixed_precision": a.mixed_precision,
               "task": f"{model_name(a.pretrained)}, VADER sentiment" if a.pretrained else "random-init tiny, count",
               "ppo_lm_value": "separate critic" if a.critic else "value head on the policy trunk",
               "ppo_lm_value_lr": a.value_lr, "ppo_lm_vf_coef": a.vf_coef,
               "trl_from": a.trl_from, "trl_reward": [round(x, 4) for x in trl], "ppo_lm_reward": [round(x, 4) for x in ours],
               "trl_first": round(trl[0], 4), "ppo_lm_first": round(ours[0], 4),
               "trl_last5_mean": tail(trl), "ppo_lm_last5_mean": tail(ours)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))

    plot(a, trl, ours, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_reward")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
