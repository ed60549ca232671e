"""GGUF files as a model source: checked before anything is loaded, converted once into a plain transformers folder
(the quantisation config stripped), and trained and saved like any other model. The real-model tests use
SmolLM2-135M-Instruct from `make models` and are skipped when it is absent."""

import json
from pathlib import Path

import pytest

from ppo_lm import cli
from ppo_lm.gguf_source import as_folder, cached_folder

from test_bad_model import _assert_refused, _commands

SMOLLM2 = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(not SMOLLM2.is_file(), reason=f"{SMOLLM2} is absent: `make models` fetches it")


def test_a_file_that_is_not_gguf_is_refused_by_every_command(tiny_model_dir, tiny_reward_model_dir, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "model.gguf"
    broken.write_bytes(b"PK\x03\x04 not a gguf file")
    for command, argv in _commands(tmp_path, tiny_model_dir, tiny_reward_model_dir, broken, "lm").items():
        if command == "pipeline":
            continue  # its SFT stage names the same file: covered by "sft"
        _assert_refused(argv, broken, "is not a GGUF file", capsys, tmp_path / "out")


def test_a_missing_gguf_file_is_named_before_anything_loads(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    config = tmp_path / "ppo.yaml"
    config.write_text(f"model:\n  name_or_path: models/absent.gguf\ndata: {{path: '{prompts}'}}\n"
                      f"train: {{output_dir: '{tmp_path / 'out'}'}}\n")
    assert cli.main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.name_or_path" in err and "no such file or directory: models/absent.gguf" in err and ":2" in err, err


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """SmolLM2 converted once, into a cache of the test's own."""
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("PPO_LM_CACHE")
    os.environ["PPO_LM_CACHE"] = str(cache)
    notices = []
    folder = Path(as_folder(SMOLLM2, "model.name_or_path", notice=notices.append))
    yield folder, notices, cache
    if old is None:
        del os.environ["PPO_LM_CACHE"]
    else:
        os.environ["PPO_LM_CACHE"] = old


@needs_smollm2
@pytest.mark.slow
def test_smollm2_is_converted_once_into_a_plain_transformers_folder(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, notices, cache = converted
    assert folder == cached_folder(SMOLLM2) and folder.parent == cache / "gguf"
    assert len(notices) == 1 and "converting" in notices[0]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not list(cache.glob("gguf/*.partial"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    again = []
    assert Path(as_folder(SMOLLM2, "model.name_or_path", notice=again.append)) == folder and not again
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once


@needs_smollm2
@pytest.mark.slow
def test_smollm2_trains_from_its_gguf_file_and_saves_a_plain_model(converted, tmp_path):
    """One PPO iteration with LoRA on the GGUF file itself, chat-template prompts; final/ is a plain transformers
    folder without a quantisation config, and the responses end at the template's <|im_end|>."""
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                               for q in ["Say yes.", "Say no.", "What is 2+2?", "Name a colour."]))
    config = tmp_path / "ppo.yaml"
    config.write_text(f"model: {{name_or_path: '{SMOLLM2}', lora: {{enabled: true, r: 4}}}}\n"
                      f"data: {{path: '{prompts}'}}\nrollout: {{batch_size: 4, max_new_tokens: 12, temperature: 0.7}}\n"
                      "reward: {sources: [{type: length, target: 3}]}\nppo: {num_minibatches: 2, epochs: 1}\n"
                      f"train: {{output_dir: '{tmp_path / 'out'}', iterations: 1, progress: false, log_samples: 0}}\n")
    assert cli.main(["train", str(config)]) == 0
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["eos_fraction"] > 0, row  # an answer this short ends with <|im_end|>
    final = tmp_path / "out" / "final"
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(final)
