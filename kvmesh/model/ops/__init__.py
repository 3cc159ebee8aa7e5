"""kvmesh's own ONNX Runtime kernels: a custom-op library (domain "kvmesh") built from the C++
beside this file by scripts/build_ops.sh, against ONNX Runtime's C API headers.

`DecodeAttention` (decode_attention.cc) is GroupQueryAttention for decode steps, reading each KV
head once for all its query heads; a folder's int8-activation decode graph uses it where the
library was built when the folder was prepared (kvmesh.json's decode_attention says which).
"""

from __future__ import annotations

from pathlib import Path

import onnx

DOMAIN = "kvmesh"
LIBRARY = Path(__file__).with_name("libkvmesh_ops.so")


def library() -> Path | None:
    """The built library, or None where it was not built (decode graphs then use GroupQueryAttention)."""
    return LIBRARY if LIBRARY.is_file() else None


def needs_library(graph: Path) -> bool:
    """Whether `graph` has kvmesh's operators (read without loading its weights)."""
    model = onnx.load(str(graph), load_external_data=False)
    return any(o.domain == DOMAIN for o in model.opset_import)
