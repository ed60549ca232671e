#!/usr/bin/env python
"""Models for TRL's side of the benchmark in the Qwen2 architecture, laid out as the peer's ``make_models.py`` lays
out its GPT-2 ones (that script knows only "tiny" and "small"). Run with the peer's virtual environment from the
peer's folder, whose ``make_models.py`` gives the tokenizer; ``benchmarks/bench_compare.py`` does this:

    cd ../shared/peers/trl_ppo && $TRL_PEER_VENV/bin/python .../benchmarks/peer_models.py OUT SIZE 'CONFIG_JSON'

It writes OUT/SIZE/{tokenizer,policy,value,reward}: the peer's word-level tokenizer, a ``Qwen2ForCausalLM``
(seed 1) and two ``Qwen2ForSequenceClassification`` with one label (seeds 2 and 3), all random init from the
``Qwen2Config`` fields in CONFIG_JSON (``ppo_lm.bench.QWEN_SHAPES``), fp32.
"""

import json
import os
import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

sys.path.insert(0, os.getcwd())
import make_models  # noqa: E402  (the peer's, from the working directory)


def main() -> None:
    out_dir, size, shape = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    out = os.path.join(out_dir, size)
    os.makedirs(out, exist_ok=True)
    tok = make_models.build_tokenizer(os.path.join(out, "tokenizer"))
    ids = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    policy = Qwen2ForCausalLM(Qwen2Config(**shape, **ids))
    policy.generation_config.pad_token_id = tok.pad_token_id
    policy.save_pretrained(os.path.join(out, "policy"))
    for name, seed in (("value", 2), ("reward", 3)):
        torch.manual_seed(seed)
        Qwen2ForSequenceClassification(Qwen2Config(**shape, num_labels=1, **ids)).save_pretrained(os.path.join(out, name))
    info = dict(size=size, tokenizer_vocab=len(tok), policy_params=sum(p.numel() for p in policy.parameters()), **shape)
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
