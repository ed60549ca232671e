"""Loading the policy (any ``AutoModelForCausalLM``) with a scalar value head, the reference model, and the
tokenizer. Nothing here knows PPO.

One forward of :class:`PolicyWithValue` returns the logits of the response tokens and the value of every
response state, computed from the same trunk pass. The reference is a frozen copy of the policy, or, with
LoRA, the policy itself with its adapters disabled, so no second copy of the weights exists.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import os
import sys
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import UserError
from .gguf_source import as_folder, check_gguf, is_gguf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ValueHead(nn.Module):
    """A linear map from the last hidden state to a scalar value."""

    def __init__(self, hidden_size: int, init_std: float = 0.0):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=init_std) if init_std > 0 else nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that count only real tokens, so a left-padded prompt starts at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyWithValue(nn.Module):
    """Causal LM plus value head. ``forward`` computes, for the last ``n_response`` tokens of ``input_ids``,
    the logits that predicted them ``[B, T, V]`` and the values of the states before them ``[B, T]``.

    With ``critic`` set, values come from a separate trunk instead of the policy's own. Without a value head
    (the critic-free estimators), the values are None.
    """

    def __init__(self, lm: nn.Module, value_head: ValueHead | None, critic: nn.Module | None = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.critic = critic

    @property
    def reads_hidden_states(self) -> bool:
        """The value head reads the policy's own final hidden states (no separate critic, and a value head)."""
        return self.critic is None and self.value_head is not None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, n_response: int) -> tuple[Tensor, Tensor | None]:
        logits, hidden = lm_forward(self.lm, input_ids, attention_mask, n_response,
                                    want_hidden=self.reads_hidden_states)
        if self.value_head is None:
            return logits, None
        if self.critic is not None:
            return logits, self.critic_values(input_ids, attention_mask, n_response)
        return logits, self.value_head(hidden)

    def critic_values(self, input_ids: Tensor, attention_mask: Tensor, n_response: int) -> Tensor:
        """Values ``[B, T]`` from the separate critic's trunk (``critic`` set)."""
        out = self.critic(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return self.value_head(out.last_hidden_state[:, -n_response - 1 : -1])

    @property
    def _no_split_modules(self) -> list[str]:
        """The transformer-block classes of the trunks, as transformers names them for each model: what FSDP's
        transformer-based wrap shards unit by unit (the policy and value head are not a transformers model)."""
        trunks = [base_model(m) for m in (self.lm, self.critic) if m is not None]
        return sorted({name for t in trunks for name in (getattr(t, "_no_split_modules", None) or [])})

    @contextlib.contextmanager
    def adapters_disabled(self):
        """The reference model, when the policy is a LoRA model: the same weights with adapters off."""
        with self.lm.disable_adapter():
            yield self.lm


def base_model(lm: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper, or ``lm`` itself when it has none."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


@functools.lru_cache(maxsize=None)
def _logits_to_keep(model_class: type) -> str | None:
    """How a model class's forward takes ``logits_to_keep``: "positions" (an int or a tensor of positions, as
    in transformers' own models), "last" (an int only: the last k positions), or None (not at all)."""
    param = inspect.signature(model_class.forward).parameters.get("logits_to_keep")
    if param is None:
        return None
    return "positions" if "Tensor" in str(param.annotation) else "last"


def lm_forward(lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, n_response: int, *,
               want_hidden: bool = False) -> tuple[Tensor, Tensor | None]:
    """Logits ``[B, T, V]`` predicting the last ``T = n_response`` tokens, and (optionally) the last hidden
    states ``[B, T, H]`` at the same positions. Only those ``T`` positions go through the LM head, so the
    vocabulary projection is never paid for the prompt, and their hidden states are gathered into one
    contiguous block first (keeping the last T + 1 positions and slicing made the head, under LoRA, a batched
    matmul of the weight expanded over the batch, and the slice's backward fill a ``[B, T + 1, V]`` gradient of
    zeros)."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                  output_hidden_states=want_hidden)
    keep = _logits_to_keep(type(base_model(lm)))
    length = input_ids.shape[1]
    if keep == "positions":
        kwargs["logits_to_keep"] = torch.arange(length - n_response - 1, length - 1, device=input_ids.device)
    elif keep == "last":
        kwargs["logits_to_keep"] = n_response + 1
    out = lm(**kwargs)
    logits = out.logits if keep == "positions" else out.logits[:, -n_response - 1 : -1]
    hidden = out.hidden_states[-1][:, -n_response - 1 : -1] if want_hidden else None
    return logits, hidden


def attention_kernel(device: torch.device, mixed_precision: str, seq_len: int):
    """On CPU in bf16, PyTorch's flash-attention backward is 1.6-2.6x slower than the plain math kernel for
    sequences up to 128 tokens, and faster beyond (benchmarks/sdpa_backward.py); pick the faster one."""
    if device.type == "cpu" and mixed_precision == "bf16" and seq_len <= 128:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def disable_dropout(model: nn.Module) -> None:
    """RL needs the same function in rollout and update: no dropout anywhere."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout_rate"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def fuse_gelu(model: nn.Module) -> None:
    """Replace transformers' ``NewGELUActivation`` (GPT-2's "gelu_new": the tanh approximation written as eight
    elementwise operations, each a pass over the MLP's activations forward and more backward) with the same
    function as one fused kernel, ``nn.GELU(approximate="tanh")``: forward + backward of a 16 x 48 x 1024
    activation 5.4 -> 1.1 ms on CPU. The model's config is left as it is, so a saved model is unchanged."""
    from transformers.activations import NewGELUActivation

    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, nn.GELU(approximate="tanh"))


def prepare_model(model: nn.Module) -> None:
    """What every model ppo-lm loads gets: no dropout (RL needs the same function in rollout and update) and
    the fused GELU."""
    disable_dropout(model)
    fuse_gelu(model)


def no_dropout_config(config):
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    return config


#: The files a transformers folder may keep its weights in, in the order transformers prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: A folder with none of these has no tokenizer (transformers would build an empty one from config.json alone).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


#: Folders that passed :func:`check_model_files`, with the (name, size, mtime) of their files then: a command
#: checks a folder before its tokenizer and again when it loads the weights, and a PyTorch zip's CRC check reads
#: the whole file, so an unchanged folder is checked once per process.
_CHECKED: set[tuple] = set()


def check_model_files(name_or_path: str, field: str) -> None:
    """A local model folder is usable before any weights are read: ``config.json`` is a JSON object and every
    weight file is there and whole (a safetensors file's header must describe exactly the bytes it has; a
    PyTorch zip must pass its CRC check). A hub name passes (it is checked when it is fetched)."""
    if is_gguf(name_or_path):
        return check_gguf(name_or_path, field)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a transformers model folder", field)
    seen = (str(path.resolve()), tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                                              for e in os.scandir(path) if e.is_file())))
    if seen not in _CHECKED:
        _check_folder(path, field)
        _CHECKED.add(seen)


