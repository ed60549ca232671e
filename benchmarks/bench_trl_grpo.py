#!/usr/bin/env python
"""Time TRL's GRPOTrainer (trl 1.12.0, the peer of ppo-lm's critic-free estimators) on the fixed configuration of
``ppo-lm bench --estimator grpo``; run it with the peer's virtual environment (../shared/peers/trl_ppo/README.md):

    python ../shared/peers/trl_ppo/make_models.py /tmp/trl-peer/models --size tiny
    /tmp/trl-peer/trl-venv/bin/python benchmarks/bench_trl_grpo.py --models /tmp/trl-peer/models --size tiny
    .venv/bin/ppo-lm bench --size tiny --estimator grpo --iterations 5

The configuration, on both sides: the peer's models (a random-init GPT-2 policy, and a random-init sequence
classifier of the same shape as the reward model); 16 prompts of 16 words per iteration from the peer's 256
synthetic prompts, 4 responses each (64), 32 new tokens sampled at temperature 1 (no top-k/top-p); 4 epochs
(``num_iterations``) x 4 minibatches of 16 (``steps_per_generation`` 4): 16 optimiser steps per iteration; lr 1e-5
constant, AdamW, grad-norm clip 1; clip 0.2; the KL to the reference as a k3 loss term of weight 0.05 (``beta``),
advantages normalised by the group's std (``scale_rewards="group"``), token-mean loss (``loss_type="dapo"``,
TRL's default; ppo-lm's ``token_mean``); fp32 on 2 threads; dropout off (TRL's ``disable_dropout``; ppo-lm
always turns it off); gradient checkpointing off (TRL's GRPOConfig turns it on by default:
``--gradient-checkpointing`` keeps that default, against ``ppo-lm bench --gradient-checkpointing``).
TRL's generation may stop at EOS (a random model emits it about once in 8192 tokens); ppo-lm's bench never stops.

Timing from outside TRL: an iteration is the time between every 16th ``on_step_end`` (the first from
``on_train_begin``); the first iteration is warm-up and the median is over the others. The last stdout line is
one JSON object with the seconds per iteration, peak RSS and the reward mean of each iteration.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(2)

import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl_timing import IterationTimer  # noqa: E402

PEER = Path(os.environ.get("PEER_DIR", Path(__file__).resolve().parents[2] / "shared" / "peers" / "trl_ppo"))
sys.path.insert(0, str(PEER))
from make_models import synthetic_prompts  # noqa: E402

STEPS_PER_ITERATION = 16  # 4 epochs x 4 minibatches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/tmp/trl-peer/models")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--bf16", action="store_true", help="TRL's own bf16 (bf16=True), against ppo-lm's bf16 autocast")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="TRL's default (GRPOConfig sets gradient_checkpointing=True); off unless given, as ppo-lm's "
                         "bench (its --gradient-checkpointing is the match)")
    a = ap.parse_args()

    root = os.path.join(a.models, a.size)
    tok = AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(root, "policy"), dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(os.path.join(root, "reward"), num_labels=1,
                                                                dtype=torch.float32)
    prompts = synthetic_prompts(n=256, words_per_prompt=16)
    timer = IterationTimer(STEPS_PER_ITERATION, echo=True)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_bench_"), report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing, seed=42,
        disable_dropout=True,  # the peer's GPT-2 has dropout 0.1; ppo-lm always turns it off for RL
        learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=a.iterations * STEPS_PER_ITERATION,
        per_device_train_batch_size=16, steps_per_generation=4, num_generations=4, num_iterations=4,
        max_completion_length=32, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.05, epsilon=0.2, loss_type="dapo", scale_rewards="group",
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                          reward_processing_classes=tok, callbacks=[timer])
    trainer.train()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rewards = [round(h["reward"], 4) for h in trainer.state.log_history if "reward" in h]
    per_iteration = rewards  # logged once per generation, i.e. per iteration
    seconds = statistics.median(timer.times[1:]) if len(timer.times) > 1 else timer.times[0]
    print(json.dumps({
        "tool": "trl-grpo", "bf16": a.bf16, "gradient_checkpointing": a.gradient_checkpointing,
        "disable_dropout": True, "trl": trl.__version__, "transformers": transformers.__version__, "size": a.size,
        "prompts_per_iter": 16, "num_generations": 4, "new_tokens": 32, "epochs": 4, "minibatches": 4,
        "seconds_per_iteration": round(seconds, 4), "tokens_per_s": round(64 * 32 / seconds, 1),
        "iteration_s": [round(t, 3) for t in timer.times], "peak_rss_mib": round(peak_rss, 1),
        "reward_mean": per_iteration, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "device": platform.processor() or platform.machine(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }), flush=True)


if __name__ == "__main__":
    main()
