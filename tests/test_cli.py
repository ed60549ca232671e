"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from conftest import prompt_records

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def ppo_lm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ppo_lm.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=600)


def write_config(tmp_path, model_dir, extra=""):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in prompt_records(16)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""model:
  name_or_path: {model_dir}
data:
  path: {data}
rollout:
  batch_size: 8
  max_new_tokens: 6
reward:
  sources:
    - type: python
      function: my_reward:count_a
ppo:
  lr: 1.0e-3
  num_minibatches: 2
train:
  output_dir: {tmp_path / 'out'}
  iterations: 2
  progress: false
{extra}""")
    (tmp_path / "my_reward.py").write_text(
        "def count_a(prompts, completions, **fields):\n    return [c.split().count('a') for c in completions]\n")
    return cfg


def test_train_then_generate(tiny_model_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_model_dir)
    run = ppo_lm("train", cfg, "train.iterations=3", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert (tmp_path / "out" / "final" / "config.json").exists()
    gen = ppo_lm("generate", tmp_path / "out" / "final", "--prompt", "a b", "-n", "2", "--max-new-tokens", "4")
    assert gen.returncode == 0, gen.stderr
    assert len(gen.stdout.strip().splitlines()) == 2 and gen.stdout.startswith("a b ||| ")


@pytest.mark.parametrize("extra, override, words", [
    ("", "ppo.lr_rate=1", "command line: ppo.lr_rate: unknown key (did you mean 'lr'?)"),
    ("", "ppo.clip_range=0", "ppo.clip_range: must be > 0"),
    ("", "rollout.batch_size=7", "ppo.num_minibatches: rollout.batch_size (7) must be divisible"),
    ("", "ppo.lr=-1", "ppo.lr: must be > 0"),
    ("", "model.name_or_path=./missing", "model.name_or_path: no such file or directory: ./missing"),
    ("", "data.path=./missing.jsonl", "data.path: no such file or directory"),
    ("  seeed: 3\n", None, "cfg.yaml:19: train.seeed: unknown key (did you mean 'seed'?)"),
    ("  iterations: many\n", None, "train.iterations: expected an integer, got 'many'"),
])
def test_bad_config_exits_2_with_one_line(tiny_model_dir, tmp_path, extra, override, words):
    cfg = write_config(tmp_path, tiny_model_dir, extra)
    run = ppo_lm("train", cfg, *([override] if override else []), cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], run.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the input was checked


def test_bad_data_and_model_are_user_errors(tiny_model_dir, tiny_reward_model_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_model_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a b"}\n{"prompt": "a" \n')
    run = ppo_lm("train", cfg, f"data.path={bad}", cwd=tmp_path)
    assert run.returncode == 2 and f"{bad}:2: malformed JSON line" in run.stderr, run.stderr
    run = ppo_lm("train", cfg, "data.prompt_field=question", cwd=tmp_path)
    assert run.returncode == 2 and "prompts.jsonl:1: record has no field 'question'" in run.stderr, run.stderr
    run = ppo_lm("train", cfg, f"model.name_or_path={tiny_reward_model_dir}", cwd=tmp_path)
    assert run.returncode == 2 and "is not a causal language model" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_reward_failure_is_reported_with_its_source(tiny_model_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_model_dir)
    (tmp_path / "my_reward.py").write_text("def count_a(prompts, completions, **f):\n    return [1.0]\n")
    run = ppo_lm("train", cfg, cwd=tmp_path)
    assert run.returncode == 2
    assert "reward.sources.0 (python: my_reward:count_a): returned 1 scores for 8 completions" in run.stderr
    assert "--debug" not in run.stderr and "Traceback" not in run.stderr
    debug = ppo_lm("--debug", "train", cfg, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
