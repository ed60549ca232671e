import pytest

from ppo_lm.config import DataConfig
from ppo_lm.data import PromptSampler, build_prompt_dataset, load_records
from ppo_lm.errors import UserError
from ppo_lm.models import load_tokenizer


def test_jsonl_csv_json(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x", "answer": "1"}\n\n{"prompt": "y"}\n')
    (tmp_path / "a.csv").write_text("prompt,answer\nx,1\ny,2\n")
    (tmp_path / "a.json").write_text('[{"prompt": "x"}]')
    assert [r["prompt"] for r in load_records(str(tmp_path / "a.jsonl"))] == ["x", "y"]
    assert load_records(str(tmp_path / "a.csv"))[1] == {"prompt": "y", "answer": "2"}
    assert load_records(str(tmp_path / "a.json")) == [{"prompt": "x"}]


def test_malformed_line_and_empty_dataset(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: each line must be a JSON object"):
        load_records(str(bad))
    tok = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(UserError, match="the dataset is empty"):
        build_prompt_dataset([], tok, DataConfig(path="empty.jsonl"))


def test_long_prompts_truncate_from_the_left_or_refuse(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    records = [{"prompt": "a b c d e f g", "__line__": 1}]
    warnings = []
    ds = build_prompt_dataset(records, tok, DataConfig(path="p.jsonl", max_prompt_tokens=3), warn=warnings.append)
    assert ds.prompts == ["e f g"] and len(ds.token_ids[0]) == 3 and "truncated" in warnings[0]
    with pytest.raises(UserError, match=r"p.jsonl:1: prompt has 7 tokens, over data.max_prompt_tokens \(3\)"):
        build_prompt_dataset(records, tok, DataConfig(path="p.jsonl", max_prompt_tokens=3, prompt_overflow="error"))


def test_sampler_covers_each_epoch_and_resumes_exactly():
    a = PromptSampler(10, seed=3)
    first_epoch = a.next(4) + a.next(4) + a.next(2)
    assert sorted(first_epoch) == list(range(10))
    state = a.state_dict()
    expected = a.next(7)
    b = PromptSampler(10, seed=3)
    b.load_state_dict(state)
    assert b.next(7) == expected
    assert PromptSampler(5, seed=0, shuffle=False).next(7) == [0, 1, 2, 3, 4, 0, 1]
