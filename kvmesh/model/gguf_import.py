"""Read a Llama-family GGUF file: hyper-parameters, weights (kept in their GGUF quantization for
int4, dequantized exactly for fp32), the byte-level BPE tokenizer and the chat template."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from kvmesh.errors import ModelError
from kvmesh.model import quant
from kvmesh.model.spec import BlockQuant, Dense, LayerWeights, Linear, LlamaConfig, LlamaWeights

Precision = Literal["fp32", "int4"]
_FLOAT = {QT.F32, QT.F16, QT.BF16}
_BLOCK_QUANT: dict[QT, Callable[[np.ndarray, int], BlockQuant]] = {
    QT.Q4_1: quant.q4_1,
    QT.Q4_0: quant.q4_0,
    QT.Q8_0: quant.q8_0,
}
_CONTROL_TOKEN = 3  # tokenizer.ggml.token_type: 1 normal, 3 control, 4 user-defined
_USER_TOKEN = 4


class GGUFSource:
    """One GGUF file opened for conversion (memory-mapped; nothing is read until asked)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: not a readable GGUF file ({e})") from e
        arch = self.field("general.architecture")
        if arch != "llama":
            raise ModelError(f"{path}: architecture {arch!r} is not supported (only 'llama' family)")
        self._tensors = {t.name: t for t in self.reader.tensors}

    def check(self) -> LlamaConfig:
        """Refuse, before any work, a file whose tensors or tokenizer kvmesh cannot map."""
        for name in self._tensors:
            self._tensor(name)
        self.tokenizer()
        return self.config()

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def config(self) -> LlamaConfig:
        f = self.field
        hidden, heads = int(f("llama.embedding_length")), int(f("llama.attention.head_count"))
        vocab = f("llama.vocab_size") or len(f("tokenizer.ggml.tokens"))
        eos = int(f("tokenizer.ggml.eos_token_id"))
        return LlamaConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            num_layers=int(f("llama.block_count")),
            num_heads=heads,
            num_kv_heads=int(f("llama.attention.head_count_kv", heads)),
            head_dim=int(f("llama.rope.dimension_count", hidden // heads)),
            intermediate_size=int(f("llama.feed_forward_length")),
            rope_theta=float(f("llama.rope.freq_base", 10000.0)),
            rms_eps=float(f("llama.attention.layer_norm_rms_epsilon")),
            context_length=int(f("llama.context_length")),
            bos_token_id=int(f("tokenizer.ggml.bos_token_id", eos)),
            eos_token_ids=(eos,),
        )

    def _tensor(self, name: str) -> Any:
        t = self._tensors.get(name)
        if t is None:
            raise ModelError(f"{self.path}: tensor {name!r} is missing")
        if t.tensor_type not in _FLOAT and t.tensor_type not in _BLOCK_QUANT:
            raise ModelError(
                f"{self.path}: tensor {name} is {t.tensor_type.name}; kvmesh maps only F32/F16/BF16, "
                "Q4_0, Q4_1 and Q8_0 without requantizing"
            )
        return t

    def vector(self, name: str) -> np.ndarray:
        return np.asarray(self._tensor(name).data, dtype=np.float32).reshape(-1)

    def linear(self, name: str, precision: Precision) -> Linear:
        """(out, in) weight; GGUF stores rows = output features, ne = [in, out]."""
        t = self._tensor(name)
        n, k = int(t.shape[1]), int(t.shape[0])
        if precision == "int4" and t.tensor_type in _BLOCK_QUANT:
            return _BLOCK_QUANT[t.tensor_type](t.data, n)
        w = t.data if t.tensor_type == QT.F32 else dequantize(t.data, t.tensor_type)
        return Dense(np.asarray(w, dtype=np.float32).reshape(n, k))

    def weights(self, precision: Precision) -> LlamaWeights:
        cfg = self.config()
        layers = [self._layer(i, cfg, precision) for i in range(cfg.num_layers)]
        head = self.linear("output.weight", precision) if "output.weight" in self._tensors else None
        embed = self.linear("token_embd.weight", precision)
        return LlamaWeights(cfg, embed, layers, self.vector("output_norm.weight"), head)

    def _layer(self, i: int, cfg: LlamaConfig, precision: Precision) -> LayerWeights:
        def lin(part: str) -> Linear:
            return self.linear(f"blk.{i}.{part}.weight", precision)

        return LayerWeights(
            attn_norm=self.vector(f"blk.{i}.attn_norm.weight"),
            q=unpermute_rope_rows(lin("attn_q"), cfg.num_heads, cfg.head_dim),
            k=unpermute_rope_rows(lin("attn_k"), cfg.num_kv_heads, cfg.head_dim),
            v=lin("attn_v"),
            o=lin("attn_output"),
            ffn_norm=self.vector(f"blk.{i}.ffn_norm.weight"),
            gate=lin("ffn_gate"),
            up=lin("ffn_up"),
            down=lin("ffn_down"),
        )

    def tokenizer(self) -> Tokenizer:
        kind, pre = self.field("tokenizer.ggml.model"), self.field("tokenizer.ggml.pre", "default")
        if kind != "gpt2":
            raise ModelError(f"{self.path}: tokenizer {kind!r} is not supported (byte-level BPE 'gpt2' only)")
        return build_bpe_tokenizer(
            self.field("tokenizer.ggml.tokens"),
            self.field("tokenizer.ggml.merges"),
            self.field("tokenizer.ggml.token_type"),
            pre,
        )

    def chat_template(self) -> str | None:
        template = self.field("tokenizer.chat_template")
        return None if template is None else str(template)


def unpermute_rope_rows(w: Linear, heads: int, head_dim: int) -> Linear:
    """GGUF stores Q/K rows permuted for interleaved (GPT-J style) rotary; return HF's rotate-half
    order. Within a head, GGUF row 2i+j holds HF row j*head_dim/2 + i. A pure row reorder: exact."""
    p = np.arange(head_dim)
    within = 2 * (p % (head_dim // 2)) + p // (head_dim // 2)
    order = (np.arange(heads)[:, None] * head_dim + within[None, :]).reshape(-1)
    if isinstance(w, Dense):
        return Dense(w.w[order])
    return BlockQuant(w.bits, w.packed[order], w.scales[order], w.zeros[order])


def build_bpe_tokenizer(tokens: list[str], merges: list[str], types: list[int], pre: str) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [(a, b) for a, b in (m.split(" ", 1) for m in merges)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits split one by one, then GPT-2's regex (llama.cpp's SMOLLM pre-type)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        raise ModelError(f"tokenizer pre-type {pre!r} is not supported (smollm, gpt2)")
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL_TOKEN
    ]
    tok.add_special_tokens(special)
    tok.add_tokens([AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == _USER_TOKEN])
    return tok
