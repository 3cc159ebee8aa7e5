"""Regenerate the foreign-exporter fixtures beside this file (run by hand, not in CI).

The tiny seeded model (kvmesh.model.tiny, seed 0, F32) is written as a Hugging Face Llama folder
and exported by the real tools, so tests can hold kvmesh's runner to folders it did not make:

  optimum/   optimum-cli export onnx --task text-generation-with-past   (plain ONNX ops, position_ids)
  genai/     python -m onnxruntime_genai.models.builder -p fp32 -e cpu    (GroupQueryAttention, ...)

Needs torch, transformers, safetensors, and optimum-onnx or onnxruntime-genai's builder; the two
want different transformers majors (optimum-onnx 0.1: <4.58; the GenAI 0.18 builder: 5.x), so run
it once per environment:  python tests/data/foreign/export.py optimum|genai
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from kvmesh.model.gguf_import import GGUFSource
from kvmesh.model.spec import Dense
from kvmesh.model.tiny import write_tiny_gguf

HERE = Path(__file__).resolve().parent
KEEP = {
    "model.onnx",
    "model.onnx.data",
    "genai_config.json",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


def hf_folder(out: Path) -> None:
    src = GGUFSource(write_tiny_gguf(out / "tiny.gguf", seed=0, weights="f32"))
    w, c = src.weights("fp32"), src.config()

    def dense(x: object) -> np.ndarray:
        assert isinstance(x, Dense)
        return x.w

    tensors = {"model.embed_tokens.weight": dense(w.embed), "model.norm.weight": w.final_norm}
    for i, layer in enumerate(w.layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = layer.attn_norm
        tensors[p + "post_attention_layernorm.weight"] = layer.ffn_norm
        for name in ("q", "k", "v", "o"):
            tensors[f"{p}self_attn.{name}_proj.weight"] = dense(getattr(layer, name))
        for name in ("gate", "up", "down"):
            tensors[f"{p}mlp.{name}_proj.weight"] = dense(getattr(layer, name))
    save_file({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, str(out / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": True,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids[0],
        "torch_dtype": "float32",
        "hidden_act": "silu",
    }
    (out / "config.json").write_text(json.dumps(config))
    src.tokenizer().save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": src.chat_template(),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))


def main(tool: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        hf, out = Path(tmp) / "hf", Path(tmp) / "out"
        hf.mkdir()
        hf_folder(hf)
        if tool == "optimum":
            cmd = ["optimum-cli", "export", "onnx", "--model", str(hf), "--task", "text-generation-with-past", str(out)]
        else:
            builder = [sys.executable, "-m", "onnxruntime_genai.models.builder"]
            cmd = [*builder, "-i", str(hf), "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        subprocess.run(cmd, check=True, env={"HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent)})
        target = HERE / tool
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for f in out.iterdir():
            if f.name in KEEP:
                shutil.copy(f, target / f.name)


if __name__ == "__main__":
    main(sys.argv[1])
