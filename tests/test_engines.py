"""Rollout engines (issue 23): ``rollout.engine: batch`` (transformers' continuous batching) against the ``hf``
engine: the same distribution, the policy's own logprobs, reproducible draws, and a run end to end."""

from __future__ import annotations

import dataclasses
import json

import torch
from torch.testing import assert_close

from ppo_lm.models import load_policy, load_tokenizer, make_reference
from ppo_lm.rollout import collect, left_pad, sample_responses

from conftest import keyword_config_file, prompt_records, tiny_config


def _collect(cfg, policy, tok, n=10, seed=0):
    prompts = [r["prompt"] for r in prompt_records(n)]
    ids = [tok(p)["input_ids"] for p in prompts]
    torch.manual_seed(seed)
    return collect(policy, make_reference(policy), tok, ids, prompts, {}, cfg.rollout, device=torch.device("cpu"),
                   forward_batch_size=4)


def test_batch_engine_samples_the_policy_and_its_logprobs_are_the_teacher_forced_ones(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, rollout={"batch_size": 10, "max_new_tokens": 12, "engine": "batch"})
    tok, policy = load_tokenizer(str(tiny_model_dir)), load_policy(cfg.model)
    r = _collect(cfg, policy, tok)
    assert r.response_mask.any(-1).all() and not r.response_mask.all()  # some rows stopped at EOS
    assert r.ended_with_eos.any()
    # at temperature 1 without top-k/top-p the engine draws from the policy itself: its logprobs of the drawn
    # tokens are the teacher-forced ones, and sampling_kl is 0
    assert_close(r.sampling_logprobs, r.logprobs, atol=1e-4, rtol=0)
    again = _collect(cfg, policy, tok)
    assert torch.equal(again.response_ids, r.response_ids)  # seeded from torch's generator: reproducible
    other = _collect(cfg, policy, tok, seed=1)
    assert not torch.equal(other.response_ids, r.response_ids)


def test_batch_engine_reports_the_warped_distribution_under_top_k(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, rollout={"batch_size": 10, "max_new_tokens": 8, "engine": "batch",
                                                        "temperature": 0.8, "top_k": 3})
    tok, policy = load_tokenizer(str(tiny_model_dir)), load_policy(cfg.model)
    r = _collect(cfg, policy, tok)
    m = r.response_mask
    # a token kept by top-k is likelier under the truncated distribution than under the policy's at 0.8
    assert ((r.sampling_logprobs - r.logprobs)[m] > 0).all()
    tokens_per_row = [set(row[mk].tolist()) for row, mk in zip(r.response_ids, m)]
    assert all(tokens_per_row)


def test_batch_and_hf_engines_draw_from_the_same_distribution(tiny_model_dir, tmp_path):
    """3000 one-token answers to one prompt from each engine: the total variation distance between the two
    histograms is that of sampling noise (about 0.03 for this vocabulary; 0.1 would be a different sampler)."""
    tok = load_tokenizer(str(tiny_model_dir))
    ids, mask = left_pad([tok("a b c")["input_ids"]] * 3000, tok.pad_token_id)
    counts = {}
    for engine in ("hf", "batch"):
        cfg = tiny_config(tiny_model_dir, tmp_path, rollout={"batch_size": 16, "max_new_tokens": 1, "engine": engine,
                                                            "temperature": 0.7, "top_p": 0.9})
        lm = load_policy(cfg.model).lm.eval()
        torch.manual_seed(0)
        out = sample_responses(lm, tok, ids, mask, cfg.rollout)
        counts[engine] = torch.bincount(out.ids[:, 0], minlength=len(tok)).float() / 3000
    assert 0.5 * (counts["hf"] - counts["batch"]).abs().sum() < 0.06, counts


def test_a_run_on_the_batch_engine_from_the_command_line(tiny_model_dir, tmp_path):
    from test_cli import ppo_lm as cli

    cfg = keyword_config_file(tmp_path, tiny_model_dir, rollout="batch_size: 8, max_new_tokens: 6, engine: batch")
    out = cli("train", cfg)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(abs(r["sampling_kl"]) < 1e-4 for r in rows)
    out = cli("train", cfg, "rollout.engine=sglang")
    assert out.returncode == 2 and "rollout.engine" in out.stderr and out.stderr.count("\n") == 1
