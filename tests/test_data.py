import pytest
import torch

from ppo_lm.config import DataConfig
from ppo_lm.data import PromptSampler, build_prompt_dataset, load_records, pad_right, right_padded
from ppo_lm.errors import UserError
from ppo_lm.models import load_tokenizer


def test_jsonl_csv_json(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x", "answer": "1"}\n\n{"prompt": "y"}\n')
    (tmp_path / "a.csv").write_text("prompt,answer\nx,1\ny,2\n")
    (tmp_path / "a.json").write_text('[{"prompt": "x"}]')
    assert [r["prompt"] for r in load_records(str(tmp_path / "a.jsonl"))] == ["x", "y"]
    assert load_records(str(tmp_path / "a.csv"))[1] == {"prompt": "y", "answer": "2"}
    assert load_records(str(tmp_path / "a.json")) == [{"prompt": "x"}]


def test_pad_right_fills_to_the_longest_row_or_the_given_width():
    assert pad_right([[5], [6, 7]], 0).tolist() == [[5, 0], [6, 7]]
    assert pad_right([[5], [6, 7]], -1, width=3).tolist() == [[5, -1, -1], [6, 7, -1]]
    # a batch of empty responses (every one stopped at once) keeps the token dtype and the given width
    empty = pad_right([[], []], 9, width=1)
    assert empty.dtype == torch.long and empty.tolist() == [[9], [9]]
    logprobs = pad_right([[-0.5], []], 0.0, width=2)
    assert logprobs.dtype == torch.float32 and logprobs.tolist() == [[-0.5, 0.0], [0.0, 0.0]]
    ids, mask = right_padded([[3, 4, 5], [6]], 0)
    assert ids.tolist() == [[3, 4, 5], [6, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


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


CHAT = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant {% endif %}"


def _chat_tokenizer():
    from ppo_lm import toy

    tok = toy.word_tokenizer(["user", "assistant", "system", *"a b c d e f".split()])
    tok.chat_template = CHAT
    return tok


def test_a_conversation_is_a_prompt_through_the_chat_template():
    tok = _chat_tokenizer()
    v = tok.get_vocab()
    records = [{"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"},
                             {"role": "user", "content": "d"}, {"role": "assistant", "content": "e f"}],
                "__line__": 1},
               {"prompt": [{"role": "system", "content": "f"}, {"role": "user", "content": "a"}], "__line__": 2},
               {"prompt": "b", "__line__": 3}]
    ds = build_prompt_dataset(records, tok, DataConfig(path="c.jsonl", chat_template="auto"))
    # the demonstration's last assistant turn is dropped; the template opens the assistant's turn
    assert ds.token_ids[0] == [v[w] for w in "user a b assistant c user d assistant".split()]
    assert ds.token_ids[1] == [v[w] for w in "system f user a assistant".split()]
    assert ds.token_ids[2] == [v[w] for w in "user b assistant".split()]
    assert ds.prompts == ["d", "a", "b"]  # what the rewards see: the turn being answered
    assert ds.fields[0]["messages"][-1]["content"] == "e f"  # the record's fields stay for the rewards


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user"}]}, "c.jsonl:1: field 'messages' must be a non-empty list of messages"),
    ({"messages": []}, "c.jsonl:1: field 'messages' must be a non-empty list of messages"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "c.jsonl:1: field 'messages' holds only an assistant"),
    ({"prompt": 3}, "c.jsonl:1: field 'prompt' must be a string or a list of messages"),
    ({"text": "a"}, "c.jsonl:1: record has no field 'prompt'"),
])
def test_a_bad_conversation_names_its_line(record, message):
    with pytest.raises(UserError, match=message):
        build_prompt_dataset([{**record, "__line__": 1}], _chat_tokenizer(), DataConfig(path="c.jsonl"))


def test_a_conversation_needs_the_chat_template(tiny_model_dir):
    records = [{"messages": [{"role": "user", "content": "a"}], "__line__": 4}]
    with pytest.raises(UserError, match="c.jsonl:4: field 'messages' holds a conversation, which needs the tokenizer's "
                                        "chat template"):
        build_prompt_dataset(records, load_tokenizer(str(tiny_model_dir)), DataConfig(path="c.jsonl"))
    with pytest.raises(UserError, match="chat template"):
        build_prompt_dataset(records, _chat_tokenizer(), DataConfig(path="c.jsonl", chat_template="off"))


def test_sft_takes_a_conversation_whose_last_turn_is_the_response():
    from ppo_lm.sft import SFTDataConfig, encode_examples

    tok = _chat_tokenizer()
    v = tok.get_vocab()
    records = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"}]},
               {"prompt": "d", "response": "e"},
               {"prompt": [{"role": "user", "content": "d"}], "response": "e"}]
    (ids, labels), (ids2, labels2), (ids3, _) = encode_examples(SFTDataConfig(path="s.jsonl", max_length=32), tok,
                                                                records)
    assert ids3 == ids2
    assert ids == [v[w] for w in "user a assistant b c".split()] + [tok.eos_token_id]
    assert labels == [-100] * 3 + ids[3:]
    assert ids2 == [v[w] for w in "user d assistant e".split()] + [tok.eos_token_id]
    bad = [{"messages": [{"role": "user", "content": "a"}], "__line__": 7}]
    with pytest.raises(UserError, match="s.jsonl:7: a demonstration conversation in 'messages' must end with an "
                                        "assistant turn"):
        encode_examples(SFTDataConfig(path="s.jsonl"), tok, bad)
