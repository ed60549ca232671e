#!/usr/bin/env python
"""Exploration behind docs/PERFORMANCE.md ("Learning is not traded for speed"): ppo-lm's half of the stories
parity run (benchmarks/learning_parity.py --pretrained, no TRL) with other value estimators, patched in for the run
only. Prints one JSON line per seed: the mean reward of the last 5 iterations and the explained variance.

    .venv/bin/python benchmarks/value_variants.py --seeds 0 1 2 3 4 --value-lr 3e-3 --head mlp
    .venv/bin/python benchmarks/value_variants.py --seeds 0 1 2 3 4 --critic-layers 2
    .venv/bin/python benchmarks/value_variants.py --seeds 0 1 2 3 4 --value-lr 9e-3 --set ppo.vf_coef=1.0

--head mlp: Linear(H, m*H) -> GELU -> Linear(m*H, 1) instead of ppo-lm's Linear(H, 1) (m = --mlp-width);
--detach: the value loss does not reach the trunk; --critic-layers N: a separate critic made of the policy's
first N layers (implies model.critic: policy); --set KEY=VALUE: any other config override, as on the ppo-lm command line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def patch_value_estimator(a) -> None:
    """Swap ppo-lm's value head for the variant ``a`` asks for (an MLP, a detached trunk) and, with
    ``--critic-layers``, cut the separate critic to that many layers."""
    from torch import nn

    import ppo_lm.models as models

    class Head(nn.Module):
        def __init__(self, hidden_size: int, init_std: float = 0.0):
            super().__init__()
            width = a.mlp_width * hidden_size
            self.net = (nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1)) if a.head == "mlp"
                        else nn.Sequential(nn.Linear(hidden_size, 1)))
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

        def forward(self, hidden):
            hidden = hidden.to(self.net[0].weight.dtype)
            return self.net(hidden.detach() if a.detach else hidden).squeeze(-1)

    models.ValueHead = Head
    if a.critic_layers:
        load = models.load_config_checked

        def truncated(path, *, kind, field, trust_remote_code):
            config = load(path, kind=kind, field=field, trust_remote_code=trust_remote_code)
            if field == "model.critic":
                config.num_hidden_layers = a.critic_layers
            return config

        models.load_config_checked = truncated


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--pretrained", default=str(ROOT.parent / "shared/assets/stories260K/hf"))
    ap.add_argument("--stories", default=str(ROOT.parent / "shared/assets/tinystories_text/tinystories_train_head.jsonl"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--value-lr", type=float, default=None)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--head", default="linear", choices=["linear", "mlp"])
    ap.add_argument("--mlp-width", type=int, default=1)
    ap.add_argument("--detach", action="store_true")
    ap.add_argument("--critic-layers", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override as on the ppo-lm command line (e.g. ppo.vf_coef=1.0)")
    a = ap.parse_args()

    from learning_parity import ppo_lm_config, story_prompts
    from ppo_lm.config import apply_override, config_from_dict  # the command line's override rules
    from ppo_lm.trainer import train

    patch_value_estimator(a)
    prompts = story_prompts(a.pretrained, a.stories)
    for seed in a.seeds:
        with tempfile.TemporaryDirectory(prefix="ppo-lm-variants-") as tmp:
            shutil.copytree(a.pretrained, Path(tmp) / "policy")
            d = ppo_lm_config(tmp, a.iters, lr=a.lr, kl_coef=0.05, seed=seed, mixed_precision=a.mixed_precision,
                              value_lr=a.value_lr, critic=bool(a.critic_layers))
            for item in a.set:
                apply_override(d, item)
            metrics = train(config_from_dict(d), records=[{"prompt": p} for p in prompts]).metrics
        reward = [m["reward_mean"] for m in metrics]
        ev = [m["explained_variance"] for m in metrics]
        print(json.dumps({"seed": seed, "head": a.head, "mlp_width": a.mlp_width, "detach": a.detach,
                          "critic_layers": a.critic_layers, "value_lr": a.value_lr, "set": a.set,
                          "mixed_precision": a.mixed_precision, "last5": round(sum(reward[-5:]) / 5, 4),
                          "explained_variance_last5": round(sum(ev[-5:]) / 5, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
