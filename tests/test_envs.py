"""Text environments (issue 22): the shipped environments and their scripted optimal players, gymnasium
registration, GAE across turns with hand-computed values, multi-turn episodes in the rollout (masks, rewards,
episodes that end at different times), the config and the command line with a user's own environment, and PPO
learning the number-guessing game on a small model.

Every expected number is arithmetic that can be checked on paper, not a call of the function under test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import gymnasium
import pytest
import torch
from torch.testing import assert_close

import ppo_lm
from ppo_lm import algo, episodes, toy
from ppo_lm.config import config_from_dict, load_config
from ppo_lm.envs import SingleTurn, TextEnv, arithmetic, guess_number, make, word_game
from ppo_lm.errors import ConfigError, UserError
from ppo_lm.trainer import train

from conftest import LEARNING_SEED, prompt_records
from test_cli import ENV

F64 = torch.float64


def t64(data) -> torch.Tensor:
    return torch.tensor(data, dtype=F64)


def play_scripted(env, player, seed: int, max_turns: int = 10, **kwargs) -> tuple[int, float, dict]:
    """Play one episode with a scripted player: (turns, total reward, last info); turns is None if unfinished."""
    observation, _ = env.reset(seed=seed)
    history, total = [], 0.0
    for turn in range(1, max_turns + 1):
        action = player(observation, history, **kwargs)
        reply, reward, terminated, truncated, info = env.step(action)
        total += reward
        history.append((action, reply))
        if terminated or truncated:
            return turn, total, info
    return None, total, info


# ------------------------------------------------------------------------------------- environments


def test_shipped_environments_are_registered_with_gymnasium():
    env = gymnasium.make("ppo_lm/guess-number", high=8)
    observation, info = env.reset(seed=3)
    assert "from 1 to 8" in observation and isinstance(info, dict)
    reply, reward, terminated, truncated, info = env.step("no number here")
    assert (reply, reward, terminated, truncated) == ("Reply with one number from 1 to 8.", 0.0, False, False)
    # the "module:id" form imports ppo_lm first, so a script that never imported it can make them too
    code = "import gymnasium; e = gymnasium.make('ppo_lm:ppo_lm/word-game'); print(e.reset(seed=0)[0][:5])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "Guess", out.stderr
    assert set(ppo_lm.envs.SHIPPED) <= set(gymnasium.registry)


def test_guess_number_replies_and_binary_search_solves_every_secret_within_five_turns():
    env = guess_number.GuessNumber(low=1, high=16)
    env.reset(seed=0)
    env.secret = 11
    assert env.step("I say 4, then 9")[:3] == ("higher.", 0.0, False)  # the first number counts
    assert env.step("13")[:3] == ("lower.", 0.0, False)
    assert env.step("11")[1:3] == (1.0, True)
    most = 0
    for seed in range(300):
        turns, total, info = play_scripted(guess_number.GuessNumber(), guess_number.optimal_player, seed)
        assert total == 1.0 and info["success"], seed
        most = max(most, turns)
    assert most == 5  # ceil(log2(17)): binary search over 1..16 never needs more, and some secret needs all 5
    penalised = guess_number.GuessNumber(turn_penalty=0.1)
    turns, total, _ = play_scripted(penalised, guess_number.optimal_player, 0)
    assert total == pytest.approx(1.0 - 0.1 * turns)


def test_arithmetic_calculator_reads_only_arithmetic_and_the_scripted_player_solves_in_two_turns():
    assert arithmetic.calculate("12 * (3 + 4) - 5") == 79
    assert arithmetic.calculate("-3 * -3") == 9
    for bad in ("__import__('os')", "2 ** 10", "7 / 2", "1e3", "x + 1", "9" * 13 + " * 9" * 3):
        with pytest.raises(ValueError):
            arithmetic.calculate(bad)
    env = arithmetic.Arithmetic(digits=2)
    observation, info = env.reset(seed=5)
    value = arithmetic.calculate(info["question"])
    assert env.step("calc : 2 * 21")[:3] == ("= 42", 0.0, False)
    assert env.step("hmm")[0] == "Reply answer: NUMBER, or calc: EXPRESSION."
    assert env.step("calc: 2 ** 3")[0].startswith("The calculator cannot read that")
    assert env.step(f"answer : {value + 1}")[1:] == (0.0, True, False, {"success": False})
    env.reset(seed=5)
    assert env.step(f"The answer: {value}")[1:] == (1.0, True, False, {"success": True})
    for seed in range(100):
        assert play_scripted(arithmetic.Arithmetic(), arithmetic.optimal_player, seed)[:2] == (2, 1.0)
    lenient = arithmetic.Arithmetic(strict=False)
    lenient.reset(seed=5)
    assert lenient.step(f"{info['question']} = {value}.")[1:3] == (1.0, True)
    lenient.reset(seed=5)
    assert lenient.step("calc: 2 * 21")[0] == "= 42"  # the calculator still works
    assert lenient.step("no idea")[0] == "Reply answer: NUMBER, or calc: EXPRESSION."


def test_word_game_marks_letters_like_the_five_letter_game_and_the_solver_finds_every_word():
    # hand-checked: secret "bell", guess "lobe": l elsewhere, o absent, b elsewhere, e elsewhere
    assert word_game.feedback("lobe", "bell") == "? - ? ?"
    # a letter guessed twice but once in the secret: the right-place one is +, the other - (not ?)
    assert word_game.feedback("noon", "moon") == "- + + +"
    assert word_game.feedback("oops", "moon") == "? + - -"
    assert word_game.feedback("bell", "bell") == "+ + + +"
    env = word_game.WordGame(words=["bell", "cold"])
    env.reset(seed=0)
    env.secret = "bell"
    assert env.step("I think: lobe")[0] == "lobe: ? - ? ?"
    assert env.step("Bell")[1:3] == (1.0, True)
    most = 0
    for seed in range(400):  # every word of the list is drawn within these seeds
        turns, total, _ = play_scripted(word_game.WordGame(), word_game.optimal_player, seed)
        assert total == 1.0, seed
        most = max(most, turns)
    assert most <= 6


def test_single_turn_is_the_one_step_case_with_the_reward_sources():
    env = make("ppo_lm/single-turn", {"records": [{"prompt": "p0", "answer": "x"}, {"prompt": "p1", "answer": "y"}],
                                      "reward": {"sources": [{"type": "exact_match"}]}})
    assert env.reset(seed=3)[0] == "p1"
    reply, reward, terminated, truncated, _ = env.step("y")
    assert (reward, terminated, truncated) == (1.0, True, False)
    env.reset(seed=2)
    assert env.step("y")[1] == 0.0
    other = SingleTurn(records=[{"prompt": "p"}], reward={"sources": [{"type": "exact_match"}]})
    assert other.reward_fn is env.unwrapped.reward_fn  # one reward per process, not one per environment


def test_make_names_the_field_for_unknown_or_bad_environments(tmp_path):
    with pytest.raises(UserError, match="did you mean 'ppo_lm/guess-number'") as e:
        make("ppo_lm/guess-numbr")
    assert e.value.where == "env.id"
    with pytest.raises(UserError, match="cannot make the environment with env.kwargs"):
        make("ppo_lm/guess-number", {"hihg": 3})
    with pytest.raises(UserError, match="no such file"):
        make(f"{tmp_path}/none.py:Env")
    with pytest.raises(UserError, match="must be above low"):  # the environment's own ValueError, as one line
        make("ppo_lm/guess-number", {"low": 5, "high": 2})
    assert make("ppo_lm:ppo_lm/word-game").reset(seed=0)[0].startswith("Guess")  # gymnasium's module:id form


# ---------------------------------------------------------------------------------- GAE across turns


def test_gae_skips_the_environment_tokens_between_turns():
    # tokens: a1 a2 | e e | a3 (pad); rewards 0, 1 (end of turn 1), -, -, 2 (end of episode); gamma 1, lambda 1
    mask = torch.tensor([[1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    rewards = t64([[0.0, 1.0, 9.0, 9.0, 2.0, 9.0]])  # the 9s sit on masked positions and must not count
    values = t64([[0.5, 1.5, 7.0, 7.0, 1.0, 7.0]])
    adv, ret = algo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # returns-to-go over the real tokens: 3, 3, 2; advantages = returns - values
    assert_close(ret, t64([[3.0, 3.0, 0, 0, 2.0, 0]]))
    assert_close(adv, t64([[2.5, 1.5, 0, 0, 1.0, 0]]))
    # gamma 0.5, lambda 0.5, by hand from the last real token back:
    #   a3: delta = 2 - 1 = 1                         -> A = 1
    #   a2: delta = 1 + 0.5 * V(a3) - 1.5 = 0         -> A = 0 + 0.25 * 1 = 0.25
    #   a1: delta = 0 + 0.5 * V(a2) - 0.5 = 0.25      -> A = 0.25 + 0.25 * 0.25 = 0.3125
    adv, ret = algo.gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert_close(adv, t64([[0.3125, 0.25, 0, 0, 1.0, 0]]))
    assert_close(ret, t64([[0.8125, 1.75, 0, 0, 2.0, 0]]))
    # the same episode without its environment tokens gives the same numbers
    adv2, _ = algo.gae(t64([[0.0, 1.0, 2.0]]), t64([[0.5, 1.5, 1.0]]), torch.ones(1, 3, dtype=torch.bool), 0.5, 0.5)
    assert_close(adv2, t64([[0.3125, 0.25, 1.0]]))


def test_returns_to_go_and_the_last_token_score_skip_the_holes():
    mask = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    # gamma 0.5 over the real tokens of row 0 (rewards 1, 2, 4): 1 + 0.5 * (2 + 0.5 * 4) = 3, 2 + 0.5 * 4 = 4, 4
    assert_close(algo.returns_to_go(t64([[1, 8, 2, 4, 8], [1, 1, 0, 0, 0]]), mask, 0.5),
                 t64([[3, 0, 4, 4, 0], [1.5, 1, 0, 0, 0]]))
    # the sequence score lands on the last real token (index 3 and 1), not at "length - 1" (index 2 for row 0)
    assert_close(algo.per_token_rewards(t64([5, 7]), torch.zeros(2, 5, dtype=F64), mask, 0.1),
                 t64([[0, 0, 0, 5, 0], [0, 7, 0, 0, 0]]))


# ------------------------------------------------------------------------------------ episodes


class Countdown(TextEnv):
    """Ends after ``seed % 3 + 1`` turns; reward 1 per turn, 10 at the end; replies "d e"; says success only at
    the end."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.left, self.actions = seed % 3 + 1, []
        return "a b c", {}

    def step(self, action):
        self.actions.append(action)
        self.left -= 1
        done = self.left == 0
        return "d e", 10.0 if done else 1.0, done, False, {"success": True} if done else {}


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    tok = toy.word_tokenizer("a b c d e f g h".split())
    model = toy.gpt2(tok, n_layer=1, n_embd=16, n_head=2, n_positions=128, seed=0)
    return toy.save_model(model, tok, tmp_path_factory.mktemp("words") / "m")


