"""``ppo-lm plan`` against a measured peak: the benchmark configuration (``ppo-lm bench``'s models and config),
its estimate with no runtime overhead, and the peak RSS of 2 PPO iterations on this CPU above the RSS before
the models were loaded. Prints one JSON line per setting.

    .venv/bin/python benchmarks/plan_check.py [--sizes tiny small] [--lora]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def check(size: str, lora: bool) -> dict:
    from ppo_lm import plan
    from ppo_lm.bench import bench_config, build_models_apart, peak_rss_mib, synthetic_prompts
    from ppo_lm.trainer import train

    with tempfile.TemporaryDirectory(prefix="ppo-lm-plan-check-") as tmp:
        build_models_apart(tmp, size)
        cfg = bench_config(tmp, os.path.join(tmp, "run"), 2, lora=lora, mixed_precision="no")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
        longest = max(len(tok(p)["input_ids"]) for p in synthetic_prompts())  # the prompts this run has
        result = plan.plan(cfg, gpus=1, gpu_memory_gib=1e6, overhead_gib=0.0, prompt_tokens=longest)
        estimate = result["estimates"]["ddp"]
        before = rss_mib()
        train(cfg, records=[{"prompt": p} for p in synthetic_prompts()])
        measured = (peak_rss_mib() - before) / 1024
    return {"size": size, "lora": lora, "prompt_tokens": longest, "estimate_gib": estimate["total_gib"], "by_role_gib": estimate["by_role_gib"],
            "measured_peak_rss_above_start_gib": round(measured, 3), "ratio": round(estimate["total_gib"] / measured, 2),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--lora", action="store_true")
    a = ap.parse_args()
    for size in a.sizes:
        print(json.dumps(check(size, a.lora)), flush=True)


if __name__ == "__main__":
    main()
