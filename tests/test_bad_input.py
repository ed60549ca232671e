"""The bad-input matrix: each case is a real `ppo-lm train` run that must end with exit code 2 and one line
naming the cause, with no traceback and no half-written output. (Config-key cases: tests/test_cli.py.)"""

import json

import pytest

from ppo_lm import toy

from conftest import WORDS
from test_cli import ppo_lm, write_config


def _empty_dataset(tmp):
    (tmp / "empty.jsonl").write_text("\n")
    return [f"data.path={tmp / 'empty.jsonl'}"]


def _long_prompts(tmp):
    (tmp / "long.jsonl").write_text(json.dumps({"prompt": " ".join(WORDS * 3)}) + "\n")
    return [f"data.path={tmp / 'long.jsonl'}", "data.max_prompt_tokens=8", "data.prompt_overflow=error"]


def _prompt_not_string(tmp):
    (tmp / "num.jsonl").write_text('{"prompt": "a b"}\n{"prompt": 7}\n')
    return [f"data.path={tmp / 'num.jsonl'}"]


def _reward(body):
    def setup(tmp):
        (tmp / "my_reward.py").write_text(body)
        return []
    return setup


def _unwritable_output(tmp):
    (tmp / "a_file").write_text("x")
    return [f"train.output_dir={tmp / 'a_file' / 'run'}"]


def _reward_model_is_lm(tmp):
    return ["reward.sources=[{type: model, path: MODEL}]"]


CASES = [
    ("missing dataset", lambda t: [f"data.path={t / 'nope.jsonl'}"], "data.path: no such file or directory"),
    ("empty dataset", _empty_dataset, "empty.jsonl: the dataset is empty"),
    ("prompt not a string", _prompt_not_string, "num.jsonl:2: field 'prompt' must be a string"),
    ("prompt over the limit", _long_prompts, "long.jsonl:1: prompt has 30 tokens, over data.max_prompt_tokens (8)"),
    ("reward raises", _reward("def count_a(p, c, **f):\n    raise KeyError('label')\n"),
     "reward.sources.0 (python: my_reward:count_a): raised KeyError: 'label' (iteration 1)"),
    ("reward returns NaN", _reward("def count_a(p, c, **f):\n    return [float('nan')] * len(c)\n"),
     "reward.sources.0 (python: my_reward:count_a): returned a non-finite score (nan) for completion 0"),
    ("reward wrong type", _reward("def count_a(p, c, **f):\n    return None\n"),
     "reward.sources.0 (python: my_reward:count_a): must return a list or tensor of floats, got NoneType"),
    ("reward wrong length", _reward("def count_a(p, c, **f):\n    return [0.0] * (len(c) + 1)\n"),
     "returned 9 scores for 8 completions"),
    ("reward module missing", lambda t: ["reward.sources.0.function=nowhere:f"], "reward.sources.0.function: cannot import 'nowhere'"),
    ("reward model not a classifier", _reward_model_is_lm, "reward.sources.0.path: 'MODEL' is not a sequence-classification (reward) model"),
    ("output dir not writable", _unwritable_output, "train.output_dir: output directory is not writable"),
]


@pytest.mark.parametrize("name, setup, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, name, setup, expected):
    cfg = write_config(tmp_path, tiny_model_dir)
    overrides = [o.replace("MODEL", str(tiny_model_dir)) for o in setup(tmp_path)]
    expected = expected.replace("MODEL", str(tiny_model_dir))
    run = ppo_lm("train", cfg, *overrides, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], run.stderr
    assert "Traceback" not in run.stderr
    out = tmp_path / "out"
    if name not in ("reward raises", "reward returns NaN", "reward wrong type", "reward wrong length"):
        assert not out.exists()  # refused before anything was written
    else:  # failed mid-run: only complete files (no metrics row, no model) are there
        assert (out / "metrics.jsonl").read_text() == "" and not (out / "final").exists()


def test_tokenizer_without_pad_token_is_handled_with_a_notice(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = toy.word_tokenizer(WORDS)
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", unk_token="<unk>")
    model = toy.gpt2(tok, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    toy.save_model(model, bare, tmp_path / "nopad")
    cfg = write_config(tmp_path, tmp_path / "nopad")
    run = ppo_lm("train", cfg, "train.iterations=1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "has no pad token; using its EOS token '<eos>' as pad" in run.stderr


def test_prompts_over_the_context_are_truncated_with_a_warning(tiny_model_dir, tmp_path):
    """The tiny model's context is 64 tokens; with 6 new tokens a prompt may use 58."""
    cfg = write_config(tmp_path, tiny_model_dir)
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": " ".join(WORDS * 7)}) + "\n")
    run = ppo_lm("train", cfg, f"data.path={tmp_path / 'long.jsonl'}", "train.iterations=1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "1 of 1 prompts were longer than data.max_prompt_tokens (58) and were truncated" in run.stderr
