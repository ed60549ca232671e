"""``ppo-lm`` command line: parse, load the config, call one library function. A :class:`UserError` becomes
one line on stderr and exit code 2 (a traceback only with ``--debug``)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

from .errors import UserError


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_train(args) -> int:
    from .config import load_config

    overrides = list(args.overrides) + (["train.resume=auto"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    _quiet_libraries()
    from .trainer import train

    result = train(cfg)
    if result.interrupted:
        extra = " ".join(args.overrides)
        print(f"stopped after iteration {result.metrics[-1]['iteration'] if result.metrics else 0}; checkpoint "
              f"{result.checkpoint}. Resume with: ppo-lm train {args.config} {extra + ' ' if extra else ''}--resume",
              file=sys.stderr)
        return 0
    last = result.metrics[-1] if result.metrics else {}
    if not _first_process():
        return 0
    print(f"done: {len(result.metrics)} iterations, final reward {last.get('reward_mean', float('nan')):+.4f}, "
          f"kl {last.get('kl', float('nan')):.4f}; outputs in {result.output_dir}")
    return 0


def _run_stage(args, stage: str, metric: str) -> int:
    """``sft`` / ``reward-model``: load the stage's config schema, run it, print the held-out change."""
    import importlib

    from .config import load_config

    module_name, schema_name = {"sft": ("sft", "SFTConfig"), "reward-model": ("reward_model", "RewardModelConfig")}[stage]
    module = importlib.import_module(f".{module_name}", __package__)  # the stage's schema lives with it
    cfg = load_config(args.config, args.overrides, schema=getattr(module, schema_name))
    _quiet_libraries()
    summary = module.run(cfg)
    if not _first_process():
        return 0
    print(f"done: held-out {metric} {summary[f'eval_{metric}_before']} -> {summary[f'eval_{metric}_after']}; "
          f"model in {summary['output']}")
    return 0


def cmd_sft(args) -> int:
    return _run_stage(args, "sft", "loss")


def cmd_reward_model(args) -> int:
    return _run_stage(args, "reward-model", "accuracy")


def cmd_plan(args) -> int:
    import json

    from .config import load_config

    if args.gpus < 1 or args.gpu_memory <= 0:
        raise UserError("needs --gpus >= 1 and --gpu-memory > 0 (GiB per device)", "--gpus" if args.gpus < 1 else "--gpu-memory")
    cfg = load_config(args.config, args.overrides, check_paths=False)  # the data is not needed; the models are
    _quiet_libraries()                                                  # checked as their configs are read
    from . import plan

    result = plan.plan(cfg, args.gpus, args.gpu_memory, overhead_gib=args.overhead, prompt_tokens=args.prompt_tokens)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['model']}: {result['policy_params'] / 1e6:.1f}M parameters"
          + (f", {result['lora_params'] / 1e6:.2f}M in LoRA adapters" if result["lora_params"] else "")
          + f"; {args.gpus} device(s) of {args.gpu_memory:g} GiB; estimates per device, weights not read\n")
    print(plan.table(result))
    print(f"\nrecommendation: {result['advice']}")
    return 0


def cmd_pipeline(args) -> int:
    _quiet_libraries()
    from . import pipeline

    summary = pipeline.run(args.config, args.overrides)
    if summary.get("ppo", {}).get("interrupted"):
        print(f"stopped; run the same command again to resume ({summary['ppo']['checkpoint']})", file=sys.stderr)
        return 0
    if not _first_process():  # the first of several processes evaluates and reports
        return 0
    reward = summary["eval"]["reward_mean"]
    print(f"done: reward {reward['before']:+.4f} -> {reward['after']:+.4f}; report in {summary['report']}")
    return 0


def cmd_eval(args) -> int:
    from .config import load_config

    if not args.model and not args.compare:
        raise UserError("give --model PATH, or --compare BEFORE AFTER", "eval")
    model = args.compare[0] if args.compare else args.model
    cfg = load_config(args.config, [f"model.name_or_path={model}", *args.overrides])
    _quiet_libraries()
    import json

    from . import evaluate

    if args.compare:
        result = evaluate.compare(cfg, *args.compare, limit=args.limit, seed=args.seed, greedy=args.greedy,
                                  notice=lambda m: print(f"warning: {m}", file=sys.stderr))
        evaluate.write(result, args.output_dir, "compare")
        print(evaluate.markdown_table(result))
    else:
        result = evaluate.evaluate(cfg, args.model, reference=args.reference, limit=args.limit, seed=args.seed,
                                   greedy=args.greedy, notice=lambda m: print(f"warning: {m}", file=sys.stderr))
        evaluate.write(result, args.output_dir, "eval")
        print(json.dumps({k: v for k, v in result.items() if k not in ("examples", "scores")}))  # both in the file
    return 0


