"""Does ``torch.compile`` pay off for ppo-lm's training step on this machine? One minibatch step of the bench's
policy (16 sequences of 16 + 32 tokens: forward through ``models.lm_forward``, token logprobs, backward, fused AdamW),
eager against compiled (the forward alone, or the forward with the loss), in fp32 or bf16 autocast.

    .venv/bin/python benchmarks/compile_step.py [--size tiny] [--precision fp32|bf16] [--steps 16]

Prints one JSON line per mode: the first step (compilation included) and the median step afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from ppo_lm import algo
    from ppo_lm.bench import SHAPES
    from ppo_lm.models import fuse_gelu, lm_forward

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    n_response = 32
    for mode in ("eager", "compile-forward", "compile-forward-and-loss"):
        torch.manual_seed(0)
        lm = GPT2LMHeadModel(GPT2Config(**SHAPES[a.size]))
        fuse_gelu(lm)
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-5, fused=True)
        ids = torch.randint(3, lm.config.vocab_size, (16, 16 + n_response))
        mask, tokens = torch.ones_like(ids), ids[:, -n_response:]

        def forward(i, m):
            return lm_forward(lm, i, m, n_response)[0]

        def forward_and_loss(i, m, t):  # the plain formula, so that the compiler sees (and can fuse) all of it
            logits = lm_forward(lm, i, m, n_response)[0]
            return -torch.log_softmax(logits.float(), -1).gather(-1, t.unsqueeze(-1)).mean()

        if mode == "compile-forward":
            forward = torch.compile(forward)
        if mode == "compile-forward-and-loss":
            forward_and_loss = torch.compile(forward_and_loss)

        def step():
            with torch.autocast("cpu", torch.bfloat16, enabled=a.precision == "bf16"):
                if mode == "compile-forward-and-loss":
                    loss = forward_and_loss(ids, mask, tokens)
                else:
                    loss = -algo.logprobs_from_logits(forward(ids, mask), tokens).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times = []
        for _ in range(a.steps + 4):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(json.dumps({"size": a.size, "precision": a.precision, "mode": mode, "first_step_s": round(times[0], 2),
                          "median_step_ms": round(1e3 * statistics.median(times[4:]), 1)}), flush=True)


if __name__ == "__main__":
    main()
