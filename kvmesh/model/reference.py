"""A plain numpy forward pass of a Llama GGUF, written the way llama.cpp computes it (GGUF row order,
interleaved rotary), independent of our graph builder. Tests hold the ONNX graph to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvmesh.model.gguf_import import GGUFSource, unpermute_rope_rows
from kvmesh.model.spec import Dense

KV = list[tuple[np.ndarray, np.ndarray]]  # per layer (key, value), each (kv_heads, T, head_dim)


class ReferenceLlama:
    def __init__(self, gguf_path: Path) -> None:
        self.src = GGUFSource(gguf_path)
        self.cfg = self.src.config()
        self._w: dict[str, np.ndarray] = {}

    def _m(self, name: str) -> np.ndarray:
        if name not in self._w:
            lin = self.src.linear(name, "fp32")
            assert isinstance(lin, Dense)
            self._w[name] = lin.w.astype(np.float64)
        return self._w[name]

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        w = self.src.vector(name).astype(np.float64)
        normed: np.ndarray = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.cfg.rms_eps) * w
        return normed

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x (heads, S, hd); rotates adjacent pairs (2i, 2i+1) by position * theta^(-2i/hd)."""
        hd = x.shape[-1]
        freqs = positions[:, None] * self.cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)
        cos, sin = np.cos(freqs), np.sin(freqs)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return out

    def forward(self, ids: list[int], past: KV | None = None) -> tuple[np.ndarray, KV]:
        """ids of S new tokens after `past` -> logits (S, vocab), KV for all T tokens."""
        c = self.cfg
        p = 0 if past is None else past[0][0].shape[1]
        positions = np.arange(p, p + len(ids), dtype=np.float64)
        x = self._m("token_embd.weight")[ids]
        present: KV = []
        for i in range(c.num_layers):
            h = self._norm(x, f"blk.{i}.attn_norm.weight")
            q, k, v = (h @ self._m(f"blk.{i}.attn_{n}.weight").T for n in "qkv")
            q = self._rope(q.reshape(len(ids), c.num_heads, c.head_dim).transpose(1, 0, 2), positions)
            k = self._rope(k.reshape(len(ids), c.num_kv_heads, c.head_dim).transpose(1, 0, 2), positions)
            v = v.reshape(len(ids), c.num_kv_heads, c.head_dim).transpose(1, 0, 2)
            if past is not None:
                k, v = np.concatenate([past[i][0], k], 1), np.concatenate([past[i][1], v], 1)
            present.append((k, v))
            x = x + self._attend(q, k, v, p) @ self._m(f"blk.{i}.attn_output.weight").T
            h = self._norm(x, f"blk.{i}.ffn_norm.weight")
            g, u = h @ self._m(f"blk.{i}.ffn_gate.weight").T, h @ self._m(f"blk.{i}.ffn_up.weight").T
            x = x + (g / (1 + np.exp(-g)) * u) @ self._m(f"blk.{i}.ffn_down.weight").T
        logits = self._norm(x, "output_norm.weight") @ self._m("token_embd.weight").T
        return logits, present

    def _attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, p: int) -> np.ndarray:
        """q (heads, S, hd), k/v (kv_heads, T, hd) -> (S, heads*hd), causal from offset p."""
        group = self.cfg.num_heads // self.cfg.num_kv_heads
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        s, t = q.shape[1], k.shape[1]
        scores = np.where(np.arange(t)[None, :] <= p + np.arange(s)[:, None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out: np.ndarray = (probs / probs.sum(-1, keepdims=True)) @ v
        return out.transpose(1, 0, 2).reshape(s, -1)

    def key_in_hf_order(self, key: np.ndarray) -> np.ndarray:
        """Reference keys are in GGUF (interleaved) head_dim order; the graph's are HF order."""
        flat = Dense(key.transpose(1, 0, 2).reshape(key.shape[1], -1).T)
        rows = unpermute_rope_rows(flat, key.shape[0], key.shape[2])
        assert isinstance(rows, Dense)
        return rows.w.T.reshape(key.shape[1], key.shape[0], key.shape[2]).transpose(1, 0, 2)