def env_config(model_dir, out, **sections):
    base = {"model": {"name_or_path": str(model_dir)}, "env": {"max_turns": 4, "max_tokens": 60},
            "rollout": {"batch_size": 6, "max_new_tokens": 3}, "ppo": {"lr": 1e-3, "num_minibatches": 2},
            "train": {"output_dir": str(out), "iterations": 2, "progress": False, "log_samples": 0,
                      "save_final": False}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return config_from_dict(base)


def test_episodes_of_different_lengths_in_one_rollout(word_model, tmp_path):
    from ppo_lm.models import load_policy, load_tokenizer, make_reference

    cfg = env_config(word_model, tmp_path)
    tokenizer = load_tokenizer(str(word_model))
    policy = load_policy(cfg.model, value_head=True)
    envs = [Countdown() for _ in range(6)]
    seeds = [0, 1, 2, 3, 4, 5]  # 1, 2, 3, 1, 2, 3 turns
    torch.manual_seed(0)
    r = episodes.collect(policy, make_reference(policy), tokenizer, envs, seeds, cfg, chat=False,
                         max_prompt_tokens=50, device="cpu", forward_batch_size=6)
    assert r.fields["turns"] == [1, 2, 3, 1, 2, 3] and all(r.fields["success"])
    assert [len(e.actions) for e in envs] == [1, 2, 3, 1, 2, 3]
    reply = tokenizer("\nd e\n", add_special_tokens=False)["input_ids"]  # what goes between two turns
    assert len(reply) == 2
    for b, turns in enumerate([1, 2, 3, 1, 2, 3]):
        actions, context = r.response_mask[b], r.context_mask[b]
        n = int(context.sum())
        assert context[:n].all() and not context[n:].any()  # real tokens first, then padding
        assert not (actions & ~context).any()
        env_positions = (context & ~actions).nonzero().flatten().tolist()
        assert len(env_positions) == 2 * (turns - 1)  # one reply of 2 tokens between turns
        for start in env_positions[::2]:
            assert r.response_ids[b, start:start + 2].tolist() == reply
        # a reward at each turn's last action token: 1 per turn and 10 at the end, summing to the return
        rewarded = r.turn_rewards[b].nonzero().flatten().tolist()
        assert len(rewarded) == turns and all(actions[p] and (p + 1 == n or not actions[p + 1]) for p in rewarded)
        assert r.turn_rewards[b].sum().item() == 10.0 + (turns - 1)
        assert r.logprobs[b][~actions].abs().sum() == 0 and r.values[b][~actions].abs().sum() == 0
    # the teacher-forced forward sees each turn as it was sampled: its logprobs are the sampler's (temperature 1)
    assert_close(r.logprobs, r.sampling_logprobs, atol=1e-5, rtol=0)


def test_limits_end_episodes_the_environment_would_continue(word_model, tmp_path):
    from ppo_lm.models import load_causal_lm, load_tokenizer

    tokenizer, lm = load_tokenizer(str(word_model)), load_causal_lm(str(word_model))
    cfg = env_config(word_model, tmp_path, env={"max_turns": 2})
    played = episodes.play(lm, tokenizer, [Countdown() for _ in range(3)], [0, 5, 8], cfg, chat=False,
                           max_prompt_tokens=50)
    assert [e.turns for e in played] == [1, 2, 2] and [e.terminated for e in played] == [True, False, False]
    # Countdown says success only at its end: the two episodes cut off at 2 turns count as failures
    assert [e.success for e in played] == [True, None, None]
    assert episodes.summary(played)["success_rate"] == pytest.approx(1 / 3)
    # max_tokens 8: after a first turn of up to 3 tokens and a reply of 2 there is no room for 3 more
    cfg = env_config(word_model, tmp_path, env={"max_tokens": 7})
    played = episodes.play(lm, tokenizer, [Countdown() for _ in range(3)], [2, 5, 8], cfg, chat=False,
                           max_prompt_tokens=50)
    assert all(len(e.tokens) <= 7 for e in played)


def test_chat_template_replies_close_the_turn_and_open_the_next(word_model):
    from ppo_lm.models import load_tokenizer

    tokenizer = load_tokenizer(str(word_model))
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}<eos>\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    template = episodes.reply_template(tokenizer, chat=True)
    assert template == ("<eos>\n<user>", "<eos>\n<assistant>")
    # a turn that ended with its stop token does not get a second one; a turn cut off by the token limit does
    assert episodes.reply_text(template, "hi", "<eos>") == "\n<user>hi<eos>\n<assistant>"
    assert episodes.reply_text(template, "hi", None) == "<eos>\n<user>hi<eos>\n<assistant>"
    assert episodes.reply_text(template, "hi", "<end_of_turn>") == "<eos>\n<user>hi<eos>\n<assistant>"
    assert episodes.reply_template(tokenizer, chat=False) == ("\n", "\n")


