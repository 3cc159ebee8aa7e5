"""GGUF block formats mapped, without requantizing, onto ONNX Runtime's MatMulNBits form.

Q4_1 block (20 B): d fp16, m fp16, 16 bytes of nibbles; byte j holds element j (low) and j+16
(high); w = d*q + m = d*(q - (-m/d)), so scale d and float zero point -m/d reproduce it.
Q4_0 block (18 B): d fp16, 16 bytes of nibbles, w = d*(q - 8).
Q8_0 block (34 B): d fp16, 32 int8; w = d*q = d*((q+128) - 128): uint8 code, zero point 128.
MatMulNBits wants codes packed low-first in element order: element 2i low, 2i+1 high.
"""

from __future__ import annotations

import numpy as np

from kvmesh.model.spec import BLOCK, BlockQuant


def _blocks(raw: np.ndarray, n: int, block_bytes: int) -> np.ndarray:
    """(N, bytes) uint8 GGUF rows -> (N, K/32, block_bytes)."""
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, -1, block_bytes)


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    """(N, K/32) float32 from the fp16 stored at byte offset `at` of every block."""
    return np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """(N, K/32, 16) GGUF nibble bytes -> (N, K/32, 32) codes in element order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def pack4(codes: np.ndarray) -> np.ndarray:
    """(..., 2m) 4-bit codes -> (..., m) bytes, element 2i in the low nibble (MatMulNBits order).
    An odd count is padded with a zero code."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), codes.dtype)], axis=-1)
    packed: np.ndarray = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed


def q4_1(raw: np.ndarray, n: int) -> BlockQuant:
    blocks = _blocks(raw, n, 20)
    d, m = _fp16(blocks, 0), _fp16(blocks, 2)
    codes = _split_nibbles(blocks[..., 4:])
    # A block with d == 0 holds m everywhere: code 0, scale 1, zero -m gives exactly m.
    flat = d == 0
    codes[flat] = 0
    scales = np.where(flat, np.float32(1.0), d)
    zeros = np.where(flat, -m, -m / np.where(flat, 1.0, d)).astype(np.float32)
    return BlockQuant(4, pack4(codes), scales, zeros)


def q4_0(raw: np.ndarray, n: int) -> BlockQuant:
    blocks = _blocks(raw, n, 18)
    codes = _split_nibbles(blocks[..., 2:])
    zeros = np.full(codes.shape[:2], 8.0, np.float32)
    return BlockQuant(4, pack4(codes), _fp16(blocks, 0), zeros)


def q8_0(raw: np.ndarray, n: int) -> BlockQuant:
    blocks = _blocks(raw, n, 2 + BLOCK)
    codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    zeros = np.full(codes.shape[:2], 128, np.uint8)
    return BlockQuant(8, np.ascontiguousarray(codes), _fp16(blocks, 0), zeros)
