import pytest
import torch
from torch.testing import assert_close

from ppo_lm import algo
from ppo_lm.models import load_policy, load_tokenizer, make_reference, position_ids_from_mask
from ppo_lm.rollout import collect, left_pad, response_mask_from_ids

from conftest import prompt_records, tiny_config


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_response_mask_includes_first_eos_only():
    eos = 1
    ids = torch.tensor([[4, 1, 5, 1], [4, 5, 6, 7], [1, 4, 4, 4]])
    mask, ended = response_mask_from_ids(ids, eos)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    assert ended.tolist() == [True, False, True]
    mask, ended = response_mask_from_ids(ids, None)  # stop_at_eos off: every token is real
    assert mask.all() and not ended.any()
    mask, ended = response_mask_from_ids(ids, [7, 5])  # several stop tokens: the first of any ends the response
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False], [True, True, True, True]]
    assert ended.tolist() == [True, True, False]


def test_stop_tokens_are_the_tokenizers_eos_and_the_models_own():
    from types import SimpleNamespace

    from ppo_lm.rollout import stop_token_ids

    tok = SimpleNamespace(eos_token_id=2)
    lm = torch.nn.Module()
    lm.generation_config = SimpleNamespace(eos_token_id=[2, 0, 9])  # a chat model: end of turn, end of text
    assert stop_token_ids(tok, lm) == [2, 0, 9]
    lm.generation_config = SimpleNamespace(eos_token_id=None)
    assert stop_token_ids(tok, lm) == [2] == stop_token_ids(tok)


def _rollout(model_dir, tmp_path, temperature=1.0, n=8):
    cfg = tiny_config(model_dir, tmp_path, rollout={"batch_size": n, "max_new_tokens": 6, "temperature": temperature})
    tok = load_tokenizer(str(model_dir))
    policy = load_policy(cfg.model)
    ref = make_reference(policy)
    recs = prompt_records(n)
    prompts = [r["prompt"] for r in recs]
    ids = [tok(p)["input_ids"] for p in prompts]
    torch.manual_seed(0)
    r = collect(policy, ref, tok, ids, prompts, {}, cfg.rollout, device=torch.device("cpu"), forward_batch_size=4)
    return r, policy, ref, tok


def test_collect_shapes_masks_and_padding(tiny_model_dir, tmp_path):
    r, policy, ref, tok = _rollout(tiny_model_dir, tmp_path)
    B, T = r.response_ids.shape
    assert B == 8 and T <= 6
    for t in (r.logprobs, r.ref_logprobs, r.values, r.entropy):
        assert t.shape == (B, T)
        assert (t[~r.response_mask] == 0).all()  # nothing leaks past EOS
    assert (r.response_ids[~r.response_mask] == tok.pad_token_id).all()
    assert r.prompt_mask[:, -1].all()  # left padding: the last prompt column is always real
    # policy and reference are identical before training
    assert_close(r.logprobs, r.ref_logprobs)
    assert len(r.completions) == B


def test_logprobs_use_sampling_temperature(tiny_model_dir, tmp_path):
    r, policy, _, _ = _rollout(tiny_model_dir, tmp_path, temperature=0.7)
    ids, mask = r.input_ids, r.attention_mask.long()
    T = r.response_ids.shape[1]
    with torch.no_grad():
        logits = policy.lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    expected = torch.log_softmax(logits[:, -T - 1:-1] / 0.7, -1).gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
    assert_close(r.logprobs, expected * r.response_mask, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", [{}, {"critic": "policy"}, {"lora": {"enabled": True}}],
                         ids=["shared-trunk", "critic", "lora"])
