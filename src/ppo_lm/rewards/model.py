"""A Hugging Face sequence-classification reward model as a reward source.

The model reads prompt + completion with its own tokenizer. With one label its logit is the score; with two
labels the score is ``logit[1] - logit[0]`` (the log-odds of the positive class, e.g. for a sentiment model).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..models import DTYPES, _no_dropout_config, load_config_checked, load_tokenizer, prepare_model


class RewardModel:
    def __init__(self, path: str, *, device=None, dtype: str = "float32", batch_size: int = 32,
                 max_length: int = 1024, trust_remote_code: bool = False, field: str = "reward.sources.path"):
        from transformers import AutoModelForSequenceClassification

        config = _no_dropout_config(load_config_checked(path, kind="classifier", field=field,
                                                        trust_remote_code=trust_remote_code))
        if config.num_labels not in (1, 2):
            raise UserError(f"reward model {path!r} has {config.num_labels} labels; use a 1-label (score) or "
                            "2-label (negative/positive) classifier", field)
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, notice=lambda _msg: None)
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=DTYPES[dtype],
                                                                        trust_remote_code=trust_remote_code)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        prepare_model(self.model)
        self.model.eval().requires_grad_(False)
        self.device = device or torch.device("cpu")
        self.model.to(self.device)
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def __call__(self, prompts, completions, fields):
        texts = [p + c for p, c in zip(prompts, completions)]
        scores = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s:s + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)
            logits = self.model(**enc).logits.float()
            scores.append(logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0])
        return torch.cat(scores).cpu()
