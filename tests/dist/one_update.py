"""One PPO update on a fixed batch, on however many processes it is launched: every process samples the same
full batch with the same seed, keeps its rows (``rank::world``) and runs the trainer's steps 2-4 on them. The
main process writes the trainable weights after the update to ``OUT``. The 1-process and 2-process weights must
agree (tests/test_distributed.py).

    python tests/dist/one_update.py MODEL OUT [key=value ...]
    torchrun --nproc_per_node 2 tests/dist/one_update.py MODEL OUT [key=value ...]
"""

import os
import sys

import torch
from safetensors.torch import save_file

from ppo_lm import distributed as dist
from ppo_lm.config import apply_override, config_from_dict
from ppo_lm.rollout import collect
from ppo_lm.trainer import advantages, score, setup, shape, update

model, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
words = ["a", "b", "c", "d", "e", "f", "g", "h"]
records = [{"prompt": " ".join(words[(k + i) % 8] for i in range(2 + k % 3))} for k in range(16)]
d = {"model": {"name_or_path": model}, "data": {"path": "records"},
     "rollout": {"batch_size": 16 // int(os.environ.get("WORLD_SIZE", "1")), "max_new_tokens": 8},  # per process "reward": {"sources": [{"type": "keyword", "words": ["a"]}]},
     "ppo": {"lr": 1e-2, "num_minibatches": 1, "epochs": 2, "kl": {"coef": 0.05}},
     "train": {"output_dir": out + ".run", "iterations": 1, "progress": False, "log_samples": 0, "seed": 0}}
for item in overrides:
    apply_override(d, item)
cfg = config_from_dict(d)
run = setup(cfg, records=records)
acc, state = run.accelerator, run.state
batch = 16  # the global batch: every process samples all of it alike, then keeps its rows
prompts, prompt_ids, fields = run.dataset.batch(list(range(batch)))
torch.manual_seed(1234)
with dist.whole(acc, run.policy):
    full = collect(run.model, run.reference, run.tokenizer, prompt_ids, prompts, fields, cfg.rollout, device=acc.device,
                   forward_batch_size=batch)
k = cfg.samples_per_prompt  # a process keeps whole groups of k rows: groups rank, rank + world, ...
mine = full.rows([g * k + j for g in range(acc.process_index, batch // k, acc.num_processes) for j in range(k)])
raw = score(mine, run.reward, acc)
scored = advantages(mine, raw, shape(mine, raw, state, cfg, acc), state.kl_controller.value, cfg.ppo,
                    reduce=dist.summer(acc), group_size=k)
stats = update(run.policy, run.optimizer, run.scheduler, acc, scored, state, cfg, run.generator)
with dist.whole(acc, run.policy):  # ZeRO-3's shards gathered
    if acc.is_main_process:
        save_file({k: p.detach().contiguous() for k, p in run.model.named_parameters() if p.requires_grad}, out)
        print("policy_loss", stats["policy_loss"], "lr", run.scheduler.get_last_lr()[0], flush=True)
acc.wait_for_everyone()
if acc.num_processes > 1:
    dist.exit_process(0)  # as the CLI does: no interpreter finalisation (tests/test_distributed.py, accelerate_launch)
