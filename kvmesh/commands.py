"""What each CLI command does, over the engine objects."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kvmesh import aio
from kvmesh.generate import Delta
from kvmesh.generate import generate as run_generate
from kvmesh.model.folder import ModelFolder
from kvmesh.model.gguf_import import Precision
from kvmesh.model.prepare import default_model_dir, find_default_gguf, prepare
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.model.tokenizer import ChatTokenizer, chat_messages
from kvmesh.sampling import SamplingParams
from kvmesh.settings import build


def model_prepare(args: argparse.Namespace) -> int:
    precisions: list[Precision] = ["int4", "fp32"] if args.precision == "all" else [args.precision]
    if args.out and len(precisions) > 1:
        print("kvmesh: error: --out needs one --precision", file=sys.stderr)
        return 2
    gguf = args.gguf or find_default_gguf()
    for p in precisions:
        out = args.out or (default_model_dir(p) if args.gguf is None else Path(f"{gguf.stem}-{p}"))
        decode_level = args.decode_accuracy_level if p == "int4" else None
        prepare(gguf, out, p, args.accuracy_level, args.force, decode_level)
        print(out)
    return 0


def _folder(args: argparse.Namespace) -> ModelFolder:
    return ModelFolder.load(args.model or default_model_dir("int4"))


def _runner(args: argparse.Namespace, folder: ModelFolder) -> ModelRunner:
    return ModelRunner(folder, RunnerConfig(threads=args.threads, provider=args.provider))


def model_info(args: argparse.Namespace) -> int:
    folder = _folder(args)
    runner = _runner(args, folder)
    lay = runner.layout
    print(f"folder       {folder.path}\ngraph        {runner.graph}")
    print(f"layout       {lay.layers} layers x {lay.kv_heads} KV heads x {lay.head_dim} head_dim, {lay.dtype}")
    print(f"KV bytes     {lay.bytes_per_token} per token\ncontext      {folder.context_length}")
    print(f"providers    {', '.join(runner.session.get_providers())}\nfingerprint  {folder.fingerprint}")
    return 0


def generate(args: argparse.Namespace) -> int:
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed, args.max_tokens, tuple(args.stop))
    folder = _folder(args)
    runner, tok = _runner(args, folder), ChatTokenizer(folder)
    prompt = tok.encode(args.prompt) if args.raw else tok.encode_chat(chat_messages(args.prompt, args.system))
    for event in run_generate(runner, tok, prompt, params):
        if isinstance(event, Delta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            continue
        rate = len(event.token_ids) / event.decode_s if event.decode_s else 0.0
        print(
            f"\n[{event.prompt_tokens} prompt tokens, {len(event.token_ids)} generated, finish: {event.reason}, "
            f"time to first token {event.ttft_s * 1000:.0f} ms, {rate:.1f} tokens/s]",
            file=sys.stderr,
        )
    return 0


def prefill(args: argparse.Namespace) -> int:
    from prefill_svc.config import PrefillConfig
    from prefill_svc.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    aio.run(serve(build(PrefillConfig, args)))
    return 0


def decode(args: argparse.Namespace) -> int:
    from decode_svc.config import DecodeConfig
    from decode_svc.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    aio.run(serve(build(DecodeConfig, args)))
    return 0


def proxy(args: argparse.Namespace) -> int:
    from proxy.config import ProxyConfig
    from proxy.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    aio.run(serve(build(ProxyConfig, args)))
    return 0
