"""Small models the project builds itself: a word-level tokenizer from a word list and a random-init GPT-2 of
any shape, both saved as ordinary transformers folders. Used by the demo, the benchmark and the tests, so that
nothing needs a model hub."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]


def word_tokenizer(words: list[str], *, model_max_length: int = 512):
    """A ``PreTrainedTokenizerFast`` over whitespace/punctuation-split words, with pad/eos/unk tokens.
    Decoding joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   bos_token="<eos>", model_max_length=model_max_length)
    fast.padding_side = "left"
    return fast


def gpt2(tokenizer, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, n_positions: int = 128,
         vocab_size: int | None = None, seed: int = 0):
    """A random-init ``GPT2LMHeadModel`` sized for ``tokenizer`` (dropout off)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        vocab_size=vocab_size or len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
