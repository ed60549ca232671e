"""Shared fixtures: tiny models built by our own code (no hub), and the path to ../shared/assets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ppo_lm import toy
from ppo_lm.config import config_from_dict

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

WORDS = "a b c d e f g h i j".split()
ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
# metrics that measure the machine, not the run: left out when two runs are compared
TIMING = {"time_rollout_s", "time_generate_s", "time_score_s", "time_train_s", "time_iteration_s", "time_eval_s",
          "tokens_per_s"}


#: The seed of the learning tests (train.seed): 0, unless scripts/learning_spread.py sweeps it.
LEARNING_SEED = int(os.environ.get("PPO_LM_TEST_SEED", "0"))


@pytest.fixture
def learned(request):
    """``learned(value, threshold)``: assert that a learning test's measured ``value`` exceeds its ``threshold``;
    with ``PPO_LM_LEARNING_LOG`` set, also append both (with the test, seed and kernel path) to that file, which
    is how scripts/learning_spread.py measures every learning test's spread over seeds and kernel paths."""

    def check(value: float, threshold: float, detail=None) -> None:
        log = os.environ.get("PPO_LM_LEARNING_LOG")
        if log:
            with open(log, "a") as f:
                f.write(json.dumps({"test": request.node.nodeid, "seed": LEARNING_SEED, "value": value,
                                    "threshold": threshold, "kernel": torch.backends.cpu.get_cpu_capability()}) + "\n")
        assert value > threshold, (value, threshold, detail)
    return check


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init 2-layer GPT-2 over a 13-token word vocabulary, saved as a transformers folder."""
    tok = toy.word_tokenizer(WORDS)
    model = toy.gpt2(tok, n_layer=2, n_embd=32, n_head=2, n_positions=64, seed=0)
    return toy.save_model(model, tok, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = toy.word_tokenizer(WORDS)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tok), num_labels=1,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return toy.save_model(GPT2ForSequenceClassification(config), tok, tmp_path_factory.mktemp("rm") / "rm")


def prompt_records(n: int = 32) -> list[dict]:
    return [{"prompt": " ".join(WORDS[(k + i) % len(WORDS)] for i in range(3 + k % 3)), "answer": "a"}
            for k in range(n)]


def keyword_config_file(tmp_path: Path, model_dir, *, records: int = 8,
                        rollout: str = "batch_size: 8, max_new_tokens: 6", ppo: str = "lr: 3.0e-3, num_minibatches: 2",
                        iterations: int = 2, seed: int = 0) -> Path:
    """``tmp_path/c.yaml`` (beside its ``prompts.jsonl``) for a short command-line run of ``model_dir`` on the keyword
    reward (the share of the word 'a'), writing to ``tmp_path/run``; ``rollout`` and ``ppo`` are the sections' YAML
    flow contents, and the rollout section is on line 3."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_records(records)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""model: {{name_or_path: {model_dir}}}
data: {{path: {data}}}
rollout: {{{rollout}}}
reward: {{sources: [{{type: keyword, words: [a]}}]}}
ppo: {{{ppo}}}
train: {{output_dir: {tmp_path / 'run'}, iterations: {iterations}, seed: {seed}, progress: false, log_samples: 0,
         save_final: false}}
""")
    return cfg


def tiny_config(model_dir, out_dir, **sections) -> object:
    """A fast config for the tiny model; ``sections`` override whole-section fields."""
    base = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": "records"},
        "rollout": {"batch_size": 16, "max_new_tokens": 8},
        "reward": {"sources": [{"type": "keyword", "words": ["a"]}]},
        "ppo": {"lr": 3e-3, "num_minibatches": 2, "kl": {"coef": 0.01}},
        "train": {"output_dir": str(out_dir), "iterations": 2, "progress": False, "log_samples": 0, "seed": 0},
    }
    for name, fields in sections.items():
        base[name] = {**base.get(name, {}), **fields}
    return config_from_dict(base)
