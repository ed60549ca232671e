"""The FLOP model of the peer, TRL 1.12.0's PPOTrainer, for the side-by-side comparison (bench_compare.py): what
it computes for the iteration that ``ppo-lm bench`` times, counted with ppo-lm's own shape model
(``ppo_lm.bench.shape_flops``). Lab code: the package itself knows nothing of the peer."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ppo_lm.bench import shape_flops  # noqa: E402


def peer_flops(lm, *, batch: int, prompt_len: int, new_tokens: int, epochs: int) -> dict:
    """The same count for TRL 1.12.0's PPOTrainer on the same configuration (full fine-tuning of the model
    without any adapters), from how it computes:

    * its forwards take the logits of every position (the LM head runs on the prompt too);
    * rollout: generation (the old logprobs come from the generation logits), the reference forward, and one
      trunk pass each of the separate value model and the reward model;
    * training: ``epochs`` x (forward + backward = 3 x forward) of the policy and of the value model (a second
      trunk).
    """
    f = shape_flops(lm, prompt_len, new_tokens)
    trunk = f["trunk"] - f["adapters"]
    generate = f["generate"] - f["adapters"] // f["seq"] * new_tokens
    full = trunk + f["head"] * f["seq"]
    return {"train": 3 * (full + trunk) * batch * epochs,
            "rollout": batch * (generate + full + 2 * trunk)}


def trl_iteration_tflops(model_dir: str | Path, *, batch: int = 64, prompt_len: int = 16, new_tokens: int = 32,
                         epochs: int = 4) -> float:
    """TFLOP of one TRL iteration on the bench configuration, for the policy saved in ``model_dir`` (its
    config alone: the model is built on the meta device, no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return round(sum(peer_flops(lm, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                                epochs=epochs).values()) / 1e12, 3)