# ------------------------------------------------------------------------------- config and commands


def test_env_config_checks():
    base = {"model": {"name_or_path": "m"}, "env": {"id": "ppo_lm/guess-number"}}
    cfg = config_from_dict(base)
    assert cfg.env.max_turns == 6 and cfg.env.kwargs == {}
    for section, key, value, message in [("reward", "normalize", True, "not used with env"),
                                         ("rollout", "missing_eos_penalty", -1.0, "not used with env"),
                                         ("env", "max_tokens", 8, "leaves no room for one turn"),
                                         ("env", "seeds", 2 * 10 ** 7, "at most 10000000")]:
        with pytest.raises(ConfigError, match=message) as e:
            config_from_dict({**base, section: {**base.get(section, {}), key: value}})
        assert f"{section}.{key}" in str(e.value)
    with pytest.raises(ConfigError, match="unknown eval metric"):
        config_from_dict({**base, "train": {"eval_every": 2}, "eval": {"best_metric": "f1"}})
    config_from_dict({**base, "train": {"eval_every": 2}, "eval": {"best_metric": "success_rate"}})
    # an environment passed to train(cfg, env=...) instead of env.id: the same checks, when told
    without_id = {"model": {"name_or_path": "m"}, "train": {"eval_every": 2}, "eval": {"best_metric": "success_rate"}}
    with pytest.raises(ConfigError, match="eval.data"):
        config_from_dict(without_id)
    config_from_dict(without_id, env_given=True)
    with pytest.raises(ConfigError, match="reward.normalize"):
        config_from_dict({**without_id, "reward": {"normalize": True}}, env_given=True)


