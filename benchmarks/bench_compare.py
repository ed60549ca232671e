#!/usr/bin/env python
"""Run TRL's PPOTrainer (the peer) and `ppo-lm bench` on the same fixed configuration, one after the other on
this machine, and print the ratios.

    TRL_PEER_VENV=/tmp/trl-peer/trl-venv python benchmarks/bench_compare.py --sizes tiny small

TRL_PEER_VENV is a virtual environment with trl==1.12.0 installed (see ../shared/peers/trl_ppo/README.md).
Without it the script says so and exits 0. The peer's scaffolding is read from ../shared/peers/trl_ppo
(or PEER_DIR). Each run is a separate process, so peak RSS is per run. Results go to --out as JSON, with a
plot of seconds per phase beside it.

The peer's script runs TRL in fp32 on the CPU (``bf16=False``, although PPOConfig defaults to ``bf16=True``).
``--peer-bf16`` also runs it with ``bf16=True``, so that ppo-lm's bf16 rows can be set against TRL's own bf16. The
Qwen2-architecture sizes (``qwen-tiny``, ``qwen0.5b``) are not the peer's: their models come from
``benchmarks/peer_models.py``. On a machine with a GPU, TRL runs on it in bf16 (``use_cpu=False``, ``bf16=True``)
and also reports its peak GPU memory. Each of these runs a copy of the peer's script with those few edits (each
a string that must occur exactly once in it, or the run stops), never the peer's folder itself.

Besides the measured ratios, each row has ``flop_ratio``: the matmul FLOPs TRL's PPOTrainer spends on one iteration
over ppo-lm's (``peer_flops.py`` / ``ppo_lm.bench.model_flops``). It is the speed-up either tool would get from doing
less work at the same FLOP/s, so ``speedup / flop_ratio`` is how much more work per second ppo-lm gets done.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ppo_lm.bench import QWEN_SHAPES, SIZES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_flops import trl_iteration_tflops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER_SIZES = ("tiny", "small")  # the sizes the peer's scaffolding builds and runs itself (bench.SHAPES)
# ppo-lm's command-line flags for each mode; without --mixed-precision a run takes its size's default
# (bench.default_mixed_precision: bf16 for qwen0.5b, fp32 for the others)
MODES = {"fp32": ["--mixed-precision", "no"], "bf16": ["--mixed-precision", "bf16"], "lora": ["--lora"],
         "lora-bf16": ["--lora", "--mixed-precision", "bf16"], "critic": ["--critic"],
         "critic-bf16": ["--critic", "--mixed-precision", "bf16"], "lora-gc": ["--lora", "--gradient-checkpointing"]}


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in output:\n{text[-2000:]}")


def run(cmd: list[str], cwd: Path | None = None) -> dict:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return last_json(proc.stdout)


def peer_patches(size: str, *, bf16: bool, gpu: bool) -> dict[str, str]:
    """Edits of the peer's script (old text -> new text) for a size it does not know, bf16, and a GPU."""
    patches = {}
    if size not in PEER_SIZES:
        patches['choices=["tiny", "small"]'] = f'choices=["tiny", "small", "{size}"]'
    if bf16 or gpu:
        patches["bf16=False,"] = "bf16=True,"
    if gpu:
        patches["use_cpu=True,"] = "use_cpu=False,"
        patches['"peak_rss_mib": '] = '"peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1), "peak_rss_mib": '
    return patches


