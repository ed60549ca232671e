"""ppo-lm: fine-tune Hugging Face causal language models with PPO (RLHF).

Public API::

    from ppo_lm import Config, load_config, train
    cfg = load_config("examples/sentiment.yaml", ["ppo.lr=1e-5"])
    result = train(cfg)                       # or train(cfg, reward_fn=my_reward, records=[{"prompt": ...}])
    result = train(cfg, env=MyTextEnv)        # episodes of a text environment (ppo_lm.envs, docs/envs.md)
"""

from . import envs  # registers the shipped text environments with gymnasium (ppo_lm/guess-number, ...)
from .config import Config, config_from_dict, load_config
from .errors import UserError
from .rewards import RewardFn

__version__ = "0.1.0"


def train(cfg, **kwargs):
    """Run PPO; see :func:`ppo_lm.trainer.train`."""
    from .trainer import train as _train

    return _train(cfg, **kwargs)


__all__ = ["Config", "envs", "RewardFn", "UserError", "config_from_dict", "load_config", "train", "__version__"]
