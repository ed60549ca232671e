"""A Hugging Face sequence-classification reward model as a reward source.

The model reads prompt + completion with its own tokenizer, encoded by :func:`encode_for_reward`, the function
the reward-model stage trains with: the same chat template or none, the same special tokens, the same length
and the same truncation side (the end is kept). A model trained by ``ppo-lm reward-model`` records its choice in
its ``config.json`` (``ppo_lm_encoding``); any other model is read as plain text, cut to ``max_length`` from the
left. With one label its logit is the score; with two labels the score is ``logit[1] - logit[0]`` (the log-odds
of the positive class, e.g. for a sentiment model). A conversation prompt is read whole (``fields["prompt_messages"]``),
as the reward-model stage trained on it. With ``completion_only`` the model reads the completion alone, as a pointwise
reward model read each labelled text in training: a sentiment classifier that steers a continuation then scores
what the policy wrote, and a positive prompt followed by nothing earns nothing.
"""

from __future__ import annotations

import torch

from ..data import PROMPT_MESSAGES, right_padded
from ..errors import UserError
from ..models import load_config_checked, load_pretrained, load_tokenizer


#: The key in a reward model's config.json that records how its texts were encoded in training.
ENCODING_KEY = "ppo_lm_encoding"


def encode_for_reward(tokenizer, prompt: str | list[dict], completion: str, max_length: int, chat: bool) -> list[int]:
    """The token ids a reward model reads for ``prompt`` + ``completion``: with ``chat``, the pair as a
    user/assistant exchange in the tokenizer's chat template, otherwise the plain concatenation with the
    tokenizer's special tokens; cut to the last ``max_length`` tokens (the completion is at the end). A prompt that
    is a conversation (a list of messages) always goes through the template, the completion as the last turn.
    A text of no tokens reads as the end-of-text token alone (a model scores the last token of a row)."""
    if chat or isinstance(prompt, list):
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        messages = [*turns, {"role": "assistant", "content": completion}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt + completion)["input_ids"]
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    return ids[-max_length:] or [end]


class RewardModel:
    """A sequence-classification model as a reward source (``type: model``)."""

    options = ("path", "completion_only")

    @staticmethod
    def check(src):
        if not src.path:
            yield "path", "a 'model' reward needs path: a sequence-classification model folder or hub name"

    @classmethod
    def from_config(cls, src, *, device=None, key: str = "reward.sources.0"):
        return cls(src.path, device=device, field=f"{key}.path", completion_only=src.completion_only)

    def __init__(self, path: str, *, device=None, dtype: str = "float32", batch_size: int = 32,
                 max_length: int = 1024, trust_remote_code: bool = False, field: str = "reward.sources.path",
                 completion_only: bool = False):
        from transformers import AutoModelForSequenceClassification

        config = load_config_checked(path, kind="classifier", field=field, trust_remote_code=trust_remote_code)
        if config.num_labels not in (1, 2):
            raise UserError(f"reward model {path!r} has {config.num_labels} labels; use a 1-label (score) or "
                            "2-label (negative/positive) classifier", field)
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, notice=lambda _msg: None, field=field)
        self.tokenizer.padding_side = "right"
        self.model = load_pretrained(AutoModelForSequenceClassification, path, kind="classifier", field=field,
                                     config=config, dtype=dtype, trust_remote_code=trust_remote_code)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval().requires_grad_(False)
        self.device = device or torch.device("cpu")
        self.model.to(self.device)
        encoding = getattr(config, ENCODING_KEY, None) or {}
        self.chat = bool(encoding.get("chat_template", False))
        if self.chat and getattr(self.tokenizer, "chat_template", None) is None:
            raise UserError(f"reward model {path!r} was trained on chat-template texts, but its tokenizer has no "
                            "chat template", field)
        self.batch_size, self.max_length = batch_size, int(encoding.get("max_length", max_length))
        self.completion_only = completion_only

    @torch.no_grad()
    def __call__(self, prompts, completions, fields):
        conversations = fields.get(PROMPT_MESSAGES) or [None] * len(prompts)  # the whole dialogue where there is one
        if self.completion_only:
            prompts, conversations = [""] * len(prompts), [None] * len(prompts)
        rows = [encode_for_reward(self.tokenizer, turns or p, c, self.max_length, self.chat)
                for p, c, turns in zip(prompts, completions, conversations)]
        scores = []
        for s in range(0, len(rows), self.batch_size):
            ids, mask = right_padded(rows[s:s + self.batch_size], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            scores.append(logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0])
        return torch.cat(scores).cpu()
