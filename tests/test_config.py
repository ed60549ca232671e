import pytest

from ppo_lm.config import Config, config_from_dict, load_config
from ppo_lm.errors import ConfigError


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """\
model:
  name_or_path: gpt2
data:
  path: hub/prompts
rollout:
  batch_size: 8
ppo:
  lr: 1e-5
  num_minibatches: 2
"""


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), check_paths=False)
    assert isinstance(cfg, Config)
    assert cfg.ppo.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string; it must still become a float
    assert cfg.rollout.batch_size == 8 and cfg.minibatch_size == 4
    assert cfg.ppo.clip_range == 0.2 and cfg.model.trust_remote_code is False


def test_dotted_overrides(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["ppo.lr=3e-4", "rollout.batch_size=16", "train.log_with=[tensorboard]",
                                             "reward.sources.0.weight=2", "model.lora.enabled=true"],
                      check_paths=False)
    assert cfg.ppo.lr == 3e-4 and cfg.rollout.batch_size == 16 and cfg.train.log_with == ["tensorboard"]
    assert cfg.reward.sources[0].weight == 2.0 and cfg.model.lora.enabled is True


def test_round_trip_through_dict():
    cfg = config_from_dict({"model": {"name_or_path": "m"}, "ppo": {"kl": {"coef": 0.2}}})
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("text, field, line, words", [
    (GOOD + "  lr_rate: 1\n", "ppo.lr_rate", 10, "did you mean 'lr'"),
    (GOOD.replace("batch_size: 8", "batch_size: eight"), "rollout.batch_size", 6, "expected an integer"),
    (GOOD.replace("lr: 1e-5", "lr: -0.1"), "ppo.lr", 8, "must be > 0"),
    (GOOD + "  clip_range: 0\n", "ppo.clip_range", 10, "must be > 0"),
    (GOOD + "  value_lr: -1e-3\n", "ppo.value_lr", 10, "must be > 0"),
    (GOOD.replace("batch_size: 8", "batch_size: 9"), "ppo.num_minibatches", 9, "divisible"),
    (GOOD + "  kl: {estimator: k4}\n", "ppo.kl.estimator", 10, "one of k1, k2, k3"),
    (GOOD + "  gamma: 1.5\n", "ppo.gamma", 10, "in [0, 1]"),
    (GOOD + "train:\n  log_with: [tensorbord]\n", "train.log_with", 11, "unknown tracker"),
    (GOOD + "trainer:\n  x: 1\n", "trainer", 10, "did you mean 'train'"),
    (GOOD + "  use_cache: true\n", "ppo.use_cache", 10, "unknown key"),
    (GOOD + "reward:\n  sources:\n    - type: python\n", "reward.sources.0.function", None, "module:function"),
    (GOOD + "reward:\n  sources:\n    - type: length\n      words: [a]\n", "reward.sources.0.words", 13,
     "is not an option of a 'length' reward (its options: target)"),
    (GOOD + "reward:\n  sources:\n    - type: f1\n      completion_only: true\n",
     "reward.sources.0.completion_only", 13, "is not an option of a 'f1' reward (its options: field)"),
    (GOOD + "reward:\n  sources:\n    - type: format\n      pattern: '('\n", "reward.sources.0.pattern", 13,
     "not a valid regular expression"),
    (GOOD + "reward:\n  sources:\n    - type: sentimnt\n", "reward.sources.0.type", 12, "did you mean 'sentiment'"),
])
def test_validation_names_field_and_line(tmp_path, text, field, line, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, check_paths=False)
    message = str(info.value)
    assert field in message and words in message
    if line is not None:
        assert f"{path}:{line}: {field}" in message
    assert "\n" not in message


def test_missing_paths_are_reported(tmp_path):
    path = write(tmp_path, GOOD.replace("gpt2", "./no/such/model"))
    with pytest.raises(ConfigError, match=r"cfg.yaml:2: model.name_or_path: no such file"):
        load_config(path)


def test_yaml_syntax_error_has_line(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml:3"):
        load_config(write(tmp_path, "model:\n  name_or_path: x\n  bad: [1, 2\n"), check_paths=False)


def test_required_model_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="model.name_or_path: is required"):
        config_from_dict({})
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, GOOD), ["ppo.lr"], check_paths=False)
    with pytest.raises(ConfigError, match=r"command line: ppo.lr: expected a number"):
        load_config(write(tmp_path, GOOD), ["ppo.lr=fast"], check_paths=False)


@pytest.mark.parametrize("override, words", [
    ("train.keep_checkpoints=0", "train.keep_checkpoints: must be > 0"),
    ("ppo.max_nonfinite_steps=0", "ppo.max_nonfinite_steps: must be > 0"),
    ("ppo.kl.limit=-1", "ppo.kl.limit: must be > 0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every: must be >= 0"),
    ("train.resume=yes", "train.resume: must be one of never, auto"),
])
def test_reliability_settings_are_range_checked(tmp_path, override, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_config(write(tmp_path, GOOD), [override], check_paths=False)


def test_bare_on_and_off_are_the_words_not_booleans(tmp_path):
    """YAML 1.1 reads `chat_template: on` as True; a field whose choices are on/off takes it as the word."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {path: d.jsonl, chat_template: on}\n"
                    "reward: {sources: [{type: keyword, words: [a]}]}\n")
    assert load_config(path, check_paths=False).data.chat_template == "on"
    assert load_config(path, ["data.chat_template=off"], check_paths=False).data.chat_template == "off"


def test_renamed_kl_keys_still_work_with_a_deprecation_warning(tmp_path):
    """The KL knobs moved under ppo.kl (and target_kl became ppo.early_stop_kl): old configs keep working."""
    from ppo_lm.config import ConfigDeprecationWarning

    path = write(tmp_path, GOOD + "  kl_coef: 0.2\n  target_kl: 0.05\n")
    with pytest.warns(ConfigDeprecationWarning, match=r"cfg.yaml:10: ppo.kl_coef is deprecated; use ppo.kl.coef"):
        cfg = load_config(path, ["ppo.kl_limit=3"], check_paths=False)
    assert (cfg.ppo.kl.coef, cfg.ppo.early_stop_kl, cfg.ppo.kl.limit) == (0.2, 0.05, 3.0)
    with pytest.warns(ConfigDeprecationWarning):
        assert config_from_dict({"model": {"name_or_path": "m"}, "ppo": {"adaptive_kl": True}}).ppo.kl.adaptive
    with pytest.raises(ConfigError, match=r"cfg.yaml:10: ppo.kl_coef: is the old name of ppo.kl.coef"):
        load_config(write(tmp_path, GOOD + "  kl_coef: 0.2\n  kl: {coef: 0.3}\n"), check_paths=False)


def test_empty_reward_sources_only_when_a_pipeline_brings_its_reward_model(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {path: d.jsonl}\nreward:\n  sources: []\n")
    with pytest.raises(ConfigError, match=r"ppo.yaml:4: reward.sources: needs at least one reward source"):
        load_config(path, check_paths=False)
    assert load_config(path, check_paths=False, reward_given=True).reward.sources == []