USER_ENV = '''
from ppo_lm.envs import TextEnv


class Parrot(TextEnv):
    """Say the word it asks for; two rounds."""

    WORDS = ["a", "b", "c"]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.round = 0
        self.word = self.WORDS[seed % 3]
        return f"say {self.word}", {}

    def step(self, action):
        self.round += 1
        reward = float(self.word in action.split())
        self.word = self.WORDS[(self.WORDS.index(self.word) + 1) % 3]
        return f"say {self.word}", reward, self.round == 2, False, {"success": reward > 0}
'''


def parrot_config(tmp_path, model_dir, *, batch_size: int, train_extra: str = ""):
    """A config file training USER_ENV's Parrot, written as a user would, from a file of their own."""
    (tmp_path / "parrot.py").write_text(USER_ENV)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""model: {{name_or_path: {model_dir}}}
env: {{id: {tmp_path / 'parrot.py'}:Parrot, max_turns: 3, max_tokens: 40, eval_episodes: 6}}
rollout: {{batch_size: {batch_size}, max_new_tokens: 3}}
ppo: {{lr: 1.0e-3, num_minibatches: 2}}
train: {{output_dir: {tmp_path / 'run'}, iterations: 2, progress: false, eval_every: 2, log_samples: 2{train_extra}}}
""")
    return cfg


def test_a_users_environment_file_trains_from_the_command_line_and_evaluates(word_model, tmp_path):
    cfg = parrot_config(tmp_path, word_model, batch_size=8)
    from test_cli import ppo_lm as cli

    out = cli("train", cfg)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["turns_mean"] == 2.0
    assert 0.0 <= rows[-1]["success_rate"] <= 1.0 and "eval/success_rate" in rows[-1]
    sample = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("say ") and "\n> say " in sample["completion"]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    out = cli("eval", cfg, "--model", tmp_path / "run" / "final", "--output-dir", tmp_path / "ev")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["samples"] == 6 and set(result) >= {"success_rate", "return_mean", "turns_mean"}


def test_bad_environment_is_one_line_and_exit_2_before_any_model_loads(word_model, tmp_path):
    from test_cli import ppo_lm as cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""model: {{name_or_path: {word_model}}}
env: {{id: ppo_lm/guess-numbr}}
train: {{output_dir: {tmp_path / 'run'}}}
""")
    out = cli("train", cfg)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "env.id" in out.stderr and "did you mean 'ppo_lm/guess-number'" in out.stderr
    assert not (tmp_path / "run").exists()
    # a first observation that does not fit beside env.max_tokens in the model's 128 positions: refused before
    # the models load, naming the setting that leaves too little room
    (tmp_path / "long.py").write_text(USER_ENV.replace('return f"say {self.word}", {}',
                                                       'return "say " + "a " * 100 + self.word, {}'))
    cfg.write_text(f"""model: {{name_or_path: {word_model}}}
env: {{id: {tmp_path / 'long.py'}:Parrot, max_tokens: 60}}
rollout: {{max_new_tokens: 4}}
train: {{output_dir: {tmp_path / 'run'}}}
""")
    out = cli("train", cfg)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "env.max_tokens" in out.stderr and "102 tokens, more than the 68" in out.stderr
    assert not (tmp_path / "run").exists()


