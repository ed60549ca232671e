"""The bad-model matrix: every way a model or tokenizer folder can be unusable, for every command that loads
one. Each must end with exit code 2 and one line naming the broken path, before any training, with nothing
written. The commands run in-process (``cli.main``): the same code path as the console script, without paying
the interpreter start 60 times."""

import json
import shutil

import pytest
import torch

from ppo_lm import cli
from ppo_lm.models import check_model_files
from ppo_lm.errors import UserError

from conftest import prompt_records


def _truncate(file, keep=0.5):
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


def _no_tokenizer(folder):
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()


def _sharded(folder):
    """Two-shard weights whose index names a third, missing shard."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


def _bin_truncated(folder):
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    _truncate(folder / "pytorch_model.bin")


#: (name, how to break a copy of a good folder, the file the error line must name)
BREAKS = [
    ("config missing", lambda d: (d / "config.json").unlink(), "config.json"),
    ("config not JSON", lambda d: (d / "config.json").write_text('{"model_type": "gpt2",'), "config.json"),
    ("config not an object", lambda d: (d / "config.json").write_text("[1, 2]"), "config.json"),
    ("weights missing", lambda d: (d / "model.safetensors").unlink(), ""),
    ("weights truncated", lambda d: _truncate(d / "model.safetensors"), "model.safetensors"),
    ("weights corrupt", lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"),
     "model.safetensors"),
    ("weights empty", lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors"),
    ("shard missing", _sharded, "model-00002-of-00002.safetensors"),
    ("torch bin truncated", _bin_truncated, "pytorch_model.bin"),
    ("tokenizer missing", _no_tokenizer, ""),
    ("tokenizer not JSON", lambda d: (d / "tokenizer.json").write_text("{oops"), ""),
]


def _broken(good, tmp_path, brk):
    folder = tmp_path / "broken model"
    shutil.copytree(good, folder)
    brk(folder)
    return folder


def _write(path, text):
    path.write_text(text)
    return path


def _files(tmp_path):
    prompts = _write(tmp_path / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in prompt_records(8)))
    demos = _write(tmp_path / "demos.jsonl", "".join(json.dumps({"prompt": "a b", "response": "c d"}) + "\n"
                                                      for _ in range(8)))
    prefs = _write(tmp_path / "prefs.jsonl", "".join(json.dumps({"prompt": "a", "chosen": "a a", "rejected": "b c"})
                                                      + "\n" for _ in range(8)))
    return prompts, demos, prefs


def _ppo_yaml(tmp_path, model, prompts, reward="{type: keyword, words: [a]}", name="ppo.yaml"):
    return _write(tmp_path / name, f"model: {{name_or_path: '{model}'}}\ndata: {{path: '{prompts}'}}\n"
                                          "rollout: {batch_size: 4, max_new_tokens: 4}\n"
                                          f"reward: {{sources: [{reward}]}}\nppo: {{num_minibatches: 2}}\n"
                                          f"train: {{output_dir: '{tmp_path / 'out'}', iterations: 1, progress: false}}\n")


def _commands(tmp_path, good, good_rm, broken, broken_kind):
    """The command lines that load the broken folder, for a causal-LM folder or a reward-model folder."""
    prompts, demos, prefs = _files(tmp_path)
    out = tmp_path / "out"
    if broken_kind == "rm":
        ppo = _ppo_yaml(tmp_path, good, prompts, reward=f"{{type: model, path: '{broken}'}}")
        pipe = _write(tmp_path / "pipe.yaml", f"output_dir: '{out}'\nppo: '{ppo}'\n")
        return {"train (reward model)": ["train", ppo],
                "eval (reward model)": ["eval", ppo, "--model", good, "--output-dir", out],
                "pipeline (reward model)": ["pipeline", pipe]}
    ppo = _ppo_yaml(tmp_path, broken, prompts)
    sft = _write(tmp_path / "sft.yaml", f"model: {{name_or_path: '{broken}'}}\ndata: {{path: '{demos}'}}\n"
                                        f"train: {{output_dir: '{out}', progress: false}}\n")
    rm = _write(tmp_path / "rm.yaml", f"model: {{name_or_path: '{broken}'}}\ndata: {{path: '{prefs}'}}\n"
                                      f"train: {{output_dir: '{out}', progress: false}}\n")
    good_ppo = _ppo_yaml(tmp_path, good, prompts, name="good_ppo.yaml")
    pipe = _write(tmp_path / "pipe.yaml", f"output_dir: '{out}'\nsft: '{sft}'\nppo: '{good_ppo}'\n")
    return {"train": ["train", ppo], "eval": ["eval", good_ppo, "--model", broken, "--output-dir", out],
            "eval (reference)": ["eval", good_ppo, "--model", good, "--reference", broken, "--output-dir", out],
            "eval --compare": ["eval", good_ppo, "--compare", good, broken, "--output-dir", out],
            "generate": ["generate", broken, "--prompt", "a b"], "sft": ["sft", sft], "reward-model": ["reward-model", rm],
            "pipeline": ["pipeline", pipe]}


def _assert_refused(argv, broken, file, capsys, out):
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (argv, err)
    assert err and err[-1].startswith("error: ") and str(broken) in err[-1], err
    assert file in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists(), f"{argv[0]} wrote {sorted(p.name for p in out.iterdir())} before refusing"


@pytest.mark.parametrize("name, brk, file", BREAKS, ids=[b[0] for b in BREAKS])
def test_a_broken_policy_folder_is_refused_by_every_command(tiny_model_dir, tiny_reward_model_dir, tmp_path, capsys,
                                                             monkeypatch, name, brk, file):
    monkeypatch.chdir(tmp_path)
    broken = _broken(tiny_model_dir, tmp_path, brk)
    for command, argv in _commands(tmp_path, tiny_model_dir, tiny_reward_model_dir, broken, "lm").items():
        if command == "eval (reference)" and name.startswith("tokenizer"):
            continue  # the reference is read with the evaluated model's tokenizer: it needs none of its own
        _assert_refused(argv, broken, file, capsys, tmp_path / "out")


@pytest.mark.parametrize("name, brk, file", [b for b in BREAKS if b[0] in
                                             ("config not JSON", "weights truncated", "tokenizer missing")],
                         ids=["config not JSON", "weights truncated", "tokenizer missing"])
def test_a_broken_reward_model_folder_is_refused(tiny_model_dir, tiny_reward_model_dir, tmp_path, capsys, monkeypatch,
                                                 name, brk, file):
    monkeypatch.chdir(tmp_path)
    broken = _broken(tiny_reward_model_dir, tmp_path, brk)
    for command, argv in _commands(tmp_path, tiny_model_dir, tiny_reward_model_dir, broken, "rm").items():
        _assert_refused(argv, broken, file, capsys, tmp_path / "out")


def test_check_model_files_passes_good_folders_and_hub_names(tiny_model_dir, tiny_reward_model_dir):
    check_model_files(str(tiny_model_dir), "model.name_or_path")
    check_model_files(str(tiny_reward_model_dir), "reward.sources.0.path")
    check_model_files("someone/some-model", "model.name_or_path")  # a hub name: checked when fetched


def test_safetensors_check_counts_the_bytes_by_hand(tmp_path):
    """Header of n bytes + the tensors' bytes: a file one byte short, or one byte long, is refused."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3, dtype=torch.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    data = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert len(data) == 8 + n + 12  # 3 float32
    check_model_files(str(tmp_path), "f")
    for damaged in (data[:-1], data + b"\0"):
        (tmp_path / "model.safetensors").write_bytes(damaged)
        with pytest.raises(UserError, match=f"describes {8 + n + 12} bytes, the file has {len(damaged)}"):
            check_model_files(str(tmp_path), "f")


def test_a_folder_damaged_after_it_passed_is_checked_again(tiny_model_dir, tmp_path):
    """An unchanged folder is checked once per process; a change to its files makes it checked anew."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    check_model_files(str(folder), "model.name_or_path")
    check_model_files(str(folder), "model.name_or_path")  # the second call is the cached pass
    _truncate(folder / "model.safetensors")
    with pytest.raises(UserError, match="model.safetensors is truncated or damaged"):
        check_model_files(str(folder), "model.name_or_path")
