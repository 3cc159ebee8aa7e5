"""A tiny Llama-family model, written as a real GGUF file with seeded random weights, so tests run
the very conversion path the real model takes (GGUF -> weights -> ONNX) in a second."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize
from tokenizers import pre_tokenizers

TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 128}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ a"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _vocab() -> tuple[list[str], list[int]]:
    """Byte-level alphabet (256), the ChatML specials (control), then the merged tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = alphabet + SPECIALS + merged
    types = [1] * len(alphabet) + [3] * len(SPECIALS) + [1] * len(merged)
    return tokens, types


def write_tiny_gguf(
    path: Path, seed: int = 0, weights: Literal["f32", "q4_1", "q5_0"] = "f32", arch: str = "llama", context: int = 256
) -> Path:
    """Write the tiny model. `q4_1` stores matrices as Q4_1 and the embedding as Q8_0, like SmolLM2;
    `q5_0` (a format kvmesh does not map) and another `arch` exist to test refusals."""
    matrix_type = {"f32": QT.F32, "q4_1": QT.Q4_1, "q5_0": QT.Q5_0}[weights]
    rng = np.random.default_rng(seed)
    tokens, types = _vocab()
    h, ffn, layers, heads, kvh = TINY["hidden"], TINY["ffn"], TINY["layers"], TINY["heads"], TINY["kv_heads"]
    hd = h // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kvh)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)

    def matrix(name: str, rows: int, cols: int, q: QT = matrix_type) -> None:
        m = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if matrix_type == QT.F32:
            w.add_tensor(name, m)
        else:
            w.add_tensor(name, quantize(m, q), raw_dtype=q)

    def norm(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), h, QT.Q8_0)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", h, h)
        matrix(f"blk.{i}.attn_k.weight", kvh * hd, h)
        matrix(f"blk.{i}.attn_v.weight", kvh * hd, h)
        matrix(f"blk.{i}.attn_output.weight", h, h)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", ffn, h)
        matrix(f"blk.{i}.ffn_up.weight", ffn, h)
        matrix(f"blk.{i}.ffn_down.weight", h, ffn)
    norm("output_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