def test_recorded_while_sampling_equals_a_teacher_forced_forward(tiny_model_dir, tmp_path, model):
    """Logprobs, entropies and values recorded during generation (with a temperature, top-k, top-p, EOS stops and
    chunks of unequal length) are those of one teacher-forced forward over the finished sequences."""
    import dataclasses

    cfg = tiny_config(tiny_model_dir, tmp_path, model=model, rollout={
        "batch_size": 10, "max_new_tokens": 12, "temperature": 0.7, "top_k": 20, "top_p": 0.95,
        "generation_batch_size": 4})
    tok = load_tokenizer(str(tiny_model_dir))
    policy = load_policy(cfg.model)
    torch.manual_seed(1)
    torch.nn.init.normal_(policy.value_head.summary.weight)  # a fresh value head is zero: make values say something
    ref = make_reference(policy)
    prompts = [r["prompt"] for r in prompt_records(10)]
    ids = [tok(p)["input_ids"] for p in prompts]
    out = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        out[recompute] = collect(policy, ref, tok, ids, prompts, {},
                                 dataclasses.replace(cfg.rollout, recompute_logprobs=recompute),
                                 device=torch.device("cpu"), forward_batch_size=3)
    recorded, recomputed = out[False], out[True]
    assert torch.equal(recorded.response_ids, recomputed.response_ids)  # recording draws no random numbers
    assert not recorded.response_mask.all() and recorded.response_mask.any(-1).all()  # some rows stopped early
    for name in ("logprobs", "entropy", "values", "ref_logprobs"):
        assert getattr(recorded, name).abs().sum() > 0, name
        assert_close(getattr(recorded, name), getattr(recomputed, name), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("model, value_head, keeps", [({}, True, True), ({"critic": "policy"}, True, False),
                                                     ({}, False, False)],
                         ids=["shared-trunk", "critic", "critic-free"])
def test_hidden_states_are_recorded_only_for_a_value_head_on_the_trunk(tiny_model_dir, tmp_path, monkeypatch,
                                                                        model, value_head, keeps):
    """A separate critic reads its own trunk and a critic-free estimator reads none: keeping ``[B, T, H]`` hidden
    states for them would only cost memory (gigabytes for a 7B model's long rollouts)."""
    from ppo_lm import rollout

    kept = []
    real = rollout.StepRecorder.result
    monkeypatch.setattr(rollout.StepRecorder, "result", lambda self: kept.append(real(self)) or kept[-1])
    cfg = tiny_config(tiny_model_dir, tmp_path, model=model, rollout={"batch_size": 4, "max_new_tokens": 5})
    tok = load_tokenizer(str(tiny_model_dir))
    policy = load_policy(cfg.model, value_head=value_head)
    assert policy.reads_hidden_states == keeps
    prompts = [r["prompt"] for r in prompt_records(4)]
    torch.manual_seed(0)
    r = collect(policy, make_reference(policy), tok, [tok(p)["input_ids"] for p in prompts], prompts, {}, cfg.rollout,
                device=torch.device("cpu"), forward_batch_size=4)
    assert kept and all(len(k) == (3 if keeps else 2) for k in kept)  # logprobs, entropies (, hidden states)
    assert r.logprobs.abs().sum() > 0
    if not value_head:
        assert (r.values == 0).all()


def test_the_models_own_logit_settings_do_not_reach_sampling(tiny_model_dir):
    """generation_config.json settings that reshape the logits (suppress_tokens, repetition_penalty, ...) would make
    the rollout sample from another distribution than the loss evaluates: they are hidden while sampling, and the
    model keeps them."""
    from transformers import AutoModelForCausalLM

    from ppo_lm.config import RolloutConfig
    from ppo_lm.rollout import generation_config, sample

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lm.generation_config.suppress_tokens = list(range(3, lm.config.vocab_size))  # all but tokens 0, 1, 2
    lm.generation_config.repetition_penalty = 50.0
    tok = load_tokenizer(str(tiny_model_dir))
    gen = generation_config(tok, RolloutConfig(max_new_tokens=8, stop_at_eos=False, top_k=0, top_p=1.0))
    ids, mask = left_pad([[5, 6]] * 4, tok.pad_token_id)
    torch.manual_seed(0)
    drawn = sample(lm, ids, mask, gen, None).ids
    assert (drawn >= 3).float().mean() > 0.5  # suppress_tokens would leave only 0, 1 and 2
    assert lm.generation_config.suppress_tokens[0] == 3 and lm.generation_config.repetition_penalty == 50.0


def test_first_update_step_sees_ratio_one(tiny_model_dir, tmp_path):
    """The trimmed minibatch forward of the update reproduces the rollout's logprobs: the ratio starts at 1."""
    from accelerate import Accelerator

    from ppo_lm.trainer import TrainState, advantages, minibatch, score, shape
    from ppo_lm.data import PromptSampler
    from ppo_lm.rewards import build_reward

    r, policy, _, _ = _rollout(tiny_model_dir, tmp_path)
    cfg = tiny_config(tiny_model_dir, tmp_path)
    state = TrainState(iteration=1, sampler=PromptSampler(8, seed=0), kl_controller=algo.FixedKLController(0.1))
    acc = Accelerator(cpu=True)
    raw = score(r, build_reward(cfg.reward), acc)
    scored = advantages(r, raw, shape(r, raw, state, cfg, acc), state.kl_controller.value, cfg.ppo)
    b = minibatch(scored, torch.tensor([1, 5, 6]))
    with torch.no_grad():
        logits, values = policy(b["input_ids"], b["attention_mask"], b["n_response"])
    logp = algo.logprobs_from_logits(logits, b["tokens"])
    m = b["response_mask"]
    assert_close(logp * m, b["old_logprobs"], atol=1e-5, rtol=1e-5)
    assert_close(values * m, b["old_values"], atol=1e-5, rtol=1e-5)


def test_inverse_cdf_sampler_draws_from_the_softmax():
    from ppo_lm.rollout import InverseCDFSampler

    probs = torch.tensor([0.2, 0.5, 0.3, 0.0])
    scores = probs.log().expand(40000, 4).clone()  # log 0 = -inf: a token that must never be drawn
    torch.manual_seed(0)
    out = InverseCDFSampler()(None, scores)
    assert torch.isfinite(out).sum(-1).eq(1).all()  # exactly one token left per row ...
    token = out.argmax(-1)
    assert out.gather(-1, token[:, None]).eq(0).all()  # ... with score 0, so greedy decoding picks it
    freq = torch.bincount(token, minlength=4).float() / len(token)
    # standard error of a frequency near 0.5 over 40000 draws is 0.0025: 0.01 is four of them
    assert_close(freq, probs, atol=0.01, rtol=0)
    assert freq[3] == 0


def test_sampling_settings_become_transformers_warpers_then_the_sampler():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from ppo_lm.config import RolloutConfig
    from ppo_lm.rollout import InverseCDFSampler, generation_config

    class Tok:
        eos_token_id, pad_token_id, bos_token_id = 2, 0, 1

    config, processors = generation_config(Tok, RolloutConfig(temperature=0.7, top_k=5, top_p=0.9))
    assert config.do_sample is False and config.eos_token_id == 2  # greedy over the sampler's one finite token
    assert [type(p) for p in processors] == [TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                                             InverseCDFSampler]
    _, plain = generation_config(Tok, RolloutConfig(temperature=1.0, top_k=0, top_p=1.0))
    assert [type(p) for p in plain] == [InverseCDFSampler]
    _, greedy = generation_config(Tok, RolloutConfig(temperature=0.7, top_k=5), greedy=True)
    assert len(greedy) == 0
    # top-k 1 leaves one token: the sampler must return it whatever the uniform draw
    warped = TopKLogitsWarper(1)(None, torch.tensor([[0.1, 3.0, 0.2]]))
    assert InverseCDFSampler()(None, warped).argmax(-1).item() == 1


def test_the_models_own_generation_defaults_do_not_change_sampling(tiny_model_dir):
    """A checkpoint that ships do_sample/top_k=1 defaults must not turn rollouts greedy: the config decides."""
    from transformers import AutoModelForCausalLM

    from ppo_lm.config import RolloutConfig
    from ppo_lm.rollout import generation_config, sample

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lm.generation_config.do_sample, lm.generation_config.top_k, lm.generation_config.temperature = True, 1, 0.3
    tok = load_tokenizer(str(tiny_model_dir))
    gen = generation_config(tok, RolloutConfig(max_new_tokens=8, stop_at_eos=False, top_k=0, top_p=1.0))
    ids, mask = left_pad([[5, 6]] * 4, tok.pad_token_id)
    outs = set()
    for seed in range(5):
        torch.manual_seed(seed)
        outs.add(tuple(sample(lm, ids, mask, gen, None).ids[0].tolist()))
    assert len(outs) > 1  # with top_k 1 every seed would give the same response


def test_lm_forward_keeps_exactly_the_response_positions(tiny_model_dir):
    """Whatever a model's forward accepts (positions, the last k, no logits_to_keep at all), lm_forward gives the
    logits and hidden states of the positions that predict the response, equal to a full forward's."""
    from transformers import AutoModelForCausalLM

    from ppo_lm.models import _logits_to_keep, lm_forward

    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    ids = torch.randint(3, lm.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        full = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                  output_hidden_states=True)
    want_logits, want_hidden = full.logits[:, 4:8], full.hidden_states[-1][:, 4:8]

    class LastOnly(type(lm)):  # a model whose forward takes an int only
        def forward(self, *args, logits_to_keep: int = 0, **kwargs):
            return super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)

    class NoKeep(type(lm)):  # a model without logits_to_keep
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None,
                    output_hidden_states=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache, output_hidden_states=output_hidden_states)

    for cls, mode in ((type(lm), "positions"), (LastOnly, "last"), (NoKeep, None)):
        assert _logits_to_keep(cls) == mode
        lm.__class__ = cls
        with torch.no_grad():
            logits, hidden = lm_forward(lm, ids, mask, 4, want_hidden=True)
        assert logits.shape == (2, 4, lm.config.vocab_size), mode
        assert_close(logits, want_logits)
        assert_close(hidden, want_hidden)


def test_fused_gelu_is_the_same_function(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    from ppo_lm.models import fuse_gelu, load_causal_lm

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    assert plain.config.activation_function == "gelu_new"
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())
    fused = load_causal_lm(str(tiny_model_dir)).eval()
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.GELU) for m in fused.modules()) == plain.config.n_layer
    assert fused.config.activation_function == "gelu_new"  # a saved model is unchanged
    ids = torch.randint(3, plain.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    fuse_gelu(plain)
    fuse_gelu(plain)  # a second pass finds nothing left to replace
    assert sum(isinstance(m, torch.nn.GELU) for m in plain.modules()) == plain.config.n_layer
