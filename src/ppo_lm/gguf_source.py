"""GGUF files as a model source. ``model.name_or_path`` (and every other model path) may name a ``.gguf`` file:
transformers reads it with the ``gguf`` package and dequantises it to float; ppo-lm saves that once as a plain
transformers folder (safetensors, tokenizer and chat template beside it, the quantisation config stripped, since the
weights are not quantised any more) in its cache, and every later load reads the folder. Training, checkpoints and
saved models are then those of any transformers model.

The cached folder is keyed by the file's resolved path, size and modification time, so an edited file is converted
again; several processes of one launch convert it once (a file lock), and a conversion cut short leaves nothing
that a later run would take for whole (a temporary folder, renamed when complete).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from .errors import UserError

MAGIC = b"GGUF"


def is_gguf(name_or_path: str | None) -> bool:
    return bool(name_or_path) and str(name_or_path).lower().endswith(".gguf")


def check_gguf(path: str | Path, field: str) -> None:
    """The file is there and starts as a GGUF file does; nothing else is read."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"no such GGUF file: {p}", field)
    with p.open("rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise UserError(f"{p} is not a GGUF file (it does not start with {MAGIC.decode()!r})", field)


def cached_folder(path: str | Path) -> Path:
    """Where the transformers copy of the GGUF file ``path`` is (or will be) kept."""
    from .runtime import cache_root

    p = Path(path).expanduser().resolve()
    stat = p.stat()
    key = hashlib.sha256(f"{p}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{p.stem}-{key}"


def as_folder(path: str | Path, field: str, *, notice=print) -> str:
    """The transformers folder holding the dequantised model of the GGUF file ``path`` (converted on first use)."""
    from filelock import FileLock

    check_gguf(path, field)
    folder = cached_folder(path)
    if (folder / "config.json").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "config.json").is_file():  # another process may have converted it meanwhile
            notice(f"converting {path} to a transformers folder (once; kept in {folder})")
            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                convert(path, tmp, field)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def convert(path: str | Path, out: Path, field: str) -> None:
    """Dequantise the GGUF file ``path`` into the transformers folder ``out`` (float32 weights in safetensors,
    the tokenizer with its chat template, no quantisation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise UserError("reading a GGUF file needs the 'gguf' package (pip install gguf)", field) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the GGUF model {p}: {first}", field) from None
    # Dequantised on load: the weights are plain floats now, and transformers refuses to save a model that still
    # says it is quantised.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
