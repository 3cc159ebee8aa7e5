"""Build the ONNX decoder graph of a Llama-family model from `LlamaWeights`.

The graph uses ONNX Runtime's fused CPU/CUDA operators, as ONNX Runtime GenAI's model builder does:
GroupQueryAttention (rotary embedding inside, KV cache I/O), SkipSimplifiedLayerNormalization
(residual add + RMSNorm), MatMulNBits (4/8-bit weights), GatherBlockQuantized (8-bit embedding).
Its I/O is the standard layout, so Optimum-style runners and ORT GenAI can drive it:

  input_ids (B, S) int64, attention_mask (B, T) int64, past_key_values.N.key|value (B, kvh, P, hd)
  -> logits (B, S, vocab), present.N.key|value (B, kvh, T, hd)        with T = P + S
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kvmesh.errors import ModelError
from kvmesh.model.ops import DOMAIN as KVMESH_OPS
from kvmesh.model.quant import pack4
from kvmesh.model.spec import BLOCK, BlockQuant, Dense, LayerWeights, Linear, LlamaWeights, concat_rows

OPSET = 21
Activations = Literal["float32", "float16"]
# Decode graphs' attention: ORT's GroupQueryAttention, or kvmesh's DecodeAttention (the same
# contract for one new token per row, each KV head read once: kvmesh/model/ops/)
Attention = Literal["gqa", "kvmesh"]
MS = "com.microsoft"


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, accuracy_level: int, dtype: np.dtype[Any], attention: Attention = "gqa") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.accuracy_level = accuracy_level
        self.dtype = dtype  # of activations, KV and every float weight: float32, or float16 for CUDA
        self.attention = attention
        self._n = 0
        self._sums: dict[str, str] = {}  # x -> its block sums, shared by the matmuls reading x

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def float_init(self, name: str, array: np.ndarray) -> str:
        """A float weight in the graph's own float type (ORT's fused operators take one type)."""
        return self.init(name, array.astype(self.dtype))

    def op(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> list[str]:
        self._n += 1
        outs = [f"/{op}_{self._n}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, f"/{op}_{self._n}", domain=domain, **attrs))
        return outs

    def linear(self, x: str, w: Linear, name: str, accuracy_level: int | None = None) -> str:
        """x (B, S, K) @ w.T -> (B, S, N)."""
        if isinstance(w, Dense):
            return self.op("MatMul", [x, self.float_init(f"{name}.weight", w.w.T)])[0]
        acc = self.accuracy_level if accuracy_level is None else accuracy_level
        if w.bits == 4 or acc == 4:
            # One MatMulNBits: 4-bit weights, or 8-bit with int8 activations, where ORT's 8-bit kernel
            # is the fast one (SmolLM2's head, 8 rows x 49152: 1.7 ms against 2.9 for the two 4-bit
            # halves below, on 2 cores).
            return self._nbits(x, w, name, acc)
        # 8-bit with fp32 activations: ORT's 8-bit kernel is slow (~70 ms for that head), and int8
        # activations lose too much on the output projection to be the default. Code c = 16*hi + lo,
        # so d*(c - z) = 16d*(hi - 8) + d*(lo - 0) + d*(128 - z): two exact 4-bit matmuls, and a
        # per-block correction only where z is not 128 (Q8_0's is: none; it would read a float
        # (K/32, N) matrix every step, 3.5 MB for SmolLM2's head).
        codes = w.codes()
        hi = BlockQuant(4, pack4(codes >> 4), 16 * w.scales, np.full(w.scales.shape, 8.0, np.float32))
        lo = BlockQuant(4, pack4(codes & 0x0F), w.scales, np.zeros(w.scales.shape, np.float32))
        y = self.op("Add", [self._nbits(x, hi, f"{name}.hi", acc), self._nbits(x, lo, f"{name}.lo", acc)])[0]
        return self._correct(x, y, w.scales * (128.0 - w.zeros.astype(np.float32)), name)

    def _nbits(self, x: str, w: BlockQuant, name: str, acc: int) -> str:
        """One MatMulNBits. ORT's fast kernels want integer zero points (4-bit ones packed two to a
        byte); a float zero point z (Q4_1: -m/d) becomes the nearest integer zp plus an exact
        per-block correction d*(zp - z). Q8_0's 128 is exact."""
        n, k = w.shape
        zp = np.clip(np.rint(w.zeros.astype(np.float32)), 0, (1 << w.bits) - 1).astype(np.uint8)
        inputs = [x, self.init(f"{name}.qweight", w.packed), self.float_init(f"{name}.scales", w.scales)]
        inputs.append(self.init(f"{name}.zero_points", pack4(zp) if w.bits == 4 else zp))
        attrs = {"K": k, "N": n, "bits": w.bits, "block_size": BLOCK, "accuracy_level": acc}
        y = self.op("MatMulNBits", inputs, domain=MS, **attrs)[0]
        return self._correct(x, y, w.scales * (zp - w.zeros.astype(np.float32)), name)

    def _correct(self, x: str, y: str, per_block: np.ndarray, name: str) -> str:
        """y + blocksum(x) @ per_block.T: per_block (N, K/32); blocksum(x) (B, S, K/32)."""
        if not per_block.any():
            return y
        fix = self.op("MatMul", [self._block_sums(x), self.float_init(f"{name}.block_offsets", per_block.T)])[0]
        return self.op("Add", [y, fix])[0]

    def _block_sums(self, x: str) -> str:
        if x not in self._sums:
            blocks = self.op(
                "Reshape", [x, self.init(f"blocks_shape_{len(self._sums)}", np.array([0, 0, -1, BLOCK], np.int64))]
            )[0]
            self._sums[x] = self.op(
                "ReduceSum", [blocks, self.init(f"last_axis_{len(self._sums)}", np.array([-1], np.int64))], keepdims=0
            )[0]
        return self._sums[x]

    def embedding(self, ids: str, w: Linear) -> str:
        """ids (B, S) -> (B, S, hidden); 8-bit stays 8-bit through GatherBlockQuantized."""
        if isinstance(w, BlockQuant) and w.bits == 8:
            data = self.init("embed.qweight_rows", w.packed.reshape(w.shape))
            attrs = {"gather_axis": 0, "quantize_axis": 1, "block_size": BLOCK, "bits": 8}
            scales, zeros = self.float_init("embed.scales_rows", w.scales), self.init("embed.zeros_rows", w.zeros)
            inputs = [data, ids, scales, zeros]
            return self.op("GatherBlockQuantized", inputs, domain=MS, **attrs)[0]
        table = self.float_init("embed.weight", w.dequantize())
        return self.op("Gather", [table, ids])[0]