def _check_folder(path: Path, field: str) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{config} is missing: a transformers model folder has a config.json", field)
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config} is not valid JSON ({e})", field) from None
    if not isinstance(data, dict):
        raise UserError(f"{config} must hold a JSON object, not {type(data).__name__}", field)
    for weights in _weight_files(path, field):
        if weights.suffix == ".safetensors":
            _check_safetensors(weights, field)
        else:
            _check_torch_zip(weights, field)


def _weight_files(folder: Path, field: str) -> list[Path]:
    name = next((n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if name is None:
        raise UserError(f"{folder} has no weights (none of {', '.join(WEIGHT_FILES)})", field)
    if not name.endswith(".index.json"):
        return [folder / name]
    index = folder / name
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{index} is not a valid weight index (a JSON object with a weight_map)", field) from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise UserError(f"{folder / missing[0]} is missing ({len(missing)} of the {len(shards)} shards that {name} "
                        "names)", field)
    return [folder / s for s in shards]


def _check_safetensors(file: Path, field: str) -> None:
    """The safetensors layout: an 8-byte little-endian header size, a JSON header, then the tensors' bytes,
    whose offsets the header gives."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise UserError(f"{file} is truncated or not a safetensors file ({size} bytes)", field)
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError, IndexError):
            raise UserError(f"{file} is corrupt: its header is not a valid safetensors header", field) from None
    if 8 + n + end != size:
        raise UserError(f"{file} is truncated or damaged: its header describes {8 + n + end} bytes, the file has "
                        f"{size}", field)


def _check_torch_zip(file: Path, field: str) -> None:
    try:
        with zipfile.ZipFile(file) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError):
        raise UserError(f"{file} is truncated or not a PyTorch checkpoint (not a readable zip archive)", field) from None
    if bad is not None:
        raise UserError(f"{file} is corrupt: its member {bad} fails its CRC check", field)


def local_model(name_or_path: str, field: str) -> str:
    """Where to load ``name_or_path`` from: itself, or for a GGUF file the transformers folder it is converted
    to once (:mod:`ppo_lm.gguf_source`)."""
    if not is_gguf(name_or_path):
        return name_or_path
    return as_folder(name_or_path, field, notice=lambda m: print(m, file=sys.stderr))


def from_pretrained(auto_class, name_or_path: str, *, field: str, **kwargs):
    """``auto_class.from_pretrained`` with the ways a checked folder can still fail to load (a tensor of the
    wrong shape, a damaged tensor) reported as one line naming the folder."""
    from safetensors import SafetensorError

    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the model weights in {name_or_path!r}: {first}", field) from None


def load_config_checked(name_or_path: str, *, kind: str, field: str, trust_remote_code: bool):
    """Load a transformers config and check that it is of the expected kind (``causal`` or ``classifier``),
    before any weights are read."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    check_model_files(name_or_path, field)
    name_or_path = local_model(name_or_path, field)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load a transformers model config from {name_or_path!r}: {first}", field) from None
    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if kind == "causal" else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    archs = getattr(config, "architectures", None) or []
    suffix = "ForCausalLM" if kind == "causal" else "ForSequenceClassification"
    ok_arch = not archs or any(a.endswith(suffix) or (kind == "causal" and a.endswith("LMHeadModel")) for a in archs)
    if (config.model_type not in names and not trust_remote_code) or not ok_arch:
        what = "a causal language model" if kind == "causal" else "a sequence-classification (reward) model"
        raise UserError(f"{name_or_path!r} is not {what} (model_type {config.model_type!r}, "
                        f"architectures {archs or 'unknown'})", field)
    return config


def context_length(model_config) -> int | None:
    """The model's context in tokens, from its transformers config (None when the config does not say)."""
    return next((getattr(model_config, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                 if isinstance(getattr(model_config, k, None), int)), None)


def check_causal_lm(name_or_path: str, field: str, *, trust_remote_code: bool = False) -> None:
    """The folder holds a loadable causal LM (files whole, config of a causal-LM kind); no weights are read."""
    load_config_checked(name_or_path, kind="causal", field=field, trust_remote_code=trust_remote_code)


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, notice=print,
                   field: str = "model.tokenizer"):
    """Tokenizer with a pad token (EOS is reused, with a notice, when there is none) and left padding."""
    from transformers import AutoTokenizer

    name_or_path = local_model(name_or_path, field)
    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})", field)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions for a damaged tokenizer.json
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load a tokenizer from {name_or_path!r}: {type(e).__name__}: {first}", field) from None
    if len(tok) < 2:
        raise UserError(f"the tokenizer in {name_or_path!r} has {len(tok)} token(s): its vocabulary files are missing",
                        field)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token", "model.tokenizer")
        notice(f"note: tokenizer {name_or_path!r} has no pad token; using its EOS token {tok.eos_token!r} as pad")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_pretrained(auto_class, name_or_path: str, *, kind: str, field: str, dtype: str = "float32",
                    trust_remote_code: bool = False, config=None, **kwargs):
    """The one way every role loads a Hugging Face model: the files checked and the config checked to be of
    ``kind`` (``causal`` or ``classifier``) before any weights are read, dropout off, safetensors preferred,
    load errors as one line naming ``field``, and the model prepared for training (:func:`prepare_model`).
    ``config`` replaces the checked config (a caller that edits it first passes it back); ``kwargs`` go to
    ``from_pretrained``."""
    if config is None:
        config = load_config_checked(name_or_path, kind=kind, field=field, trust_remote_code=trust_remote_code)
    name_or_path = local_model(name_or_path, field)
    model = from_pretrained(auto_class, name_or_path, field=field, config=no_dropout_config(config),
                            dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                            use_safetensors=_safetensors(name_or_path), **kwargs)
    prepare_model(model)
    return model


