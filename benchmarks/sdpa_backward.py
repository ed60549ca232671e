#!/usr/bin/env python
"""Milliseconds of one causal scaled-dot-product attention forward + backward on this CPU, flash kernel vs the
plain math kernel, by sequence length and dtype (16 sequences, 4 heads of 64). The trainer uses the math kernel
for training minibatches on CPU in bf16 up to 128 tokens, where this shows it faster.

    .venv/bin/python benchmarks/sdpa_backward.py
"""
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def millis(backend, dtype, length, batch=16, heads=4, dim=64, reps=10) -> float:
    q, k, v = (torch.randn(batch, heads, length, dim, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.float().sum().backward()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return round((time.perf_counter() - start) / reps * 1000, 2)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for dtype in (torch.bfloat16, torch.float32):
        for length in (48, 128, 256, 512):
            print(json.dumps({"dtype": str(dtype).removeprefix("torch."), "tokens": length,
                              "flash_ms": millis(SDPBackend.FLASH_ATTENTION, dtype, length),
                              "math_ms": millis(SDPBackend.MATH, dtype, length)}))