def run_peer(cmd: list[str], peer_dir: Path, patches: dict[str, str]) -> dict:
    """The peer's benchmark; with ``patches``, from a copy of its folder whose script has those edits."""
    if not patches:
        return run(cmd, cwd=peer_dir)
    with tempfile.TemporaryDirectory(prefix="trl-peer-") as tmp:
        shutil.copytree(peer_dir, tmp, dirs_exist_ok=True)
        script = Path(tmp, "bench_trl_ppo.py")
        text = script.read_text()
        for old, new in patches.items():
            if text.count(old) != 1:
                raise RuntimeError(f"cannot edit the peer's script: expected one {old!r} in {script}")
            text = text.replace(old, new)
        script.write_text(text)
        return run(cmd, cwd=Path(tmp))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, res in zip(axes[0], results):
        names, rollout, train, other = [], [], [], []
        for key, name in (("trl", f"TRL {res['trl_precision']}"), ("trl_bf16", "TRL bf16")):
            t = res.get(key)
            if t:
                names.append(name)
                rollout.append(t["rollout_sec_median"])
                train.append(t["optim_sec_median"])
                other.append(0.0)
        for mode, ours in res["ppo_lm"].items():
            names.append(f"ppo-lm {mode}")
            rollout.append(ours["rollout_s"])
            train.append(ours["train_s"])
            other.append(ours["score_s"])
        ax.bar(names, rollout, label="rollout")
        ax.bar(names, other, bottom=rollout, label="score")
        ax.bar(names, train, bottom=[r + o for r, o in zip(rollout, other)], label="train")
        ax.set_title(f"{res['size']}: seconds per PPO iteration")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def compare(trl: dict, trl_bf16: dict | None, ours: dict[str, dict], trl_tflops: float) -> dict[str, dict]:
    """Per ppo-lm mode, its ratios to TRL: speed, memory, FLOPs per iteration (``trl_tflops``, what TRL computes
    for the same iteration by peer_flops.py) and work per second; generation and GPU memory where both have them."""
    ratios = {}
    for mode, o in ours.items():
        speedup = trl["sec_per_iter_median"] / o["seconds_per_iteration"]
        o["trl_iteration_tflops"] = trl_tflops
        flop_ratio = trl_tflops / o["iteration_tflops"]
        ratios[mode] = {"speedup_vs_trl": round(speedup, 2),
                        "peak_rss_vs_trl": round(o["peak_rss_mib"] / trl["peak_rss_mib"], 3),
                        "flop_ratio": round(flop_ratio, 2), "work_per_second_vs_trl": round(speedup / flop_ratio, 2)}
        if o.get("generate_s") and trl.get("generation_sec_median"):  # sampling alone, part of the rollout
            ratios[mode]["generation_speedup_vs_trl"] = round(trl["generation_sec_median"] / o["generate_s"], 2)
        if o.get("peak_gpu_mib") and trl.get("peak_gpu_mib"):
            ratios[mode]["peak_gpu_vs_trl"] = round(o["peak_gpu_mib"] / trl["peak_gpu_mib"], 3)
        if trl_bf16:
            ratios[mode]["speedup_vs_trl_bf16"] = round(trl_bf16["sec_per_iter_median"] / o["seconds_per_iteration"], 2)
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["tiny"], choices=SIZES)
    ap.add_argument("--modes", nargs="+", default=["fp32", "bf16", "lora"], choices=list(MODES))
    ap.add_argument("--trl-iters", type=int, default=None,
                    help="default: 5 for the tiny sizes, 3 for the others (as results.md)")
    ap.add_argument("--iters", type=int, default=None, help="ppo-lm iterations; default: same as TRL")
    ap.add_argument("--peer-bf16", action="store_true",
                    help="also run TRL with bf16=True (its PPOConfig default; on a GPU it always runs so)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "perf" / "bench-compare.json"))
    a = ap.parse_args()

    venv = os.environ.get("TRL_PEER_VENV")
    peer_python = Path(venv or "", "bin", "python")
    peer_dir = Path(os.environ.get("PEER_DIR", ROOT.parent / "shared" / "peers" / "trl_ppo"))
    if not venv or not peer_python.exists():
        print("bench-compare skipped: set TRL_PEER_VENV to a virtual environment with trl==1.12.0 "
              "(see ../shared/peers/trl_ppo/README.md)")
        return 0
    if not (peer_dir / "bench_trl_ppo.py").exists():
        print(f"bench-compare skipped: no peer scaffolding in {peer_dir} (set PEER_DIR)")
        return 0
    gpu = torch.cuda.is_available()
    models = Path(os.environ.get("TRL_PEER_MODELS", "/tmp/trl-peer/models"))
    results = []
    for size in a.sizes:
        if not (models / size / "policy").exists():
            build = (["make_models.py", str(models), "--size", size] if size in PEER_SIZES else
                     [str(ROOT / "benchmarks" / "peer_models.py"), str(models), size, json.dumps(QWEN_SHAPES[size])])
            subprocess.run([str(peer_python), *build], cwd=peer_dir, check=True)
        trl_iters = a.trl_iters or (5 if size.endswith("tiny") else 3)
        trl_cmd = [str(peer_python), "bench_trl_ppo.py", "--models", str(models), "--size", size, "--iters", str(trl_iters)]
        trl = run_peer(trl_cmd, peer_dir, peer_patches(size, bf16=False, gpu=gpu))
        trl_bf16 = (run_peer(trl_cmd, peer_dir, peer_patches(size, bf16=True, gpu=gpu))
                    if a.peer_bf16 and not gpu else None)
        ours = {}
        for mode in a.modes:
            ours[mode] = run([sys.executable, "-m", "ppo_lm.cli", "bench", "--size", size,
                              "--iterations", str(a.iters or trl_iters), *MODES[mode]])
        ratios = compare(trl, trl_bf16, ours, trl_iteration_tflops(models / size / "policy"))
        results.append({"size": size, "trl_precision": "bf16" if gpu else "fp32", "trl": trl, "trl_bf16": trl_bf16,
                        "ppo_lm": ours, "ratios": ratios})
        print(json.dumps({"size": size, "trl_s_per_iter": trl["sec_per_iter_median"],
                          "trl_bf16_s_per_iter": trl_bf16 and trl_bf16["sec_per_iter_median"],
                          "trl_peak_rss_mib": trl["peak_rss_mib"],
                          **{f"{m}_{k}": v for m, r in ratios.items() for k, v in r.items()}}), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out.write_text(json.dumps({"date_utc": stamp, "results": results}, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
