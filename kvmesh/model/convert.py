"""GGUF -> model folder (see folder.py), with numpy and onnx only."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from kvmesh.model.folder import DECODE_GRAPH, GRAPH, GROUP_GRAPH, GROUP_SEGMENTS, KVMESH_JSON, LAST_GRAPH
from kvmesh.model.gguf_import import GGUFSource, Precision
from kvmesh.model.graph import Activations, Attention, build_decoder
from kvmesh.model.spec import LlamaConfig

FORMAT_VERSION = 1
Step = Callable[[str], None]


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def convert_gguf(
    gguf: Path,
    out: Path,
    precision: Precision,
    accuracy_level: int = 0,
    step: Step = print,
    decode_accuracy_level: int | None = None,
    activations: Activations = "float32",
    decode_attention: Attention = "gqa",
) -> Path:
    """Write the folder under a temporary name, then rename: a folder that exists is complete.
    `activations` float16: the graph for CUDA (float16 activations and KV). `decode_attention`:
    the decode graph's attention ("kvmesh": kvmesh's own kernel, which sessions then load)."""
    src = GGUFSource(gguf)
    cfg = src.config()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    step("reading weights")
    weights = src.weights(precision)
    step("building graph")
    full = build_decoder(weights, accuracy_level, activations=activations)
    step("writing graph")
    onnx.save_model(
        full,
        tmp / GRAPH,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=GRAPH + ".data",
        size_threshold=1024,
    )
    # The serving graph computes logits for the last position only (prefill ~20% faster); it is
    # the same graph otherwise and reads the very same external weights file.
    last = build_decoder(weights, accuracy_level, last_only=True, activations=activations)
    _share_initializers(last, full)
    onnx.save_model(last, tmp / LAST_GRAPH)
    del last  # each graph holds its own copy of the weights until saved: one at a time beside `full`
    if decode_accuracy_level is not None and decode_accuracy_level != accuracy_level:
        # Decode steps in batches run MatMulNBits fastest with int8 activations (level 4): the
        # same weights, another kernel. Prefill (and so every KV that is stored or sent) keeps
        # the folder's own level.
        decode = build_decoder(
            weights,
            decode_accuracy_level,
            decode_accuracy_level,
            last_only=True,
            activations=activations,
            attention=decode_attention,
        )
        _share_initializers(decode, full)
        onnx.save_model(decode, tmp / DECODE_GRAPH)
        del decode
    if activations == "float32":
        # Prompts waiting at once are prefilled in one run: every linear layer once over
        # all their tokens (the exact MatMulNBits costs ~55 ms a run of 2+ rows however few, on 2
        # cores), each sequence's attention over its own past (a decode slot, or out of place). CPU only:
        # float32 folders.
        group = build_decoder(weights, accuracy_level, segments=GROUP_SEGMENTS)
        _share_initializers(group, full)
        onnx.save_model(group, tmp / GROUP_GRAPH)
        del group
    del full, weights
    step("writing tokenizer")
    tokenizer = src.tokenizer()
    tokenizer.save(str(tmp / "tokenizer.json"))
    template = src.chat_template()
    meta = _meta(cfg, src, gguf, precision, accuracy_level, template, activations)
    meta["decode_accuracy_level"] = accuracy_level if decode_accuracy_level is None else decode_accuracy_level
    has_decode = decode_accuracy_level is not None and decode_accuracy_level != accuracy_level
    meta["decode_attention"] = decode_attention if has_decode else "gqa"
    meta["fingerprint"] = _fingerprint(meta, tmp / "tokenizer.json")
    _write_json(tmp / KVMESH_JSON, meta)
    _write_json(tmp / "tokenizer_config.json", _tokenizer_config(src, cfg, template))
    _write_json(tmp / "genai_config.json", genai_config(cfg))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _share_initializers(model: onnx.ModelProto, saved: onnx.ModelProto) -> None:
    """Point `model`'s initializers at the external data `saved` was just written with."""
    external = {t.name: t for t in saved.graph.initializer}
    for t in model.graph.initializer:
        if t.name in external:
            t.CopyFrom(external[t.name])


def _meta(
    cfg: LlamaConfig, src: GGUFSource, gguf: Path, precision: str, acc: int, template: str | None, activations: str
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "architecture": "llama",
        "name": src.field("general.name", gguf.stem),
        "source": {"file": gguf.name, "sha256": file_digest(gguf)},
        "precision": precision,
        "accuracy_level": acc,
        "activations": activations,
        "layout": {
            "layers": cfg.num_layers,
            "kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "dtype": activations,
        },
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.context_length,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_ids": list(cfg.eos_token_ids),
        "chat_template": template,
    }


def _fingerprint(meta: dict[str, Any], tokenizer: Path) -> str:
    """Names the weights, their precision, the tokenizer and the KV layout: what KV bytes depend on."""
    h = hashlib.blake2b(digest_size=16)
    keys = ("format_version", "source", "precision", "accuracy_level", "layout")
    h.update(json.dumps({k: meta[k] for k in keys}, sort_keys=True).encode())
    h.update(tokenizer.read_bytes())
    return h.hexdigest()


def _tokenizer_config(src: GGUFSource, cfg: LlamaConfig, template: str | None) -> dict[str, Any]:
    tokens = src.field("tokenizer.ggml.tokens")
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": tokens[cfg.bos_token_id],
        "eos_token": tokens[cfg.eos_token_ids[0]],
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.context_length,
        "chat_template": template,
    }


def genai_config(cfg: LlamaConfig) -> dict[str, Any]:
    """What ONNX Runtime GenAI needs to run model.onnx as it is."""
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_kv_heads,
    }
    model = {
        "bos_token_id": cfg.bos_token_id,
        "context_length": cfg.context_length,
        "decoder": decoder,
        "eos_token_id": list(cfg.eos_token_ids),
        "pad_token_id": cfg.eos_token_ids[0],
        "type": "llama",
        "vocab_size": cfg.vocab_size,
    }
    search = {
        "do_sample": False,
        "max_length": cfg.context_length,
        "min_length": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": True,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
    }
    return {"model": model, "search": search}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