def cmd_prepare(args) -> int:
    from . import tasks

    counts = tasks.prepare(args.task, args.assets, args.out or f"runs/data/{args.task}", source=args.source)
    for name, n in counts.items():
        print(f"{Path(args.out or f'runs/data/{args.task}') / name}: {n} records")
    return 0


def cmd_demo(args) -> int:
    _quiet_libraries()
    from . import demo

    demo.run(args.output_dir, iterations=args.iterations)
    return 0


def cmd_generate(args) -> int:
    from pathlib import Path

    if not Path(args.model).exists() and args.model.startswith((".", "/", "~")):
        raise UserError(f"no such model folder: {args.model}", "--model")
    _quiet_libraries()
    import torch

    from .data import format_prompt, use_chat_template
    from .models import check_causal_lm, load_causal_lm, load_tokenizer

    check_causal_lm(args.model, "model")
    tokenizer = load_tokenizer(args.model, notice=lambda m: print(m, file=sys.stderr), field="model")
    chat = use_chat_template(tokenizer, args.chat_template, field="--chat-template")
    model = load_causal_lm(args.model, field="model")
    model.eval()
    torch.manual_seed(args.seed)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for prompt in prompts:
        enc = tokenizer([format_prompt(tokenizer, prompt, chat)] * args.num_samples, return_tensors="pt",
                        padding=True, add_special_tokens=not chat)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=args.temperature > 0, temperature=args.temperature or None,
                                 top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for text in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True):
            print(f"{prompt} ||| {text}")
    return 0


def cmd_doctor(args) -> int:
    """Exit 0 when no rule fired, 1 when one did (a script can gate on it), 2 for a directory that is no run."""
    import json

    from . import doctor

    diagnosis = doctor.diagnose(args.run_dir)
    if args.json:
        print(json.dumps(diagnosis.to_dict()))
    else:
        from rich.console import Console

        doctor.render(diagnosis, Console(soft_wrap=True))
    return 1 if diagnosis.causes else 0


def cmd_report(args) -> int:
    from . import report

    print(report.write(args.run_dir, args.output))
    return 0


def cmd_bench(args) -> int:
    _quiet_libraries()
    from . import bench

    bench.run(size=args.size, iterations=args.iterations, lora=args.lora, mixed_precision=args.mixed_precision,
              critic=args.critic, gradient_checkpointing=args.gradient_checkpointing,
              recompute_logprobs=args.recompute_logprobs, estimator=args.estimator, engine=args.engine)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ppo-lm", description="Fine-tune causal language models with PPO (RLHF).")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    _training_commands(sub)
    _evaluation_commands(sub)
    _tool_commands(sub)
    return p


def _training_commands(sub) -> None:
    """train, sft, reward-model."""
    t = sub.add_parser("train", help="run PPO from a YAML config")
    t.add_argument("config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.lr=1e-5 rollout.batch_size=32")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in the output directory (train.resume=auto)")
    t.set_defaults(func=cmd_train)

    s_ = sub.add_parser("sft", help="supervised fine-tuning on (prompt, response) records")
    s_.add_argument("config")
    s_.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    s_.set_defaults(func=cmd_sft)

    r = sub.add_parser("reward-model", help="train a reward model on preference pairs or labelled text")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.mode=pointwise")
    r.set_defaults(func=cmd_reward_model)


def _evaluation_commands(sub) -> None:
    """eval, pipeline, prepare."""
    e = sub.add_parser("eval", help="a model's reward, KL, diversity and fluency on a config's prompts")
    e.add_argument("config", help="a PPO config: its data, rollout and reward sections are used")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--model", help="model to evaluate")
    e.add_argument("--reference", help="reference model for KL and perplexity")
    e.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="before/after table (markdown and JSON)")
    e.add_argument("--limit", type=int, help="use only the first N prompts")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--output-dir", default="runs/eval")
    e.add_argument("--greedy", action="store_true", help="decode greedily instead of sampling")
    e.set_defaults(func=cmd_eval)

    pn = sub.add_parser("plan", help="memory per device for a config's models and a recommended strategy")
    pn.add_argument("config")
    pn.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    pn.add_argument("--gpus", type=int, default=1, help="devices to train on (default 1)")
    pn.add_argument("--gpu-memory", type=float, default=80.0, help="memory per device in GiB (default 80)")
    pn.add_argument("--overhead", type=float, default=1.0, help="GiB per device for the runtime (default 1.0)")
    pn.add_argument("--prompt-tokens", type=int, help="prompt length to plan for (default: data.max_prompt_tokens)")
    pn.add_argument("--json", action="store_true", help="print the estimates as one JSON object")
    pn.set_defaults(func=cmd_plan)

    pl = sub.add_parser("pipeline", help="SFT -> reward model -> PPO -> eval, skipping stages already done")
    pl.add_argument("config", help="pipeline YAML naming a config per stage")
    pl.add_argument("overrides", nargs="*", help="e.g. output_dir=runs/p2 eval_limit=32; a stage's config: "
                                                  "ppo.rollout.temperature=0.7, sft.optim.epochs=2")
    pl.set_defaults(func=cmd_pipeline)

    pr = sub.add_parser("prepare", help="write a task's prompt files from the public data (qa, text_generation, ...)")
    pr.add_argument("task", help="qa | text_generation | sentiment_analysis")
    pr.add_argument("--assets", default="../shared/assets", help="folder with the public datasets")
    pr.add_argument("--out", help="output folder (default runs/data/TASK)")
    pr.add_argument("--source", help="data source of the task (qa: stories or squad)")
    pr.set_defaults(func=cmd_prepare)


