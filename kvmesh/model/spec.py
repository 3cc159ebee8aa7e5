"""A Llama-family decoder described as plain numpy: hyper-parameters and weights.

Both the ONNX graph builder and the numpy reference forward pass read this one description, so a
test can hold the graph to the reference with the very same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvmesh.errors import ModelError

BLOCK = 32  # GGUF Q4_1 / Q8_0 block length along the input dimension (K)


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_eps: float
    context_length: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_heads * self.head_dim != self.hidden_size:
            raise ModelError("heads x head_dim must equal the hidden size")
        if self.num_heads % self.num_kv_heads:
            raise ModelError("query heads must be a multiple of KV heads")
        if self.head_dim % 2:
            raise ModelError("rotary embedding needs an even head_dim")


@dataclass(frozen=True)
class Dense:
    """A float weight, (out, in) as in y = x @ w.T."""

    w: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.w.shape[0]), int(self.w.shape[1]))

    def dequantize(self) -> np.ndarray:
        return self.w


@dataclass(frozen=True)
class BlockQuant:
    """A weight in ONNX Runtime's MatMulNBits form: w[n, k] = (code - zero) * scale, per block of 32
    along k. packed: (N, K/32, 32*bits/8) uint8, codes low-first; scales: (N, K/32) float32;
    zeros: (N, K/32) float32 for 4 bits (float zero points carry Q4_1's min exactly) or uint8 for 8."""

    bits: int
    packed: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.packed.shape[0]), int(self.packed.shape[1]) * BLOCK)

    def codes(self) -> np.ndarray:
        """(N, K/32, 32) uint8 codes."""
        if self.bits == 8:
            return self.packed
        low, high = self.packed & 0x0F, self.packed >> 4
        return np.stack([low, high], axis=-1).reshape(*self.packed.shape[:2], BLOCK)

    def dequantize(self) -> np.ndarray:
        zeros = self.zeros.astype(np.float32)[..., None]
        w: np.ndarray = (self.codes().astype(np.float32) - zeros) * self.scales[..., None]
        return w.reshape(self.shape)


Linear = Dense | BlockQuant


def concat_rows(parts: list[Linear]) -> Linear:
    """Stack weights along N (output features): fused QKV and gate+up. Exact for both forms."""
    if all(isinstance(p, Dense) for p in parts):
        return Dense(np.concatenate([p.w for p in parts if isinstance(p, Dense)]))
    quant = [p for p in parts if isinstance(p, BlockQuant)]
    if len(quant) != len(parts) or len({p.bits for p in quant}) != 1:
        raise ModelError("cannot fuse weights of different precisions")
    return BlockQuant(
        quant[0].bits,
        np.concatenate([p.packed for p in quant]),
        np.concatenate([p.scales for p in quant]),
        np.concatenate([p.zeros for p in quant]),
    )


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # (hidden,)
    q: Linear  # (heads*head_dim, hidden), rows in HF order (rotate-half RoPE)
    k: Linear  # (kv_heads*head_dim, hidden)
    v: Linear
    o: Linear  # (hidden, heads*head_dim)
    ffn_norm: np.ndarray
    gate: Linear  # (intermediate, hidden)
    up: Linear
    down: Linear  # (hidden, intermediate)


@dataclass(frozen=True)
class LlamaWeights:
    config: LlamaConfig
    embed: Linear  # (vocab, hidden); also the output projection when lm_head is None (tied)
    layers: list[LayerWeights]
    final_norm: np.ndarray
    lm_head: Linear | None
