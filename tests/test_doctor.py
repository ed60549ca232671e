"""The run doctor (ppo_lm.doctor): each rule on hand-made metrics with hand-computed values, then on real runs of
the tiny model made to fail one way each, and on a healthy run where no rule may fire; the run's manifest,
samples, evaluation during training, and the report page (also in a real browser when one is installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import LEARNING_SEED, prompt_records, tiny_config
from ppo_lm import doctor, report
from ppo_lm.cli import main
from ppo_lm.config import DoctorConfig
from ppo_lm.doctor import RunFacts, fired
from ppo_lm.trainer import train

D = DoctorConfig()  # window 5
NONE = RunFacts()


def rows_of(n: int, **series) -> list[dict]:
    """``n`` metrics rows; each keyword is a constant or a list of n values."""
    return [{"iteration": i + 1, **{k: (v[i] if isinstance(v, list) else v) for k, v in series.items()}}
            for i in range(n)]


def check(name: str, rows: list[dict], facts: RunFacts = NONE) -> str | None:
    return doctor.BY_NAME[name].check(rows, D, facts)


# ------------------------------------------------------------------------------------ each rule by hand


def test_nonfinite_fires_on_a_nan_metric_or_a_skipped_update():
    assert check("nonfinite", rows_of(1, kl="nan", reward_mean=0.5)) == "kl = nan"
    assert check("nonfinite", rows_of(2, kl=0.1, nonfinite_skips=[0, 2])).startswith("2 update(s) skipped")
    assert check("nonfinite", rows_of(2, kl=0.1, nonfinite_skips=[1, 1])) is None  # no new skip


def test_sampling_mismatch_compares_sampling_kl_with_its_threshold():
    assert check("sampling_mismatch", rows_of(1, sampling_kl=0.02), RunFacts(top_k=2)) == \
        "sampling_kl 0.020 nats per token > 0.01 (rollout.top_k 2)"
    assert check("sampling_mismatch", rows_of(1, sampling_kl=0.005)) is None
    # a run from before sampling_kl was logged: the settings alone
    assert "rollout.top_p 0.9" in check("sampling_mismatch", rows_of(1, kl=1.0), RunFacts(top_p=0.9))
    assert check("sampling_mismatch", rows_of(1, kl=1.0)) is None


def test_window_rules_wait_for_a_full_window_and_average_it():
    assert check("negative_kl", rows_of(4, kl=-3.0)) is None  # 4 < window
    # mean of the last 5 of [-0.2, -0.6, -0.6, -0.6, -0.6, -0.6] = -0.6 < -0.5
    assert check("negative_kl", rows_of(6, kl=[-0.2] + [-0.6] * 5)).startswith("kl -0.60 nats per response < -0.5")
    assert check("negative_kl", rows_of(5, kl=-0.4)) is None
    # the median of clipfrac [0.2, 0.4, 0.4, 0.4, 0.3] is 0.4 > 0.3; approx_kl 0.05 < 0.1
    assert check("large_updates", rows_of(5, clipfrac=[0.2, 0.4, 0.4, 0.4, 0.3], approx_kl=0.05)) == \
        "clipfrac 0.40 > 0.3 (median of the last 5)"
    assert check("large_updates", rows_of(6, clipfrac=0.1, approx_kl=[0.0, 0.1, 0.2, 0.3, 0.2, 0.1])) == \
        "approx_kl 0.200 > 0.1 (median of the last 5)"  # the median of [0.1, 0.2, 0.3, 0.2, 0.1]
    # the first updates of a run spiking alone (the real stories260K example: approx_kl 0.238, 0.158, then ~0.04)
    assert check("large_updates", rows_of(5, clipfrac=0.2, approx_kl=[0.238, 0.158, 0.053, 0.045, 0.039])) is None
    assert check("large_updates", rows_of(5, clipfrac=0.3, approx_kl=0.1)) is None  # at the threshold: not over
    assert check("kl_runaway", rows_of(5, kl=[10, 20, 30, 30, 30])) == "kl 24.0 nats per response > 20.0 (mean of the last 5)"


def test_entropy_collapse_compares_the_last_window_with_the_first():
    # start mean 2.0; now 0.15 < 0.1 x 2.0 = 0.2
    assert check("entropy_collapse", rows_of(10, entropy=[2.0] * 5 + [0.15] * 5)) == "entropy 0.150 < 0.1 x its start (2.000)"
    assert check("entropy_collapse", rows_of(10, entropy=[2.0] * 5 + [0.25] * 5)) is None
    assert check("entropy_collapse", rows_of(5, entropy=0.0)) is None  # no start to compare with yet


def test_length_hacking_needs_the_reward_to_rise_with_the_length_or_the_missing_eos():
    # reward 0 -> 1 (a rise of 1 > 0.25 x reward_std 0.5); length 4 -> 8 (2x > 1.5x)
    rising = dict(reward_mean=[0.0] * 5 + [1.0] * 5, reward_std=0.5)
    found = check("length_hacking", rows_of(10, response_length=[4] * 5 + [8] * 5, eos_fraction=1.0, **rising))
    assert found == "response_length 4.0 -> 8.0 (> 1.5x), while reward_mean 0.000 -> 1.000"
    found = check("length_hacking", rows_of(10, response_length=4, eos_fraction=[0.9] * 5 + [0.5] * 5, **rising))
    assert found.startswith("responses without EOS 0.10 -> 0.50 (up > 0.3)")
    flat = dict(reward_mean=0.0, reward_std=0.5)
    assert check("length_hacking", rows_of(10, response_length=[4] * 5 + [8] * 5, **flat)) is None
    # within the batches the reward goes with the length (0.9 > 0.5): named; it does not (0.2): the answers lengthen
    # while the reward rises for another reason
    longer = dict(response_length=[4] * 5 + [8] * 5, eos_fraction=1.0, **rising)
    assert check("length_hacking", rows_of(10, reward_length_corr=0.9, **longer)).endswith(
        "reward and length correlate 0.90 in the batches")
    assert check("length_hacking", rows_of(10, reward_length_corr=0.2, **longer)) is None
    assert check("length_hacking", rows_of(10, reward_length_corr=[0.9] * 5 + ["nan"] * 5, **longer))  # nan skipped
    # stop_at_eos off: no answer ends with EOS by design, so its share says nothing
    assert check("length_hacking", rows_of(10, response_length=4, eos_fraction=[0.9] * 5 + [0.0] * 5, **rising),
                 RunFacts(stop_at_eos=False)) is None


def test_no_signal_and_critic_not_learning_wait_for_two_windows():
    flat = dict(reward_mean=[0.10] * 5 + [0.12] * 5, reward_std=0.2, kl=0.01)  # moved 0.02 <= 0.25 x 0.2 = 0.05
    assert check("no_signal", rows_of(9, **flat)) is None
    assert check("no_signal", rows_of(10, **flat)) == ("reward_mean 0.100 -> 0.120 (within 0.25 x reward_std 0.200) "
                                                        "and kl 0.010 < 0.05")
    assert check("no_signal", rows_of(10, **{**flat, "kl": 0.2})) is None  # the policy moves: a signal
    assert check("critic_not_learning", rows_of(9, explained_variance=-0.5)) is None
    # the best 5 in a row: (-0.2 x 3 + 0.1 x 2) / 5 = -0.08, every later window lower
    assert check("critic_not_learning", rows_of(10, explained_variance=[-0.2] * 3 + [0.1] * 2 + [-0.3] * 5)) == \
        "explained_variance at most -0.080 <= 0.01 (best mean of 5 iterations in a row)"
    # a critic that learned, then explains little once the reward plateaus: not a critic that does not learn
    assert check("critic_not_learning", rows_of(10, explained_variance=[0.5] * 5 + [-0.1] * 5)) is None
    assert check("critic_not_learning", rows_of(10, explained_variance=0.2)) is None
    assert check("critic_not_learning", rows_of(10, explained_variance=1e-6))  # a critic that cannot move: ~0


def test_thresholds_come_from_the_config():
    rows = rows_of(5, clipfrac=0.25, approx_kl=0.0)
    assert fired(rows, D, NONE) == {}
    assert list(fired(rows, DoctorConfig(clipfrac=0.2), NONE)) == ["large_updates"]


def test_spans_and_the_monitor_speak_once_per_rule():
    assert doctor.spans([3, 4, 5, 9]) == "3-5, 9" and doctor.spans([]) == ""
    monitor = doctor.Monitor(D, RunFacts(top_k=2))
    history = []
    said = []
    for i, value in enumerate([0.5, 0.0, 0.5], 1):  # fires, stops, fires again
        history.append({"iteration": i, "sampling_kl": value})
        names, lines = monitor.check(history)
        said += lines
        assert names == (["sampling_mismatch"] if value else [])
    assert len(said) == 1 and said[0].startswith("doctor: sampling_mismatch at iteration 1: sampling_kl 0.500")
    assert said[0].endswith("(docs/tuning.md#sampling_mismatch)")


def test_doctor_of_a_directory_that_is_no_run_is_a_clear_error(tmp_path, capsys):
    assert main(["doctor", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\nnot json\n')
    assert main(["doctor", str(tmp_path)]) == 2
    assert "metrics.jsonl:2: not JSON" in capsys.readouterr().err


def test_doctor_of_a_run_that_stopped_says_where_and_reads_nan_as_nonfinite(tmp_path):
    """A run killed at iteration 3 of 10 whose last line has a NaN (metrics.jsonl writes it as "nan")."""
    (tmp_path / "config.yaml").write_text("train: {iterations: 10}\n")
    rows = rows_of(3, reward_mean=0.1, kl=[0.0, 0.1, "nan"])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    diagnosis = doctor.diagnose(tmp_path)
    assert diagnosis.status.startswith("stopped after iteration 3 of 10")
    assert [v.rule.name for v in diagnosis.causes] == ["nonfinite"]
    assert diagnosis.to_dict()["rules"]["nonfinite"] == {"fired": [3], "evidence": "kl = nan"}


# ----------------------------------------------------------------------------------- real runs, broken


HEALTHY = dict(ppo={"lr": 1e-3, "kl": {"coef": 0.05}}, model={"critic": "policy"})
BROKEN = {
    # cause -> what breaks the tests' usual config (tiny_config: lr 3e-3, kl.coef 0.01)
    "large_updates": dict(ppo={"lr": 0.05}),  # 50x the healthy learning rate
    "sampling_mismatch": dict(rollout={"top_k": 2}),  # samples from the top 2 tokens, ratio/KL on the full policy
    "length_hacking": dict(reward="words"),  # a reward that pays for every word
    "no_signal": dict(ppo={"lr": 1e-7}),  # a learning rate too low to move anything
    # the healthy config with a critic that cannot move
    "critic_not_learning": dict(ppo={"lr": 1e-3, "kl": {"coef": 0.05}, "value_lr": 1e-9}, model={"critic": "policy"}),
}


def words(prompts, completions, fields):
    return [float(len(c.split())) for c in completions]


def run(tmp_path: Path, model_dir: Path, sections: dict, **train_fields) -> Path:
    reward_fn = words if sections.get("reward") == "words" else None
    sections = {k: v for k, v in sections.items() if k != "reward" or reward_fn is None}
    cfg = tiny_config(model_dir, tmp_path, **sections,
                      train={"iterations": 30, "seed": LEARNING_SEED, "save_final": False, **train_fields})
    train(cfg, records=prompt_records(), reward_fn=reward_fn)
    return tmp_path


@pytest.mark.learning
@pytest.mark.parametrize("cause", list(BROKEN))
def test_doctor_names_the_cause_of_a_run_broken_on_purpose(cause, tiny_model_dir, tmp_path, capsys):
    """Measured 2026-12-06 over seeds 0-2 x ATEN_CPU_CAPABILITY avx512/avx2/default (docs/tuning.md, "The run
    doctor"): the cause named first was the broken one in every run."""
    out = run(tmp_path, tiny_model_dir, BROKEN[cause])  # the tests' usual config, broken one way
    said = capsys.readouterr().err
    assert f"doctor: {cause} at iteration" in said  # the online line, while training
    diagnosis = doctor.diagnose(out)
    assert diagnosis.causes[0].rule.name == cause, diagnosis.to_dict()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(cause in r["doctor"] for r in rows)
    assert main(["doctor", str(out)]) == 1
    assert f"Most likely cause 1 ({cause})" in capsys.readouterr().out


@pytest.fixture(scope="module")
def healthy_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A healthy run with everything of issue 20 on: held-out evaluation every 10 iterations keeping the best
    policy, samples every 10, deterministic algorithms."""
    out = tmp_path_factory.mktemp("healthy")
    heldout = out.parent / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in prompt_records(40)[32:]))
    sections = {**HEALTHY, "eval": {"data": str(heldout), "best_metric": "reward_mean"}}
    return run(out, tiny_model_dir, sections, eval_every=10, log_samples=2, log_samples_every=10, deterministic=True)


@pytest.mark.learning
def test_no_rule_fires_on_a_healthy_run(healthy_run, capsys):
    diagnosis = doctor.diagnose(healthy_run)
    assert diagnosis.causes == [], diagnosis.to_dict()
    assert diagnosis.status == "finished: 30 iterations (no final/ model)"
    assert main(["doctor", str(healthy_run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["causes"] == [] and set(out["rules"]) == {r.name for r in doctor.RULES}


def test_the_run_records_its_manifest_and_samples(healthy_run):
    m = json.loads((healthy_run / "manifest.json").read_text())
    assert m["versions"]["torch"].startswith("2.") and m["versions"]["ppo-lm"]
    assert m["data"] == {"records": 32, "sha256": m["data"]["sha256"]} and len(m["data"]["sha256"]) == 64
    assert m["seed"] == LEARNING_SEED and m["device"] == "cpu" and m["processes"] == 1
    assert m["cpu_capability"] in ("avx512", "avx2", "default", "avx512_vnni", "avx512_bf16") or m["cpu_capability"]
    assert m["deterministic"] is True and m["command"] and len(m["config_sha256"]) == 64
    import torch

    assert not torch.are_deterministic_algorithms_enabled()  # on for the run only, not left on for the caller
    samples = [json.loads(x) for x in (healthy_run / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["iteration"] for s in samples}) == [1, 10, 20, 30]  # first, every 10th, last
    assert all(len([s for s in samples if s["iteration"] == i]) == 2 for i in (1, 10, 20, 30))
    assert set(samples[0]) == {"iteration", "prompt", "completion", "reward"}


def test_same_data_same_fingerprint():
    from ppo_lm.manifest import data_fingerprint

    a, b = data_fingerprint(prompt_records()), data_fingerprint(prompt_records())
    assert a == b and data_fingerprint(prompt_records()[::-1])["sha256"] != a["sha256"]


def test_evaluation_during_training_is_logged_and_the_best_policy_kept(healthy_run):
    rows = [json.loads(x) for x in (healthy_run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["iteration"] for r in rows if "eval/reward_mean" in r]
    assert evaluated == [10, 20, 30]
    r = rows[9]
    assert {"eval/reward_mean", "eval/reward_std", "eval/distinct_2", "eval/response_length", "time_eval_s"} <= set(r)
    best = json.loads((healthy_run / "best" / "best.json").read_text())
    values = {row["iteration"]: row["eval/reward_mean"] for row in rows if "eval/reward_mean" in row}
    assert best["metric"] == "reward_mean" and best["value"] == max(values.values())
    assert best["iteration"] == min(i for i, v in values.items() if v == best["value"])  # the first to reach it
    assert (healthy_run / "best" / "model.safetensors").is_file() and not (healthy_run / "best.tmp").exists()


def test_evaluation_greedy_is_the_same_at_the_same_weights_and_leaves_the_training_random_stream(tiny_model_dir,
                                                                                                tmp_path):
    """Two runs, one evaluating every iteration: the training trajectory is the same (the evaluation forks the
    random stream), so the evaluation can be switched on without changing what is trained."""
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in prompt_records(8)))
    plain = train(tiny_config(tiny_model_dir, tmp_path / "a", train={"iterations": 3, "save_final": False}),
                  records=prompt_records())
    cfg = tiny_config(tiny_model_dir, tmp_path / "b", train={"iterations": 3, "save_final": False, "eval_every": 1},
                      eval={"data": str(heldout), "greedy": False})
    evaluated = train(cfg, records=prompt_records())
    for a, b in zip(plain.metrics, evaluated.metrics):
        assert a["reward_mean"] == b["reward_mean"] and a["kl"] == b["kl"]
        assert "eval/reward_mean" in b and "eval/reward_mean" not in a


def test_an_unknown_best_metric_is_refused(tiny_model_dir, tmp_path):
    from ppo_lm.errors import UserError

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in prompt_records(4)))
    with pytest.raises(UserError, match="unknown eval metric 'f1'"):
        tiny_config(tiny_model_dir, tmp_path / "a", train={"eval_every": 1}, eval={"data": str(heldout),
                                                                                   "best_metric": "f1"})
    with pytest.raises(UserError, match="eval.data"):
        tiny_config(tiny_model_dir, tmp_path / "b", train={"eval_every": 1})


# ------------------------------------------------------------------------------------------------ report


def test_report_is_one_self_contained_page(healthy_run, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(healthy_run), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    assert "No rule fired" in page and "Evaluation during training" in page and "Best by reward_mean" in page
    assert page.count("data:image/png;base64,") == 2  # training and evaluation curves, inline
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing from the network
    for rule in doctor.RULES:
        assert f"<td>{rule.name}</td>" in page
    assert json.loads((healthy_run / "manifest.json").read_text())["config_sha256"] in page


def browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(browser() is None, reason="no Chromium installed (apt-get install chromium): the report is not "
                                              "checked in a browser")
def test_report_in_a_real_browser(tiny_model_dir, tmp_path, healthy_run):
    """Headless Chromium renders the page of a broken run and of the healthy one: the DOM it built says what the
    page shows, and the screenshot has the colours of what it shows (the orange box of a likely cause, the
    green one of a healthy run) and the pixels of the inline curves."""
    from PIL import Image

    broken = run(tmp_path / "broken", tiny_model_dir, BROKEN["large_updates"])
    for run_dir, box, text in ((broken, (0xF7, 0x90, 0x09), "Most likely cause 1: large_updates"),
                               (healthy_run, (0x16, 0x79, 0x4C), "No rule fired")):
        page = report.write(run_dir, tmp_path / f"{run_dir.name}.html")
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1600"]
        dom = subprocess.run([browser(), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        assert text in dom and "Training curves" in dom
        shot = tmp_path / f"{run_dir.name}.png"
        subprocess.run([browser(), *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
        pixels = Image.open(shot).convert("RGB")
        colours = {c for _, c in pixels.getcolors(maxcolors=1 << 20)}
        assert box in colours, f"{shot}: no pixel of the box colour {box}"
        assert len(colours) > 200  # text, tables and the curves' anti-aliased lines, not a blank page
