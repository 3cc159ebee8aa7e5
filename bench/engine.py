"""Engine benchmark: kvmesh's runner against ONNX Runtime GenAI on the same model folder.

Workload (per precision, SmolLM2-135M-Instruct int4 and fp32, 2 intra-op threads each):
  prefill   a 2,000-token prompt (English prose, tests/data/english.txt repeated), no past
  decode    128 greedy tokens after a short chat prompt and after the 2,000-token prompt
            (EOS ignored so both engines make exactly 128 tokens); inter-token latency p50/p99
  memory    peak RSS of the process that ran the engine
Each engine runs in its own subprocess (so RSS is its own), alternating, `--rounds` times; the
table shows medians and kvmesh / GenAI ratios measured in this same run. Seconds apart, two
processes can meet a different machine (this one is shared), so decode is also measured
interleaved: one more process holds both engines and alternates them every 16 tokens over the
same 128 greedy tokens, `--rounds` times (rows `*_interleaved`). Both pay for the switch: the other
engine's ORT worker spins on a core for a while after its turn (absolute figures run lower than
in the separate processes; the ratio is the point).

  python bench/engine.py [--rounds 3] [--precision int4 fp32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS, NEW_TOKENS, THREADS = 2000, 128, 2


def _prompts(folder: Path) -> tuple[list[int], list[int]]:
    from kvmesh.model.folder import ModelFolder
    from kvmesh.model.tokenizer import ChatTokenizer, chat_messages

    tok = ChatTokenizer(ModelFolder.load(folder))
    text = (ROOT / "tests" / "data" / "english.txt").read_text()
    long = (tok.encode(text) * (PROMPT_TOKENS // 400 + 1))[:PROMPT_TOKENS]
    return long, tok.encode_chat(chat_messages("Tell me a long story about a lighthouse keeper."))


def _runner(folder: Path) -> Any:
    from kvmesh.model.folder import ModelFolder
    from kvmesh.model.runner import ModelRunner, RunnerConfig

    return ModelRunner(ModelFolder.load(folder), RunnerConfig(threads=THREADS, provider="cpu"))


def _genai_model(folder: Path) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    threads = {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    return og.Model(config)


def _generator(model: Any, prompt: list[int]) -> Any:
    """A greedy GenAI generator that makes exactly NEW_TOKENS after `prompt` (not yet appended)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    n = len(prompt) + NEW_TOKENS + 1
    params.set_search_options(max_length=n, min_length=n, do_sample=False)
    return og.Generator(model, params)


def _kvmesh(folder: Path) -> dict[str, Any]:
    from kvmesh.gc_tuning import tune_for_serving

    runner = _runner(folder)
    long, short = _prompts(folder)
    tune_for_serving()  # as kvmesh's services and `kvmesh generate` run
    runner.prefill(short)  # warm-up
    t = time.perf_counter()
    logits, kv = runner.prefill(long)
    out: dict[str, Any] = {"prefill_s": time.perf_counter() - t}
    for name, prompt in (("short", short), ("long", long)):
        logits, kv = runner.prefill(prompt)
        decoder = runner.decoder(kv, len(prompt) + NEW_TOKENS)
        gaps = []
        for _ in range(NEW_TOKENS):
            t = time.perf_counter()
            logits = decoder.step(int(np.argmax(logits)))
            gaps.append(time.perf_counter() - t)
        out[f"itl_{name}"] = gaps
    return out


def _genai(folder: Path) -> dict[str, Any]:
    model = _genai_model(folder)
    long, short = _prompts(folder)
    _generator(model, short).append_tokens(short)  # warm-up
    gen = _generator(model, long)
    t = time.perf_counter()
    gen.append_tokens(long)
    out: dict[str, Any] = {"prefill_s": time.perf_counter() - t}
    for name, prompt in (("short", short), ("long", long)):
        gen = _generator(model, prompt)
        gen.append_tokens(prompt)
        gen.generate_next_token()  # samples from the prompt's logits: no model run
        gaps = []
        for _ in range(NEW_TOKENS):
            t = time.perf_counter()
            gen.generate_next_token()  # one model run for the previous token, then argmax
            gaps.append(time.perf_counter() - t)
        out[f"itl_{name}"] = gaps
    return out


SEGMENT = 16  # tokens each engine makes before the other takes its turn