def _rotary_caches(g: _Graph, theta: float, head_dim: int, max_pos: int) -> tuple[str, str]:
    """cos/sin caches (max_pos, head_dim/2) for HF-order (rotate-half) rotary embedding."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(max_pos, dtype=np.float64), inv_freq)
    return g.float_init("cos_cache", np.cos(freqs)), g.float_init("sin_cache", np.sin(freqs))


def _attention_inputs(g: _Graph) -> tuple[str, str]:
    """seqlens_k (B,) int32 = valid tokens - 1 per row; total_sequence_length () int32 = T."""
    total = g.op("ReduceSum", ["attention_mask", g.init("axis_1", np.array([1], np.int64))], keepdims=0)[0]
    seqlens = g.op("Sub", [total, g.init("one_i64", np.array(1, np.int64))])[0]
    seqlens_k = g.op("Cast", [seqlens], to=TensorProto.INT32)[0]
    shape = g.op("Shape", ["attention_mask"])[0]
    t = g.op("Gather", [shape, g.init("idx_1", np.array(1, np.int64))], axis=0)[0]
    return seqlens_k, g.op("Cast", [t], to=TensorProto.INT32)[0]


def _attention(g: _Graph, w: LlamaWeights, qkv: str, past: str, attn_in: tuple[str, str], rope: tuple[str, str]) -> str:
    """One GroupQueryAttention (kvmesh's DecodeAttention where g.attention says so) over qkv
    (B, S, q+k+v) after the past KV named `past` + ".key" /
    ".value"; its present outputs are named as `past` is, with "present" for "past_key_values"."""
    cfg = w.config
    if g.attention == "kvmesh":  # the same inputs but the empty key and value (they are packed in qkv)
        inputs = [qkv, f"{past}.key", f"{past}.value", *attn_in, *rope]
        heads = {"num_heads": cfg.num_heads, "kv_num_heads": cfg.num_kv_heads}
        attn = g.op("DecodeAttention", inputs, n_out=3, domain=KVMESH_OPS, **heads)
    else:
        attn = g.op(
            "GroupQueryAttention",
            [qkv, "", "", f"{past}.key", f"{past}.value", *attn_in, *rope],
            n_out=3,
            domain=MS,
            num_heads=cfg.num_heads,
            kv_num_heads=cfg.num_kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
        )
    present = past.replace("past_key_values", "present")
    g.nodes[-1].output[1:] = [f"{present}.key", f"{present}.value"]
    return attn[0]


def _layer(g: _Graph, w: LlamaWeights, i: int, x: str, attend: Callable[[int, str], str]) -> str:
    """x: this layer's RMS-normed input (B, S, hidden); attend(i, qkv) -> the attention's output.
    Returns the MLP output before the residual."""
    lw = w.layers[i]
    qkv = g.linear(x, concat_rows([lw.q, lw.k, lw.v]), f"layers.{i}.attn.qkv_proj")
    return g.linear(attend(i, qkv), lw.o, f"layers.{i}.attn.o_proj")


def _segmented(g: _Graph, w: LlamaWeights, rope: tuple[str, str], segments: int) -> Callable[[int, str], str]:
    """Attention for `segments` sequences laid end to end in one row, (1, N, q+k+v) with N the sum
    of segment_lengths: each piece attends over its own past (its own KV inputs, B=1) as a
    one-sequence prefill would, so every linear layer runs once over all N tokens."""
    seg_ids = [g.init(f"segment_{j}", np.array(j, np.int64)) for j in range(segments)]
    one = g.init("segment_one", np.array(1, np.int64))
    attn_in = []
    for j in range(segments):
        total = g.op("Gather", ["segment_totals", seg_ids[j]], axis=0)[0]  # () int64
        last = g.op("Sub", [total, one])[0]
        seqlens = g.op("Unsqueeze", [last, g.init(f"segment_axis0_{j}", np.array([0], np.int64))])[0]  # (1,)
        attn_in.append(
            (g.op("Cast", [seqlens], to=TensorProto.INT32)[0], g.op("Cast", [total], to=TensorProto.INT32)[0])
        )

    def attend(i: int, qkv: str) -> str:
        pieces = g.op("Split", [qkv, "segment_lengths"], segments, axis=1)
        past = [f"segment{j}.past_key_values.{i}" for j in range(segments)]
        outs = [_attention(g, w, piece, past[j], attn_in[j], rope) for j, piece in enumerate(pieces)]
        return g.op("Concat", outs, axis=1)[0]

    return attend


def _mlp(g: _Graph, lw: LayerWeights, i: int, x: str) -> str:
    gate_up = g.linear(x, concat_rows([lw.gate, lw.up]), f"layers.{i}.mlp.gate_up_proj")
    inter = lw.gate.shape[0]
    gate, up = g.op("Split", [gate_up, g.init(f"layers.{i}.split", np.array([inter, inter], np.int64))], 2, axis=-1)
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])[0]
    return g.linear(g.op("Mul", [silu, up])[0], lw.down, f"layers.{i}.mlp.down_proj")


def _skip_norm(g: _Graph, x: str, residual: str, weight: np.ndarray, name: str, eps: float) -> tuple[str, str]:
    """(normed, new residual) = RMSNorm(x + residual), x + residual."""
    outs = g.op("SkipSimplifiedLayerNormalization", [x, residual, g.float_init(name, weight)], 4, MS, epsilon=eps)
    g.nodes[-1].output[1:3] = ["", ""]
    return outs[0], outs[3]


def build_decoder(
    w: LlamaWeights,
    accuracy_level: int = 0,
    head_accuracy_level: int = 0,
    last_only: bool = False,
    activations: Activations = "float32",
    segments: int = 0,
    attention: Attention = "gqa",
) -> onnx.ModelProto:
    """`activations` float16 is the graph for CUDA, whose GroupQueryAttention takes only 16-bit
    floats (its KV is float16 too); logits stay float32 either way. `segments` > 0: the graph of
    that many sequences at once, each after its own past: input_ids (1, N) their tokens end to
    end, segment_lengths and segment_totals (segments,) each one's new tokens and the tokens it
    holds after them, segmentJ.past_key_values.* / segmentJ.present.* (1, kvh, P, hd) its KV;
    logits (1, segments, vocab) of each one's last token. `attention` "kvmesh": a graph for decode
    steps (one new token per row) with kvmesh's DecodeAttention, float32 on the CPU only."""
    cfg = w.config
    if attention == "kvmesh" and (segments or activations != "float32"):
        raise ModelError("kvmesh's DecodeAttention is for float32 decode graphs")
    g = _Graph(accuracy_level, np.dtype(activations), attention)
    rope = _rotary_caches(g, cfg.rope_theta, cfg.head_dim, cfg.context_length)
    if segments:
        attend = _segmented(g, w, rope, segments)
    else:
        attn_in = _attention_inputs(g)

        def attend(i: int, qkv: str) -> str:
            return _attention(g, w, qkv, f"past_key_values.{i}", attn_in, rope)

    residual = g.embedding("input_ids", w.embed)
    norm0 = g.float_init("layers.0.input_layernorm.weight", w.layers[0].attn_norm)
    x = g.op("SimplifiedLayerNormalization", [residual, norm0], axis=-1, epsilon=cfg.rms_eps)[0]
    for i, lw in enumerate(w.layers):
        attn = _layer(g, w, i, x, attend)
        x, residual = _skip_norm(
            g, attn, residual, lw.ffn_norm, f"layers.{i}.post_attention_layernorm.weight", cfg.rms_eps
        )
        out = _mlp(g, lw, i, x)
        nxt = w.layers[i + 1].attn_norm if i + 1 < cfg.num_layers else w.final_norm
        name = f"layers.{i + 1}.input_layernorm.weight" if i + 1 < cfg.num_layers else "norm.weight"
        x, residual = _skip_norm(g, out, residual, nxt, name, cfg.rms_eps)
    head = w.lm_head if w.lm_head is not None else w.embed
    if segments:  # (1, N, hidden) -> (1, K, hidden): each segment's last position
        ends = g.op("CumSum", ["segment_lengths", g.init("segment_axis", np.array(0, np.int64))])[0]
        lasts = g.op("Sub", [ends, g.init("segment_last", np.array(1, np.int64))])[0]
        x = g.op("Gather", [x, lasts], axis=1)[0]
    elif last_only:  # (B, S, hidden) -> (B, 1, hidden): the output projection for the last position only
        last = [
            g.init(n, np.array([v], np.int64)) for n, v in (("last_start", -1), ("last_end", 2**62), ("seq_axis", 1))
        ]
        x = g.op("Slice", [x, *last])[0]
    logits = g.linear(x, head, "lm_head", head_accuracy_level)
    if g.dtype == np.float32:
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], "/logits"))
    else:
        g.nodes.append(helper.make_node("Cast", [logits], ["logits"], "/logits", to=TensorProto.FLOAT))
    return _model(g, w, segments)


