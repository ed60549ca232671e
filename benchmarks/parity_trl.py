#!/usr/bin/env python
"""The TRL half of benchmarks/learning_parity.py; runs in the peer's virtual environment (trl==1.12.0), not ours.

It trains the policy in MODELS/policy with TRL's PPOTrainer on the task of learning_parity.py (reward = the
fraction of response tokens whose id is below --target-below) and prints, as its last line, a JSON object with
the mean score of every PPO iteration. TRL's reward model must be a module with a backbone and a ``score``
head; ``CountingReward`` computes the task's reward exactly in that shape.
"""
import argparse
import json
import os
from types import SimpleNamespace

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2ForSequenceClassification, TrainerCallback

from trl.experimental.ppo import PPOConfig, PPOTrainer


class _Backbone(nn.Module):
    def __init__(self, context_length: int, below: int):
        super().__init__()
        self.context_length, self.below = context_length, below
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hit = (input_ids < self.below).float()
        hit[:, : self.context_length] = 0
        steps = torch.arange(input_ids.shape[1], device=input_ids.device) - self.context_length + 1
        frac = hit.cumsum(1) / steps.clamp(min=1)  # fraction of target tokens among the response so far
        return SimpleNamespace(hidden_states=[frac.unsqueeze(-1)])


class CountingReward(nn.Module):
    base_model_prefix = "backbone"

    def __init__(self, context_length: int, below: int):
        super().__init__()
        self.backbone = _Backbone(context_length, below)
        self.score = nn.Identity()


class _SentimentBackbone(nn.Module):
    """VADER compound score of the decoded response, the same scorer as ppo-lm's ``sentiment`` source, put at
    every position so that whichever index TRL reads the score from holds it."""

    def __init__(self, context_length: int, tokenizer):
        super().__init__()
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.context_length, self.tokenizer = context_length, tokenizer
        self.analyzer = SentimentIntensityAnalyzer()
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.context_length:], skip_special_tokens=True)
        score = torch.tensor([self.analyzer.polarity_scores(t)["compound"] for t in texts])
        return SimpleNamespace(hidden_states=[score[:, None, None].expand(-1, input_ids.shape[1], 1).contiguous()])


class SentimentReward(nn.Module):
    base_model_prefix = "backbone"

    def __init__(self, context_length: int, tokenizer):
        super().__init__()
        self.backbone = _SentimentBackbone(context_length, tokenizer)
        self.score = nn.Identity()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--prompts", required=True, help="JSON file: list of prompt strings")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-below", type=int, help="reward: fraction of response token ids below this")
    ap.add_argument("--reward", choices=["count", "sentiment"], default="count",
                    help="count: --target-below; sentiment: VADER on the decoded response (pretrained policies)")
    ap.add_argument("--kl-coef", type=float, default=0.05)
    a = ap.parse_args()
    if a.reward == "count" and a.target_below is None:
        ap.error("--reward count needs --target-below")
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(os.path.join(a.models, "policy"))
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(a.models, "policy"))
    torch.manual_seed(2)
    prompts = json.load(open(a.prompts))
    if a.reward == "sentiment":  # a pretrained policy: its value model starts from the same weights
        from transformers import AutoModelForSequenceClassification

        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        value = AutoModelForSequenceClassification.from_pretrained(os.path.join(a.models, "policy"), num_labels=1)
        value.config.pad_token_id = tok.pad_token_id
        enc = [tok(p)["input_ids"] for p in prompts]  # with BOS, as ppo-lm tokenises prompts
    else:
        value = GPT2ForSequenceClassification(GPT2Config(**{**policy.config.to_dict(), "num_labels": 1}))
        enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert len({len(e) for e in enc}) == 1, "prompts must share one length (no padding in TRL's context)"
    scores = []

    class Scores(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "objective/scores" in logs:
                scores.append(logs["objective/scores"])

    cfg = PPOConfig(output_dir=os.path.join(a.models, "trl-run"), report_to="none", save_strategy="no", logging_steps=1,
                    disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=a.seed, learning_rate=a.lr,
                    lr_scheduler_type="constant", per_device_train_batch_size=64, gradient_accumulation_steps=1,
                    num_mini_batches=4, num_ppo_epochs=4, total_episodes=a.iters * 64,
                    local_rollout_forward_batch_size=64, response_length=32, temperature=1.0, stop_token=None,
                    stop_token_id=None, missing_eos_penalty=None, kl_coef=a.kl_coef, kl_estimator="k1", gamma=1.0,
                    lam=0.95, cliprange=0.2, cliprange_value=0.2, whiten_rewards=False, num_sample_generations=0,
                    per_device_eval_batch_size=64)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=None,
                         reward_model=(SentimentReward(len(enc[0]), tok) if a.reward == "sentiment"
                                       else CountingReward(len(enc[0]), a.target_below)), value_model=value,
                         train_dataset=Dataset.from_dict({"input_ids": enc}),
                         eval_dataset=Dataset.from_dict({"input_ids": enc[:64]}), callbacks=[Scores()])
    trainer.train()
    print(json.dumps({"tool": "trl", "reward_mean": scores}), flush=True)


if __name__ == "__main__":
    main()