def _interleaved(folder: Path, rounds: int) -> dict[str, Any]:
    """Both engines in this process, alternating every SEGMENT tokens; per engine and prompt the
    step times of every round."""
    from kvmesh.gc_tuning import tune_for_serving

    runner, model = _runner(folder), _genai_model(folder)
    long, short = _prompts(folder)
    tune_for_serving()
    out: dict[str, Any] = {}
    for name, prompt in (("short", short), ("long", long)):
        for _ in range(rounds):
            logits, kv = runner.prefill(prompt)
            decoder, token = runner.decoder(kv, len(prompt) + NEW_TOKENS), int(np.argmax(logits))
            gen = _generator(model, prompt)
            gen.append_tokens(prompt)
            gen.generate_next_token()
            ours, theirs = [], []
            for _ in range(NEW_TOKENS // SEGMENT):
                for _ in range(SEGMENT):
                    t = time.perf_counter()
                    token = int(np.argmax(decoder.step(token)))
                    ours.append(time.perf_counter() - t)
                for _ in range(SEGMENT):
                    t = time.perf_counter()
                    gen.generate_next_token()
                    theirs.append(time.perf_counter() - t)
            out.setdefault(f"kvmesh_{name}", []).append(ours)
            out.setdefault(f"genai_{name}", []).append(theirs)
            del gen
    return out


def worker(engine: str, folder: Path, rounds: int) -> None:
    sys.path.insert(0, str(ROOT))
    if engine == "both":
        print(json.dumps(_interleaved(folder, rounds)))
        return
    result = (_kvmesh if engine == "kvmesh" else _genai)(folder)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _run(engine: str, folder: Path, rounds: int = 1) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", engine, "--folder", str(folder), "--rounds", str(rounds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def _summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    s: dict[str, float] = {"prefill_tok_s": statistics.median(PROMPT_TOKENS / r["prefill_s"] for r in runs)}
    for name in ("short", "long"):
        gaps = np.concatenate([r[f"itl_{name}"] for r in runs]) * 1000
        s[f"decode_{name}_tok_s"] = statistics.median(NEW_TOKENS / sum(r[f"itl_{name}"]) for r in runs)
        s[f"itl_{name}_p50_ms"], s[f"itl_{name}_p99_ms"] = (
            float(np.percentile(gaps, 50)),
            float(np.percentile(gaps, 99)),
        )
    s["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
    return s


# metric -> whether higher is better (ratios are printed so that > 1 means kvmesh is better)
METRICS = {
    "prefill_tok_s": True,
    "decode_short_tok_s": True,
    "itl_short_p50_ms": False,
    "itl_short_p99_ms": False,
    "decode_long_tok_s": True,
    "itl_long_p50_ms": False,
    "itl_long_p99_ms": False,
    "peak_rss_mb": False,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["kvmesh", "genai", "both"])
    ap.add_argument("--folder", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["int4", "fp32"], choices=["int4", "fp32"])
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.folder, args.rounds)
        return
    sys.path.insert(0, str(ROOT))
    from kvmesh.model.prepare import default_model_dir

    report: dict[str, Any] = {
        "workload": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "threads": THREADS}
    }
    print(f"{'precision':9} {'metric':20} {'kvmesh':>10} {'genai':>10} {'ratio':>7}  (ratio > 1: kvmesh better)")
    for precision in args.precision:
        folder = default_model_dir(precision)
        runs: dict[str, list[dict[str, Any]]] = {"kvmesh": [], "genai": []}
        for _ in range(args.rounds):
            for engine in runs:
                runs[engine].append(_run(engine, folder))
        ours, theirs = _summary(runs["kvmesh"]), _summary(runs["genai"])
        report[precision] = {"kvmesh": ours, "genai": theirs, "ratio": {}}
        for m, higher in METRICS.items():
            ratio = ours[m] / theirs[m] if higher else theirs[m] / ours[m]
            report[precision]["ratio"][m] = ratio
            print(f"{precision:9} {m:20} {ours[m]:10.2f} {theirs[m]:10.2f} {ratio:7.2f}")
        both = _run("both", folder, args.rounds)
        for name in ("short", "long"):
            rates = {
                e: statistics.median(NEW_TOKENS / sum(r) for r in both[f"{e}_{name}"]) for e in ("kvmesh", "genai")
            }
            p99 = {e: float(np.percentile(np.concatenate(both[f"{e}_{name}"]) * 1000, 99)) for e in rates}
            rows = {
                f"decode_{name}_tok_s_interleaved": (rates["kvmesh"], rates["genai"], rates["kvmesh"] / rates["genai"]),
                f"itl_{name}_p99_ms_interleaved": (p99["kvmesh"], p99["genai"], p99["genai"] / p99["kvmesh"]),
            }
            for m, (a, b, ratio) in rows.items():
                report[precision]["kvmesh"][m], report[precision]["genai"][m] = a, b
                report[precision]["ratio"][m] = ratio
                print(f"{precision:9} {m:32} {a:10.2f} {b:10.2f} {ratio:7.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