def _model(g: _Graph, w: LlamaWeights, segments: int = 0) -> onnx.ModelProto:
    cfg = w.config
    kv_type = helper.np_dtype_to_tensor_dtype(g.dtype)
    kv: list[str | int] = ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]
    present: list[str | int] = ["batch_size", cfg.num_kv_heads, "total_sequence_length", cfg.head_dim]
    if segments:
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "tokens"]),
            helper.make_tensor_value_info("segment_lengths", TensorProto.INT64, [segments]),
            helper.make_tensor_value_info("segment_totals", TensorProto.INT64, [segments]),
        ]
        logits: list[str | int] = [1, segments, cfg.vocab_size]
        prefixes = [f"segment{j}." for j in range(segments)]
        kv, present = [1, *kv[1:]], [1, *present[1:]]
    else:
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        ]
        logits = ["batch_size", "sequence_length", cfg.vocab_size]
        prefixes = [""]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, logits)]
    for prefix in prefixes:
        for i in range(cfg.num_layers):
            for part in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"{prefix}past_key_values.{i}.{part}", kv_type, kv))
                outputs.append(helper.make_tensor_value_info(f"{prefix}present.{i}.{part}", kv_type, present))
    graph = helper.make_graph(g.nodes, "kvmesh_llama_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    if g.attention == "kvmesh":
        opsets.append(helper.make_opsetid(KVMESH_OPS, 1))
    return helper.make_model(graph, opset_imports=opsets, producer_name="kvmesh", ir_version=10)
