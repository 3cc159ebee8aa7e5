"""The model folder: what a servable model is on disk.

  model.onnx, model.onnx.data   the decoder graph and its external weights (standard KV-cache I/O)
  model_last.onnx               the same graph, logits of the last position only (what we serve)
  model_decode.onnx             (optional) model_last for decode steps, int8 activations
  model_group.onnx              (float32 folders) model_last over GROUP_SEGMENTS sequences at once,
                                each after its own past (prompts waiting at once, prefilled together)
  tokenizer.json                a `tokenizers` tokenizer
  tokenizer_config.json         chat template, special tokens (as Hugging Face writes it)
  genai_config.json             so ONNX Runtime GenAI loads the folder as it is
  kvmesh.json                   ours: source, precision, fingerprint (optional for foreign folders)
  chat_template.jinja           (foreign folders) the template, where recent exporters write it

A folder exported by Optimum or ONNX Runtime GenAI's builder (no kvmesh.json) loads too: its
special tokens come from genai_config.json / config.json and its layout from the graph itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmesh.errors import ModelError

KVMESH_JSON = "kvmesh.json"
GRAPH = "model.onnx"
LAST_GRAPH = "model_last.onnx"  # ours: the same decoder with logits for the last position only
DECODE_GRAPH = "model_decode.onnx"  # ours, optional: model_last with another MatMulNBits accuracy level
GROUP_GRAPH = "model_group.onnx"  # ours, float32 folders: model_last over several sequences, see graph.py
GROUP_SEGMENTS = 8  # the sequences model_group.onnx takes at once
CHAT_JINJA = "chat_template.jinja"  # where recent Hugging Face tools put the template
GRAPH_NAMES = (GRAPH, "decoder_model_merged.onnx", "decoder_with_past_model.onnx")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable ({e})") from e
    return data if isinstance(data, dict) else {}


def _read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    graph: Path
    last_graph: Path | None
    decode_graph: Path | None
    group_graph: Path | None
    tokenizer: Path
    chat_template: str | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    context_length: int | None
    fingerprint: str
    meta: dict[str, Any]
    # (kv_heads, head_dim) from genai_config.json / config.json, for graphs whose KV inputs leave
    # them symbolic (ORT GenAI's builder names head_dim "kv_cache_dim")
    kv_hint: tuple[int, int] | None = None

    @classmethod
    def load(cls, path: Path) -> ModelFolder:
        if not path.is_dir():
            raise ModelError(f"model folder {path} does not exist (run `kvmesh model prepare`?)")
        graph = next((path / n for n in GRAPH_NAMES if (path / n).is_file()), None)
        if graph is None:
            raise ModelError(f"model folder {path} is incomplete: no decoder graph ({', '.join(GRAPH_NAMES)})")
        tokenizer = path / "tokenizer.json"
        if not tokenizer.is_file():
            raise ModelError(f"model folder {path} is incomplete: tokenizer.json is missing")
        meta = _read_json(path / KVMESH_JSON)
        genai = _read_json(path / "genai_config.json").get("model", {})
        hf = _read_json(path / "config.json")
        tok_cfg = _read_json(path / "tokenizer_config.json")
        eos = _ids(meta.get("eos_token_ids") or genai.get("eos_token_id") or hf.get("eos_token_id"))
        bos = meta.get("bos_token_id", genai.get("bos_token_id", hf.get("bos_token_id")))
        ctx = meta.get("context_length") or genai.get("context_length") or hf.get("max_position_embeddings")
        return cls(
            path=path,
            graph=graph,
            tokenizer=tokenizer,
            last_graph=path / LAST_GRAPH if (path / LAST_GRAPH).is_file() else None,
            decode_graph=path / DECODE_GRAPH if (path / DECODE_GRAPH).is_file() else None,
            group_graph=path / GROUP_GRAPH if (path / GROUP_GRAPH).is_file() else None,
            chat_template=meta.get("chat_template") or tok_cfg.get("chat_template") or _read_text(path / CHAT_JINJA),
            eos_token_ids=eos,
            bos_token_id=None if bos is None else int(bos),
            context_length=None if ctx is None else int(ctx),
            fingerprint=meta.get("fingerprint") or _hash_files(path, graph, tokenizer),
            meta=meta,
            kv_hint=_kv_hint(genai.get("decoder", {}), hf),
        )


def _kv_hint(decoder: dict[str, Any], hf: dict[str, Any]) -> tuple[int, int] | None:
    heads = decoder.get("num_key_value_heads") or hf.get("num_key_value_heads") or hf.get("num_attention_heads")
    head_dim = decoder.get("head_size") or hf.get("head_dim")
    if head_dim is None and hf.get("hidden_size") and hf.get("num_attention_heads"):
        head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    return (int(heads), int(head_dim)) if heads and head_dim else None


def _hash_files(path: Path, graph: Path, tokenizer: Path) -> str:
    """Fingerprint of a foreign folder: its graph, external weights and tokenizer."""
    h = hashlib.blake2b(digest_size=16)
    for f in [graph, tokenizer, *sorted(path.glob("*.onnx.data")), *sorted(path.glob("*.onnx_data"))]:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
