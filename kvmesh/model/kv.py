"""A model's KV layout and a sequence's KV: numpy only, so what stores, sends or receives KV
(the prefix store, kv_transfer) never imports ONNX Runtime."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KVLayout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize


@dataclass
class KVCache:
    """keys[i], values[i]: (batch, kv_heads, tokens, head_dim) for layer i."""

    keys: list[np.ndarray]
    values: list[np.ndarray]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[2])

    def prefix(self, tokens: int) -> KVCache:
        """The KV of the first `tokens` positions (views, no copy)."""
        return KVCache([k[:, :, :tokens] for k in self.keys], [v[:, :, :tokens] for v in self.values])

    def astype(self, dtype: np.dtype) -> KVCache:
        """This KV in `dtype` (itself when it is already: KV off the wire may be float16)."""
        if self.keys[0].dtype == dtype:
            return self
        return KVCache([k.astype(dtype) for k in self.keys], [v.astype(dtype) for v in self.values])

    @staticmethod
    def empty(layout: KVLayout, batch: int = 1) -> KVCache:
        shape = (batch, layout.kv_heads, 0, layout.head_dim)
        return KVCache(
            [np.zeros(shape, layout.dtype) for _ in range(layout.layers)],
            [np.zeros(shape, layout.dtype) for _ in range(layout.layers)],
        )