def test_library_api_takes_an_environment_class(word_model, tmp_path):
    cfg = env_config(word_model, tmp_path / "run")
    result = train(cfg, env=Countdown)
    assert [m["iteration"] for m in result.metrics] == [1, 2]
    assert result.metrics[-1]["success_rate"] == 1.0
    assert result.metrics[-1]["reward_mean"] >= 10.0  # every episode ends with its 10


def test_dr_grpo_over_episodes_divides_by_the_episodes_budget(word_model, tmp_path, monkeypatch):
    """Dr. GRPO's constant over an environment's episodes is their turns' budget (4 turns x 3 tokens), not one
    turn's max_new_tokens: an episode's response holds every turn the policy wrote."""
    from ppo_lm import algo

    seen = []
    real = algo.aggregate
    monkeypatch.setattr(algo, "aggregate", lambda *a, **k: seen.append(k.get("norm")) or real(*a, **k))
    cfg = env_config(word_model, tmp_path / "run", ppo={"advantage_estimator": "dr_grpo"},
                     rollout={"samples_per_prompt": 2}, train={"iterations": 1})
    train(cfg, env=Countdown)
    assert seen and set(seen) == {12}


def test_an_interrupted_environment_run_resumes_exactly(word_model, tmp_path):
    """3 iterations straight, against 2 iterations, a checkpoint, and a resumed third: the same metrics (the
    seeds of the episodes come from the prompt sampler's state, the sampling from the restored random streams)."""
    from conftest import without_timing

    straight = train(env_config(word_model, tmp_path / "a", train={"iterations": 3}), env=Countdown).metrics
    train(env_config(word_model, tmp_path / "b", train={"iterations": 2, "checkpoint_every": 2}), env=Countdown)
    resumed = train(env_config(word_model, tmp_path / "b", train={"iterations": 3, "resume": "auto"}), env=Countdown)
    assert [m["iteration"] for m in resumed.metrics] == [1, 2, 3]
    assert without_timing(resumed.metrics) == without_timing(straight)