def load_causal_lm(name_or_path: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                   field: str = "model.name_or_path"):
    """A causal LM (the policy, the reference, an SFT or evaluated model) by :func:`load_pretrained`."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, name_or_path, kind="causal", field=field, dtype=dtype,
                           trust_remote_code=trust_remote_code)


def _safetensors(name_or_path: str) -> bool | None:
    """Prefer safetensors; for a local folder insist on it when it has a .safetensors file."""
    p = Path(name_or_path)
    if p.is_dir():
        return True if any(p.glob("*.safetensors")) else None
    return None


def apply_lora(model: nn.Module, lora_cfg, task_type: str) -> nn.Module:
    """Wrap ``model`` with trainable LoRA adapters (peft) as set in a :class:`~ppo_lm.config.LoraConfig`;
    the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    if lora_cfg.last_layers is not None:
        targets = last_layers_linears(model, lora_cfg.last_layers, targets)
    return get_peft_model(model, LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                            target_modules=targets, task_type=task_type, bias="none"))


def last_layers_linears(model: nn.Module, n: int, targets: list[str] | str) -> list[str]:
    """The full names of the linear modules to adapt in the last ``n`` transformer blocks: all of them for
    "all-linear", else those whose name ends with one of ``targets``. The blocks are the model's longest
    ``ModuleList`` (the decoder layers of every transformers LM)."""
    blocks = max(((name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)),
                 key=lambda item: len(item[1]), default=(None, []))
    if not len(blocks[1]):
        raise UserError(f"{type(model).__name__} has no list of layers to pick the last ones from",
                        "model.lora.last_layers")
    name, layers = blocks
    if n > len(layers):
        raise UserError(f"is {n}, but the model has {len(layers)} layers", "model.lora.last_layers")
    out = [f"{name}.{i}.{sub}" for i in range(len(layers) - n, len(layers))
           for sub in lora_targets(layers[i], targets)]
    if not out:
        raise UserError(f"no module of the last {n} layers matches model.lora.target_modules ({targets})",
                        "model.lora.last_layers")
    return out