def _tool_commands(sub) -> None:
    """demo, generate, doctor, report, bench."""
    d = sub.add_parser("demo", help="offline demo: pre-train a small LM, then PPO toward positive reviews")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--iterations", type=int, default=40)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="sample from a saved policy (or any causal LM folder)")
    g.add_argument("model", help="model folder or hub name")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable); default: one per stdin line")
    g.add_argument("--num-samples", "-n", type=int, default=1)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                   help="wrap each prompt as a user message in the tokenizer's chat template (auto: when it has one)")
    g.set_defaults(func=cmd_generate)

    dr = sub.add_parser("doctor", help="diagnose a training run from its output directory: which rules fired, "
                                       "the likely cause, what to try (exit 1 when a rule fired)")
    dr.add_argument("run_dir", help="a ppo-lm train output_dir (finished or not)")
    dr.add_argument("--json", action="store_true", help="print the diagnosis as one JSON object")
    dr.set_defaults(func=cmd_doctor)

    rp = sub.add_parser("report", help="one self-contained HTML page about a training run")
    rp.add_argument("run_dir", help="a ppo-lm train output_dir")
    rp.add_argument("-o", "--output", help="HTML file to write (default RUN_DIR/report.html)")
    rp.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="time PPO iterations on a fixed configuration; prints one JSON line")
    b.add_argument("--size", choices=["tiny", "small", "qwen-tiny", "qwen0.5b"], default="tiny",
                   help="tiny: 4x256 GPT-2; small: GPT-2 124M shape; qwen-tiny: tiny's size in the Qwen2 "
                        "architecture; qwen0.5b: Qwen2.5-0.5B's shape (for a GPU)")
    b.add_argument("--iterations", type=int, default=4, help="iterations; the first is warm-up")
    b.add_argument("--lora", action="store_true", help="train LoRA adapters (reference = adapters off)")
    b.add_argument("--mixed-precision", choices=["no", "bf16"], default=None,
                   help="bf16 autocast over fp32 weights; default: bf16 for qwen0.5b, no for the others")
    b.add_argument("--critic", action="store_true",
                   help="a separate critic started from the policy's weights (like TRL's value model)")
    b.add_argument("--estimator", choices=["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"], default="gae",
                   help="ppo.advantage_estimator; a critic-free one samples 16 prompts x 4, with the KL as a k3 "
                        "loss term of weight 0.05 (as TRL's GRPOTrainer with beta 0.05)")
    b.add_argument("--engine", choices=["hf", "batch", "vllm"], default="hf",
                   help="rollout.engine: hf (generate), batch (transformers' continuous batching) or vllm (the extra)")
    b.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, more time)")
    b.add_argument("--recompute-logprobs", action="store_true",
                   help="old logprobs and values from a second policy forward, not recorded while sampling")
    b.set_defaults(func=cmd_bench)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    from .config import ConfigDeprecationWarning

    if issubclass(category, ConfigDeprecationWarning):
        return f"warning: {message}\n"
    return _plain_format(message, category, filename, lineno, line)


_plain_format = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning  # a renamed config key: one plain line
    args = build_parser().parse_args(argv)
    code = run_command(args.func, args)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from .distributed import exit_process

        exit_process(code)
    return code


def run_command(func: Callable, args) -> int:
    try:
        return func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _end_process_group()


def _first_process() -> bool:
    """Whether this is the process that reports (the only one, or rank 0 of several)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _end_process_group() -> None:
    """Under torchrun, leave the process group as the command ends (torch warns about one left open)."""
    if "torch" in sys.modules:
        from .distributed import end_process_group

        end_process_group()


if __name__ == "__main__":
    sys.exit(main())
