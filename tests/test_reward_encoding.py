"""A reward model reads prompt + completion the same way in PPO as in its training: its own tokenizer (not the
policy's), the same chat template or none, the same length and truncation side."""

import json

import pytest
import torch

from ppo_lm import reward_model, toy
from ppo_lm.config import load_config
from ppo_lm.reward_model import RewardModelConfig
from ppo_lm.rewards.model import ENCODING_KEY, RewardModel, encode_for_reward
from ppo_lm.trainer import train

from conftest import WORDS, prompt_records, tiny_config

#: The reward model's own vocabulary: other words in another order, so its ids differ from the policy's.
RM_WORDS = ["user", "assistant", "z", "y", *reversed(WORDS), "x"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"


def _rm_start(tmp_path, chat: bool):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = toy.word_tokenizer(RM_WORDS)
    if chat:
        tok.chat_template = TEMPLATE
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tok), num_labels=1,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return toy.save_model(GPT2ForSequenceClassification(config), tok, tmp_path / "rm-start")


def _train_rm(tmp_path, start, chat: str, max_length: int):
    rows = [{"prompt": "b c", "chosen": " a a d", "rejected": " d e f"} for _ in range(16)]
    cfg = load_config(None, [f"model.name_or_path={start}", "data.path=records", "optim.epochs=1",
                             f"data.max_length={max_length}", f"data.chat_template={chat}",
                             f"train.output_dir={tmp_path / 'rm'}", "train.progress=false"],
                      schema=RewardModelConfig, check_paths=False)
    reward_model.run(cfg, records=rows)
    return tmp_path / "rm" / "final"


def _ids_seen(rm: RewardModel, prompts, completions) -> list[list[int]]:
    """The unpadded token ids the reward model's forward receives."""
    seen = []
    forward = rm.model.forward

    def spy(input_ids=None, attention_mask=None, **kw):
        seen.extend(row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask))
        return forward(input_ids=input_ids, attention_mask=attention_mask, **kw)

    rm.model.forward = spy
    rm(prompts, completions, {})
    return seen


def test_chat_template_encoding_by_hand(tmp_path):
    tok = toy.word_tokenizer(RM_WORDS)
    tok.chat_template = TEMPLATE
    v = tok.get_vocab()
    # "user b c assistant a a d " -> the last 6 tokens
    assert encode_for_reward(tok, "b c", " a a d", 6, chat=True) == [v[w] for w in "b c assistant a a d".split()]
    assert encode_for_reward(tok, "b c", " a a d", 3, chat=False) == [v[w] for w in "a a d".split()]


@pytest.mark.parametrize("chat", ["on", "off"])
def test_ppo_scores_with_the_encoding_the_reward_model_was_trained_with(tiny_model_dir, tmp_path, chat):
    final = _train_rm(tmp_path, _rm_start(tmp_path, chat == "on"), chat, max_length=5)
    saved = json.loads((final / "config.json").read_text())[ENCODING_KEY]
    assert saved == {"chat_template": chat == "on", "max_length": 5, "truncation_side": "left"}

    rm = RewardModel(str(final), max_length=1024)  # the source's own default is overridden by the saved one
    assert (rm.chat, rm.max_length) == (chat == "on", 5)
    v = rm.tokenizer.get_vocab()
    expected = "c assistant a a d" if chat == "on" else "b c a a d"  # the end is kept: 5 tokens
    assert _ids_seen(rm, ["b c"], [" a a d"]) == [[v[w] for w in expected.split()]]

    # the same model as a PPO reward source for a policy with another tokenizer: it reads the policy's prompt
    # and completion texts, re-encoded with its own tokenizer
    cfg = tiny_config(tiny_model_dir, tmp_path / "ppo", reward={"sources": [{"type": "model", "path": str(final)}]},
                      train={"iterations": 1})
    result = train(cfg, records=prompt_records(16))
    assert len(result.metrics) == 1 and torch.isfinite(torch.tensor(result.metrics[0]["reward_mean"]))


def test_a_foreign_reward_model_is_read_as_plain_text_keeping_the_end(tiny_reward_model_dir):
    rm = RewardModel(str(tiny_reward_model_dir), max_length=4)
    v = rm.tokenizer.get_vocab()
    assert not rm.chat
    assert _ids_seen(rm, ["a b c d"], [" e f"]) == [[v[w] for w in "c d e f".split()]]


def test_completion_only_reads_what_the_policy_wrote_and_an_empty_one_as_the_end_of_text(tiny_reward_model_dir):
    rm = RewardModel(str(tiny_reward_model_dir), max_length=4, completion_only=True)
    v, end = rm.tokenizer.get_vocab(), rm.tokenizer.eos_token_id
    assert end is not None
    # the prompt is not read at all, and a response of no tokens is one row of the end-of-text token
    assert _ids_seen(rm, ["a b c d", "a b"], [" e f", ""]) == [[v["e"], v["f"]], [end]]
    # a conversation prompt is not read either
    scores = rm(["x", "y"], [" e f", " e f"], {"prompt_messages": [[{"role": "user", "content": "a"}], None]})
    assert scores[0] == scores[1]


