#!/usr/bin/env python
"""TRL 1.12.0's GRPOTrainer on the real application of ``scripts/grpo_vs_trl_real.py``: SST-2 sentiment on
SmolLM2-135M-Instruct, configured as ppo-lm's run of the same name. Run it with the peer's virtual environment
(../shared/peers/trl_ppo/README.md, plus ``pip install --no-deps peft==0.21.2``, the version ppo-lm's venv has);
``scripts/grpo_vs_trl_real.py`` calls it and evaluates the saved policy with ppo-lm's evaluator.

The configuration, on both sides:
- the policy: SmolLM2-135M-Instruct, the float32 transformers folder ppo-lm dequantises from the GGUF file;
  LoRA r 16, alpha 32, dropout 0 on every linear layer but the output one; bf16 autocast (TRL's ``bf16=True``);
- the prompt: the review instruction as a user turn through the model's chat template; at most 6 new tokens
  sampled at temperature 1 (no top-k/top-p), stopping at the end-of-turn token;
- the reward: 1 when the answer, SQuAD-normalised (lower case, no punctuation or articles), equals the label word,
  else 0 (ppo-lm's ``exact_match`` scorer);
- GRPO: 8 prompts x 4 answers (32) per iteration, 20 iterations; advantages normalised by the group's std
  (``scale_rewards="group"``); 2 epochs (``num_iterations``) x 2 minibatches of 16 (``steps_per_generation``):
  4 optimiser steps per iteration; clip 0.2; token-mean loss (``loss_type="dapo"``); the KL to the reference as a
  k3 loss term of weight 0.05 (``beta``); AdamW lr 5e-5 constant, grad-norm clip 1; 2 threads;
- gradient checkpointing on, TRL's default (GRPOConfig sets ``gradient_checkpointing=True``; ppo-lm's
  ``model.gradient_checkpointing``, off by default); ``--no-gradient-checkpointing`` turns it off.

The last stdout line is one JSON object: seconds per iteration (the mean over iterations 2 to N, as
scripts/estimators_real.py reports ppo-lm's), peak RSS, and the training reward of each iteration (the mean score
of its 32 answers, taken where the reward function is called). The merged policy is saved to ``OUT/final``.

    /tmp/trl-peer/trl-venv/bin/python benchmarks/trl_grpo_sst2.py --model FOLDER --data train.jsonl --out DIR
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import string  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(2)

import peft  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl_timing import IterationTimer  # noqa: E402

PROMPTS, GROUP, EPOCHS, MINIBATCHES = 8, 4, 2, 2
STEPS_PER_ITERATION = EPOCHS * MINIBATCHES


def normalize_answer(text: str) -> str:
    """SQuAD normalisation, as ppo_lm.rewards.builtin.normalize_answer (this venv does not have ppo-lm)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


class ExactMatch:
    """The reward: 1 for the label word. Keeps the mean of each call (one call per generation batch)."""

    __name__ = "exact_match"

    def __init__(self):
        self.means = []

    def __call__(self, prompts, completions, label, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [float(normalize_answer(t) == normalize_answer(y)) for t, y in zip(texts, label)]
        self.means.append(sum(scores) / len(scores))
        return scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the transformers folder of SmolLM2-135M-Instruct")
    ap.add_argument("--data", required=True, help="JSONL with prompt and label")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    a = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(a.model)
    policy = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
                              "label": [r["label"] for r in rows]})
    reward, timer = ExactMatch(), IterationTimer(STEPS_PER_ITERATION)
    config = GRPOConfig(
        output_dir=str(Path(a.out) / "trainer"), report_to="none", save_strategy="no", logging_steps=STEPS_PER_ITERATION,
        disable_tqdm=True, use_cpu=True, bf16=True, gradient_checkpointing=a.gradient_checkpointing,
        seed=a.seed, data_seed=a.seed,
        learning_rate=5e-5, lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0,
        max_steps=a.iterations * STEPS_PER_ITERATION,
        per_device_train_batch_size=PROMPTS * GROUP // MINIBATCHES, steps_per_generation=MINIBATCHES,
        num_generations=GROUP, num_iterations=EPOCHS,
        max_completion_length=6, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.05, epsilon=0.2, loss_type="dapo", scale_rewards="group",
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok,
                          peft_config=lora, callbacks=[timer])
    start = time.perf_counter()
    trainer.train()
    minutes = (time.perf_counter() - start) / 60
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    final = Path(a.out) / "final"
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(final, safe_serialization=True)
    tok.save_pretrained(final)
    later = timer.times[1:] or timer.times
    print(json.dumps({
        "tool": f"trl {trl.__version__} GRPOTrainer", "transformers": transformers.__version__,
        "peft": peft.__version__, "torch": torch.__version__, "seed": a.seed,
        "gradient_checkpointing": a.gradient_checkpointing, "iterations": len(timer.times),
        "train_minutes": round(minutes, 1), "seconds_per_iteration": round(sum(later) / len(later), 1),
        "iteration_s": [round(t, 2) for t in timer.times], "peak_rss_mib": round(peak_rss, 1),
        "reward_mean": [round(m, 4) for m in reward.means],
    }), flush=True)


if __name__ == "__main__":
    main()