def test_single_turn_environment_trains_like_prompts(tiny_model_dir, tmp_path):
    records = prompt_records(8)
    cfg = config_from_dict({"model": {"name_or_path": str(tiny_model_dir)},
                            "env": {"id": "ppo_lm/single-turn", "max_turns": 1, "max_tokens": 8,
                                    "kwargs": {"records": records, "reward": {"sources": [
                                        {"type": "keyword", "words": ["a"]}]}}},
                            "rollout": {"batch_size": 8, "max_new_tokens": 8}, "ppo": {"num_minibatches": 2},
                            "train": {"output_dir": str(tmp_path / "run"), "iterations": 2, "progress": False,
                                      "log_samples": 0, "save_final": False}})
    result = train(cfg)
    assert all(m["turns_mean"] == 1.0 for m in result.metrics)


# ---------------------------------------------------------------------------------------------- learning

def env_results():
    """scripts/env_results.py, which measures the same configuration over seeds for docs/envs.md."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "env_results.py"
    spec = importlib.util.spec_from_file_location("env_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.learning
@pytest.mark.slow
def test_ppo_learns_to_guess_the_number_on_a_small_model(tmp_path, learned):
    """ppo_lm/guess-number over 1..8 with 6 turns, a random-init 2-layer GPT-2 (64 wide) over the game's words,
    one token per turn, 200 iterations of 64 episodes (about 35 s; scripts/env_results.py's configuration). The
    training reward is the success rate; the rise is from its mean over the first 20 iterations to that over the
    last 20. Measured (2026-12-06, seeds 0-4 x ATEN_CPU_CAPABILITY avx512/avx2/default on a 2-core x86_64;
    scripts/learning_spread.py -k guess re-runs it): rises 0.300 0.451 0.225 0.565 0.479 / 0.490 0.458 0.575
    0.446 0.543 / 0.444 0.452 0.171 0.459 0.523, lowest 0.171, mean 0.439; the bar, 0.1, is 60% of the lowest,
    as for the other learning tests. Greedy held-out success after training: 0.19 to 1.0 by seed."""
    results = env_results()
    model_dir = results.build_model(tmp_path / "model")
    result = train(results.config(model_dir, tmp_path / "run", LEARNING_SEED))
    rewards = [m["reward_mean"] for m in result.metrics]
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    evals = [m["eval/success_rate"] for m in result.metrics if "eval/success_rate" in m]
    learned(last - first, 0.1, {"first": first, "last": last, "eval": evals})
    turns = [m["turns_mean"] for m in result.metrics]
    assert sum(turns[-20:]) < sum(turns[:20])  # found sooner, too


def test_two_processes_play_their_own_episodes_and_write_one_set_of_files(word_model, tmp_path):
    """Under torchrun (2 processes, gloo): each process plays its share of the episodes; the metrics and the
    held-out evaluation are over both, written once."""
    from test_distributed import torchrun

    cfg = parrot_config(tmp_path, word_model, batch_size=4, train_extra=", save_final: false")
    done = torchrun("-m", "ppo_lm.cli", "train", cfg, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[-1]["samples_seen"] == 2 * 4 * 2 and rows[-1]["turns_mean"] == 2.0
    # 6 held-out episodes, 3 a process: a success rate in sixths
    assert round(rows[-1]["eval/success_rate"] * 6, 6) == round(rows[-1]["eval/success_rate"] * 6)


WORD_GAME_WORDS = ["bell", "cold", "gate", "moon"]


@pytest.mark.learning
@pytest.mark.slow
def test_ppo_learns_the_word_game_on_a_small_model(tmp_path, learned):
    """ppo_lm/word-game with 4 secret words and 4 turns, a random-init 2-layer GPT-2 (64 wide) over the game's
    words, one token per turn, 200 iterations of 64 episodes (about 40 s). Guessing listed words at random finds
    the secret within 4 turns 68% of the time; the letter feedback is needed beyond that. The rise is that of
    the training success from the first 20 iterations to the last 20. Measured (2026-12-06, seeds 0-4 x
    ATEN_CPU_CAPABILITY avx512/avx2/default on a 2-core x86_64; scripts/learning_spread.py -k word re-runs it):
    rises 0.438 0.603 0.262 0.529 0.508 / 0.254 0.277 0.258 0.520 0.456 / 0.554 0.387 0.286 0.433 0.259, lowest
    0.254, mean 0.402; the bar, 0.15, is 60% of the lowest."""
    words = WORD_GAME_WORDS + ("Guess my secret four-letter word . For each letter I answer + ( right place ) , ? "
                               "elsewhere in the or - not in it Reply with one Correct ! :").split()
    tok = toy.word_tokenizer(words)
    model_dir = toy.save_model(toy.gpt2(tok, n_layer=2, n_embd=64, n_head=2, n_positions=160, seed=0), tok,
                               tmp_path / "model")
    cfg = config_from_dict({"model": {"name_or_path": str(model_dir)},
                            "env": {"id": "ppo_lm/word-game", "kwargs": {"words": WORD_GAME_WORDS}, "max_turns": 4,
                                    "max_tokens": 96, "eval_episodes": 64},
                            "rollout": {"batch_size": 64, "max_new_tokens": 1},
                            "ppo": {"lr": 3e-3, "num_minibatches": 2, "kl": {"coef": 0.01}},
                            "train": {"output_dir": str(tmp_path / "run"), "iterations": 200, "eval_every": 50,
                                      "progress": False, "log_samples": 0, "save_final": False,
                                      "seed": LEARNING_SEED}})
    result = train(cfg)
    rewards = [m["reward_mean"] for m in result.metrics]
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    evals = [m["eval/success_rate"] for m in result.metrics if "eval/success_rate" in m]
    learned(last - first, 0.15, {"first": first, "last": last, "eval": evals})