def lora_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The names of the linear modules (``nn.Linear`` or GPT-2's ``Conv1D``) of ``model`` that LoRA adapts:
    for "all-linear" every one but the output head (as peft does), else those whose name ends with one of
    ``targets``."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wanted = None if targets == "all-linear" else ([targets] if isinstance(targets, str) else list(targets))
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head
            and (wanted is None or any(name == w or name.endswith("." + w) for w in wanted))]


def save_merged(model: nn.Module, tokenizer, path: str | Path, state_dict: dict | None = None) -> Path:
    """Save a model (LoRA adapters merged in first) and its tokenizer as a plain transformers folder; the
    weights are ``state_dict`` where given, else the model's own (gathered under FSDP2)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    model.save_pretrained(path, safe_serialization=True, state_dict=state_dict or gathered_state_dict(model))
    tokenizer.save_pretrained(path)
    return path


def gathered_state_dict(model: nn.Module) -> dict | None:
    """The weights of a model that FSDP2 shards, as the whole tensors it holds inside
    :func:`ppo_lm.distributed.whole`; None (``state_dict()`` as usual) for any other model. FSDP2's
    ``state_dict()`` always answers with shards (its hook reshards first), so the tensors are read directly:
    parameters (tied ones once) and the persistent buffers."""
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return None
    state = {name: p.detach().clone() for name, p in model.named_parameters()}  # a copy: saving may reshard
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[f"{prefix}.{name}" if prefix else name] = buffer.clone()
    return state


def load_policy(model_cfg, *, value_head: bool = True, notice=print) -> PolicyWithValue:
    """Build the trainable :class:`PolicyWithValue` from a :class:`~ppo_lm.config.ModelConfig`; ``value_head``
    False: the policy alone (a critic-free estimator)."""
    lm = load_causal_lm(model_cfg.name_or_path, dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
    if model_cfg.lora.enabled:
        lm = apply_lora(lm, model_cfg.lora, "CAUSAL_LM")
    critic = None
    hidden_size = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
    if model_cfg.critic:
        from transformers import AutoModel

        path = model_cfg.name_or_path if model_cfg.critic == "policy" else model_cfg.critic
        critic = load_pretrained(AutoModel, path, kind="causal", field="model.critic", dtype=model_cfg.dtype,
                                 trust_remote_code=model_cfg.trust_remote_code)
        hidden_size = critic.config.hidden_size
    head = ValueHead(hidden_size, model_cfg.value_head_init_std) if value_head else None
    return PolicyWithValue(lm, head, critic)


class Reference:
    """The reference model's role: the policy as it started. A frozen copy of the policy's LM, or, when the
    policy trains LoRA adapters, the policy itself with its adapters off (no second copy of the weights).
    ``with reference.lm() as lm:`` gives the LM to run a forward with."""

    def __init__(self, policy: PolicyWithValue):
        self.policy = policy
        self.copy: nn.Module | None = None
        if not is_lora(policy):
            self.copy = copy.deepcopy(policy.lm).requires_grad_(False).eval()

    @property
    def shares_weights(self) -> bool:
        """True when the reference is the policy with its adapters off."""
        return self.copy is None

    @contextlib.contextmanager
    def lm(self):
        if self.copy is not None:
            yield self.copy
        else:
            with self.policy.adapters_disabled() as base:
                yield base

    def to(self, device) -> "Reference":
        if self.copy is not None:
            self.copy.to(device)
        return self


def make_reference(policy: PolicyWithValue) -> Reference:
    """The reference for ``policy`` (see :class:`Reference`)."""
    return Reference(policy)


def is_lora(policy: PolicyWithValue) -> bool:
    return hasattr(policy.lm, "disable_adapter") and hasattr(policy.lm, "peft_config")


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def parameter_groups(policy: PolicyWithValue, lr: float, value_lr: float | None) -> list[dict]:
    """Optimiser parameter groups: the policy's trainable weights at ``lr``; the value head (and separate
    critic) at ``value_lr``, or in the same group when it is None."""
    if value_lr is None:
        return [{"params": trainable_parameters(policy), "lr": lr}]
    value_side = [p for m in (policy.value_head, policy.critic) if m is not None for p in m.parameters()]
    ids = {id(p) for p in value_side}
    groups = [{"params": [p for p in trainable_parameters(policy) if id(p) not in ids], "lr": lr},
              {"params": [p for p in value_side if p.requires_grad], "lr": value_lr}]
    return [g for g in groups if g["params"]]  # no value side without a critic


def save_policy(policy: PolicyWithValue, tokenizer, out_dir: str | Path) -> None:
    """Write the policy so that plain ``transformers`` loads it: LoRA adapters are merged into the weights;
    safetensors; tokenizer beside it; the value head (if any) as ``value_head.safetensors``."""
    from safetensors.torch import save_file

    lm = copy.deepcopy(policy.lm) if is_lora(policy) else policy.lm  # merging must not touch the live policy
    whole = gathered_state_dict(policy) or {}  # FSDP2's weights, read before saving reshards any of them
    part = lambda prefix: {k.removeprefix(prefix): v for k, v in whole.items() if k.startswith(prefix)}  # noqa: E731
    out = save_merged(lm, tokenizer, out_dir, state_dict=part("lm.") or None)
    if policy.value_head is None:
        return
    head = part("value_head.") or policy.value_head.state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(out / "value_head.safetensors"))
