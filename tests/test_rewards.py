import typing

import pytest
import torch
from torch.testing import assert_close

from ppo_lm.config import RewardConfig, RewardSourceConfig
from ppo_lm.errors import RewardError, UserError
from ppo_lm.rewards import build_reward, build_source
from ppo_lm.rewards.builtin import normalize_answer, token_f1


def src(**kw):
    return RewardSourceConfig(**kw)


def test_sentiment_vader_orders_texts():
    s = build_source(src(type="sentiment"))([""] * 3, ["a wonderful , brilliant film", "the table", "awful and boring"], {})
    assert s[0] > 0.5 and s[1] == 0.0 and s[2] < -0.5


def test_exact_match_and_f1_by_hand():
    assert normalize_answer("The  Cat!") == "cat"
    # pred "big red cat", ref "the red cat": common = {red, cat} -> P = 2/3, R = 2/2 -> F1 = 0.8
    assert token_f1("big red cat", "the red cat") == pytest.approx(0.8)
    fields = {"answer": ["Paris", ["London", "the UK"], [{"text": "42"}]]}
    em = build_source(src(type="exact_match"))(["q"] * 3, ["paris.", "UK", "forty two"], fields)
    assert em.tolist() == [1.0, 1.0, 0.0]
    f1 = build_source(src(type="f1"))(["q"] * 3, ["in paris", "UK", "42"], fields)
    assert_close(f1, torch.tensor([2 * 0.5 * 1 / 1.5, 1.0, 1.0]))


def test_missing_reference_field_is_a_clear_error():
    with pytest.raises(RewardError, match="no field 'answer'"):
        build_source(src(type="f1"))(["q"], ["x"], {"label": [1]})


def test_keyword_length_format():
    kw = build_source(src(type="keyword", words=["a"]))(["", "", ""], ["a b a c", "", "b"], {})
    assert kw.tolist() == [0.5, 0.0, 0.0]
    ln = build_source(src(type="length", target=4))(["", ""], ["one two three four", "one two"], {})
    assert ln.tolist() == [0.0, -0.5]
    fm = build_source(src(type="format", pattern=r"^\d+$"))(["", ""], ["123", "12a"], {})
    assert fm.tolist() == [1.0, 0.0]


def write_module(tmp_path, monkeypatch, body):
    (tmp_path / "my_rewards.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop("my_rewards", None)
    importlib.invalidate_caches()


def test_python_reward_gets_fields_and_kwargs(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "def score(prompts, completions, label, bonus=0.0):\n"
                 "    return [float(len(c)) + l + bonus for c, l in zip(completions, label)]\n")
    fn = build_source(src(type="python", function="my_rewards:score", kwargs={"bonus": 0.5}))
    assert list(fn(["p", "q"], ["ab", "c"], {"label": [1, 2]})) == [3.5, 3.5]


def test_python_reward_from_file_path(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def f(prompts, completions, **_):\n    return [1.0] * len(completions)\n")
    assert list(build_source(src(type="python", function=f"{f}:f"))(["p"], ["c"], {})) == [1.0]


@pytest.mark.parametrize("body, words", [
    ("def f(p, c, **k):\n    raise ValueError('boom')\n", "raised ValueError: boom"),
    ("def f(p, c, **k):\n    return [float('nan')] * len(c)\n", "non-finite score"),
    ("def f(p, c, **k):\n    return [1.0]\n", "returned 1 scores for 2 completions"),
    ("def f(p, c, **k):\n    return 'bad'\n", "list or tensor of floats"),
])
def test_bad_reward_functions_name_the_source(tmp_path, monkeypatch, body, words):
    write_module(tmp_path, monkeypatch, body)
    cfg = RewardConfig(sources=[src(type="sentiment"), src(type="python", function="my_rewards:f")])
    reward = build_reward(cfg)
    with pytest.raises(RewardError) as info:
        reward(["p", "q"], ["good", "bad"], {})
    assert "reward.sources.1 (python: my_rewards:f)" in str(info.value) and words in str(info.value)


def test_unimportable_reward_function(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        build_source(src(type="python", function="no_such_module:f"))
    write_module(tmp_path, monkeypatch, "x = 1\n")
    with pytest.raises(UserError, match="has no function 'g'"):
        build_source(src(type="python", function="my_rewards:g"))


def test_weighted_sum(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "def one(p, c, **k):\n    return [1.0] * len(c)\n"
                 "def two(p, c, **k):\n    return [2.0] * len(c)\n")
    cfg = RewardConfig(sources=[src(type="python", function="my_rewards:one", weight=0.5),
                                src(type="python", function="my_rewards:two", weight=-2.0)])
    assert build_reward(cfg)(["p"], ["c"], {}).tolist() == [0.5 * 1.0 - 2.0 * 2.0]


def test_reward_model_source(tiny_reward_model_dir):
    fn = build_source(src(type="model", path=str(tiny_reward_model_dir)))
    scores = fn(["a b", "c"], [" c d", " e f g h"], {})
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    again = fn(["c"], [" e f g h"], {})  # padding must not change a sequence's score
    assert_close(again[0], scores[1], atol=1e-5, rtol=1e-5)


def test_reward_model_must_be_a_classifier(tiny_model_dir):
    with pytest.raises(UserError, match="is not a sequence-classification"):
        build_source(src(type="model", path=str(tiny_model_dir)))


def test_every_source_option_belongs_to_a_reward_type():
    """The registry and the schema agree: each option of RewardSourceConfig is read by some type, and each
    type's options are fields of RewardSourceConfig (a new type with a new option adds both)."""
    import dataclasses

    from ppo_lm.rewards import COMMON_KEYS, REWARD_TYPES

    fields = {f.name for f in dataclasses.fields(RewardSourceConfig)} - set(COMMON_KEYS)
    claimed = {o for kind in REWARD_TYPES.values() for o in kind.options}
    assert claimed == fields
    assert set(REWARD_TYPES) == set(typing.get_args(typing.get_type_hints(RewardSourceConfig)["type"]))


def test_a_new_reward_type_is_a_class_and_a_registry_line(monkeypatch):
    from ppo_lm import rewards

    class Shouting:
        options = ("words",)

        @staticmethod
        def check(s):
            if len(s.words) != 1:
                yield "words", "needs exactly one word"

        @classmethod
        def from_config(cls, s, *, device=None, key=""):
            return lambda prompts, completions, fields: torch.tensor([float(s.words[0] in c) for c in completions])

    monkeypatch.setitem(rewards.REWARD_TYPES, "shout", Shouting)
    entry = src(type="shout", words=["HEY"])
    assert list(rewards.source_problems(entry, RewardSourceConfig())) == []
    assert list(rewards.source_problems(src(type="shout", words=["a", "b"], target=3), RewardSourceConfig())) == [
        ("target", "is not an option of a 'shout' reward (its options: words)"), ("words", "needs exactly one word")]
    assert build_reward(RewardConfig(sources=[entry]))(["", ""], ["HEY you", "hi"], {}).tolist() == [1.0, 0.0]