def test_conversational_preferences_in_both_hub_layouts_by_hand(tmp_path):
    """A pair whose sides are whole conversations, or a conversation prompt with one assistant turn per side,
    reads as (the turns before the last, the last assistant turn), and encodes through the chat template."""
    from ppo_lm.reward_model import RMDataConfig, preference_side

    d = RMDataConfig(path="p.jsonl")
    user, said = {"role": "user", "content": "b c"}, {"role": "assistant", "content": "d"}
    implicit = {"chosen": [user, said, {"role": "user", "content": "e"}, {"role": "assistant", "content": "a a"}],
                "rejected": [user, said, {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]}
    explicit = {"prompt": [user, said, {"role": "user", "content": "e"}],
                "chosen": [{"role": "assistant", "content": "a a"}], "rejected": [{"role": "assistant", "content": "f"}]}
    for record in (implicit, explicit):
        prompt, completion = preference_side(record, d, "chosen", "p.jsonl:1")
        assert (prompt, completion) == ([user, said, {"role": "user", "content": "e"}], "a a")
    assert preference_side({"prompt": "b", "chosen": [said]}, d, "chosen", "w") == ([{"role": "user", "content": "b"}], "d")
    assert preference_side({"prompt": "b", "chosen": "d"}, d, "chosen", "w") == ("b", "d")
    tok = toy.word_tokenizer(RM_WORDS)
    tok.chat_template = TEMPLATE
    v = tok.get_vocab()
    ids = encode_for_reward(tok, [user, said, {"role": "user", "content": "e"}], "a a", 64, chat=False)
    assert ids == [v[w] for w in "user b c assistant d user e assistant a a".split()]
    with pytest.raises(Exception, match="must end with an assistant turn"):
        preference_side({"chosen": [user]}, d, "chosen", "p.jsonl:3")
    with pytest.raises(Exception, match="p.jsonl:4: .*'rejected'"):
        preference_side({"chosen": "a", "rejected": 3}, d, "rejected", "p.jsonl:4")


def test_conversational_preferences_need_a_chat_template(tiny_model_dir, tmp_path):
    from ppo_lm.errors import UserError

    rows = [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]}] * 4
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "data.path=prefs.jsonl",
                             f"train.output_dir={tmp_path / 'rm'}", "train.progress=false"],
                      schema=RewardModelConfig, check_paths=False)
    with pytest.raises(UserError, match="the preference data hold conversations, which need the tokenizer's chat"):
        reward_model.run(cfg, records=rows)
    assert not (tmp_path / "rm").exists()


def test_ppo_reward_model_reads_a_conversation_prompt_whole(tmp_path):
    """A conversation prompt reaches the rewards as its last user turn, and whole in fields["prompt_messages"]:
    the reward model reads the whole dialogue, as the reward-model stage trained on it."""
    from ppo_lm.config import DataConfig
    from ppo_lm.data import PROMPT_MESSAGES, build_prompt_dataset

    final = _train_rm(tmp_path, _rm_start(tmp_path, chat=True), "on", max_length=64)
    rm = RewardModel(str(final))
    turns = [{"role": "user", "content": "b c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}]
    tok = toy.word_tokenizer(WORDS)
    tok.chat_template = TEMPLATE
    dataset = build_prompt_dataset([{"messages": [*turns, {"role": "assistant", "content": "a"}]}, {"prompt": "f"}],
                                   tok, DataConfig(path="p.jsonl", chat_template="on"))
    prompts, _, fields = dataset.batch([0, 1])
    assert prompts == ["e", "f"] and fields[PROMPT_MESSAGES] == [turns, None]  # the demonstration's turn dropped
    v = rm.tokenizer.get_vocab()
    seen, forward = [], rm.model.forward

    def spy(input_ids=None, attention_mask=None, **kw):
        seen.extend(row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask))
        return forward(input_ids=input_ids, attention_mask=attention_mask, **kw)

    rm.model.forward = spy
    rm(prompts, [" a a", " d"], fields)
    assert seen == [[v[w] for w in "user b c assistant d user e assistant a a".split()],
                    [v[w] for w in "user f assistant d".split()]]


def test_reward_model_accuracy_on_a_separate_file(tmp_path):
    """data.eval_path: every record of data.path is trained on, the accuracy is measured on the other file; a bad
    record there is named by its own file and line."""
    start = _rm_start(tmp_path, chat=False)
    train_rows = tmp_path / "pairs.jsonl"
    train_rows.write_text("".join(json.dumps({"prompt": "b c", "chosen": " a a d", "rejected": " d e f"}) + "\n"
                                  for _ in range(12)))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": "c", "chosen": " a d", "rejected": " e f"}) + "\n" for _ in range(5)))
    over = [f"model.name_or_path={start}", f"data.path={train_rows}", f"data.eval_path={held}", "optim.epochs=1",
            f"train.output_dir={tmp_path / 'rm'}", "train.progress=false"]
    summary = reward_model.run(load_config(None, over, schema=RewardModelConfig))
    assert (summary["train_examples"], summary["eval_examples"]) == (12, 5)
    over[-2] = f"train.output_dir={tmp_path / 'rm-limited'}"
    limited = reward_model.run(load_config(None, [*over, "data.limit=8"], schema=RewardModelConfig))
    assert (limited["train_examples"], limited["eval_examples"]) == (8, 5)  # data.limit: the first 8 records
    held.write_text(held.read_text() + json.dumps({"prompt": "c", "chosen": 3}) + "\n")
    over[-2] = f"train.output_dir={tmp_path / 'rm2'}"
    with pytest.raises(Exception, match=f"{held}:6: .*'chosen'"):
        reward_model.run(load_config(None, over, schema=RewardModelConfig))
    from ppo_lm.errors import ConfigError
    with pytest.raises(ConfigError, match="data.eval_path"):
        load_config(None, [*over[:2], f"data.eval_path={tmp_path / 'nope.jsonl'}"], schema=RewardModelConfig)
