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
THREADS = 2
SIZES = {"prompt_tokens": 2200, "new_tokens": 128}  # --prompt-tokens, --new-tokens (workers get them too)


def _prompts(folder: Path) -> tuple[list[int], list[int]]:
    from kvmesh.model.folder import ModelFolder
    from kvmesh.model.tokenizer import ChatTokenizer, chat_messages

    tok = ChatTokenizer(ModelFolder.load(folder))
    text = (ROOT / "tests" / "data" / "english.txt").read_text()
    long = (tok.encode(text) * (SIZES["prompt_tokens"] // 400 + 1))[: SIZES["prompt_tokens"]]
    return long, tok.encode_chat(chat_messages("Tell me a long story about a lighthouse keeper."))


def _runner(folder: Path, exact: bool = False) -> Any:
    """exact: decode steps on the exact graph (fp32 activations) instead of the folder's default."""
    from kvmesh.model.folder import ModelFolder
    from kvmesh.model.runner import ModelRunner, RunnerConfig

    config = RunnerConfig(threads=THREADS, provider="cpu", decode_numerics="exact" if exact else "auto")
    return ModelRunner(ModelFolder.load(folder), config)


def _genai_model(folder: Path) -> Any:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    threads = {"intra_op_num_threads": THREADS, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
    return og.Model(config)


def _generator(model: Any, prompt: list[int]) -> Any:
    """A greedy GenAI generator that makes exactly SIZES["new_tokens"] after `prompt` (not yet appended)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    n = len(prompt) + SIZES["new_tokens"] + 1
    params.set_search_options(max_length=n, min_length=n, do_sample=False)
    return og.Generator(model, params)


def _kvmesh(folder: Path, exact: bool = False) -> dict[str, Any]:
    from kvmesh.gc_tuning import tune_for_serving
    from kvmesh.model.batch import decode_loop

    runner = _runner(folder, exact)
    long, short = _prompts(folder)
    tune_for_serving()  # as kvmesh's services and `kvmesh generate` run
    runner.prefill(short)  # warm-up
    t = time.perf_counter()
    logits, kv = runner.prefill(long)
    out: dict[str, Any] = {"prefill_s": time.perf_counter() - t}
    for name, prompt in (("short", short), ("long", long)):
        logits, kv = runner.prefill(prompt)
        decoder = decode_loop(runner, kv, len(prompt) + SIZES["new_tokens"])
        gaps = []
        for _ in range(SIZES["new_tokens"]):
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
        for _ in range(SIZES["new_tokens"]):
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
    from kvmesh.model.batch import decode_loop

    runner, model = _runner(folder), _genai_model(folder)
    long, short = _prompts(folder)
    tune_for_serving()
    out: dict[str, Any] = {}
    for name, prompt in (("short", short), ("long", long)):
        for _ in range(rounds):
            logits, kv = runner.prefill(prompt)
            decoder, token = decode_loop(runner, kv, len(prompt) + SIZES["new_tokens"]), int(np.argmax(logits))
            gen = _generator(model, prompt)
            gen.append_tokens(prompt)
            gen.generate_next_token()
            ours, theirs = [], []
            for _ in range(SIZES["new_tokens"] // SEGMENT):
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
    result = _genai(folder) if engine == "genai" else _kvmesh(folder, exact=engine == "kvmesh-exact")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _run(engine: str, folder: Path, rounds: int = 1) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", engine, "--folder", str(folder), "--rounds", str(rounds)]
    cmd += ["--prompt-tokens", str(SIZES["prompt_tokens"]), "--new-tokens", str(SIZES["new_tokens"])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def _summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    s: dict[str, float] = {"prefill_tok_s": statistics.median(SIZES["prompt_tokens"] / r["prefill_s"] for r in runs)}
    for name in ("short", "long"):
        gaps = np.concatenate([r[f"itl_{name}"] for r in runs]) * 1000
        s[f"decode_{name}_tok_s"] = statistics.median(SIZES["new_tokens"] / sum(r[f"itl_{name}"]) for r in runs)
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
    ap.add_argument("--worker", choices=["kvmesh", "kvmesh-exact", "genai", "both"])
    ap.add_argument("--folder", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["int4", "fp32"], choices=["int4", "fp32"])
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--prompt-tokens", type=int, default=SIZES["prompt_tokens"], help="the long prompt")
    ap.add_argument("--new-tokens", type=int, default=SIZES["new_tokens"])
    ap.add_argument("--model", type=Path, help="the int4 folder (default: the prepared SmolLM2 int4)")
    args = ap.parse_args()
    SIZES.update(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    if args.worker:
        worker(args.worker, args.folder, args.rounds)
        return
    sys.path.insert(0, str(ROOT))
    from kvmesh.model.prepare import default_model_dir

    report: dict[str, Any] = {"workload": {**SIZES, "threads": THREADS}}
    print(f"{'precision':9} {'metric':32} {'kvmesh':>10} {'genai':>10} {'ratio':>7}  (ratio > 1: kvmesh better)")
    print("  kvmesh: decode steps in the folder's default numerics (int4: int8 activations); kvmesh-exact: fp32")
    for precision in args.precision:
        folder = args.model if args.model and precision == "int4" else default_model_dir(precision)
        engines = (
            ["kvmesh", "kvmesh-exact", "genai"] if (folder / "model_decode.onnx").is_file() else ["kvmesh", "genai"]
        )
        runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
        for _ in range(args.rounds):
            for engine in engines:
                runs[engine].append(_run(engine, folder))
        summaries = {e: _summary(r) for e, r in runs.items()}
        report[precision] = {e: summaries[e] for e in engines} | {"ratio": {}}
        for e in engines[:-1]:
            for m, higher in METRICS.items():
                a, b = summaries[e][m], summaries["genai"][m]
                ratio = a / b if higher else b / a
                report[precision]["ratio"][f"{e}/{m}"] = ratio
                print(f"{precision:9} {e + ' ' + m:32} {a:10.2f} {b:10.2f} {ratio:7.2f}")
        _interleaved_rows(precision, folder, args.rounds, report)
        if precision == "int4":
            report["step_budget"] = step_budget(folder, summaries)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _interleaved_rows(precision: str, folder: Path, rounds: int, report: dict[str, Any]) -> None:
    both = _run("both", folder, rounds)
    for name in ("short", "long"):
        n = SIZES["new_tokens"]
        rates = {e: statistics.median(n / sum(r) for r in both[f"{e}_{name}"]) for e in ("kvmesh", "genai")}
        p99 = {e: float(np.percentile(np.concatenate(both[f"{e}_{name}"]) * 1000, 99)) for e in rates}
        rows = {
            f"decode_{name}_tok_s_interleaved": (rates["kvmesh"], rates["genai"], rates["kvmesh"] / rates["genai"]),
            f"itl_{name}_p99_ms_interleaved": (p99["kvmesh"], p99["genai"], p99["genai"] / p99["kvmesh"]),
        }
        for m, (a, b, ratio) in rows.items():
            report[precision]["kvmesh"][m], report[precision]["genai"][m] = a, b
            report[precision]["ratio"][f"kvmesh/{m}"] = ratio
            print(f"{precision:9} {'kvmesh ' + m:32} {a:10.2f} {b:10.2f} {ratio:7.2f}")


def step_budget(folder: Path, summaries: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A decode step's floor: the bytes it must read (weights of the decode graph, and the KV of
    the context) over this machine's measured read bandwidth, against the measured step time;
    and the attention alone (the graph's GroupQueryAttention nodes over that context, one row)
    against its share of the floor, the KV's bytes over the bandwidth."""
    from bench.budget import attention_ms, graph_weight_bytes, kv_bytes_per_token, read_bandwidth

    bandwidth = read_bandwidth()
    rows: dict[str, Any] = {"read_gb_s": bandwidth / 1e9}
    print(f"\nstep budget (read bandwidth {bandwidth / 1e9:.1f} GB/s, {THREADS} threads, numpy sum over 1 GiB)")
    print(
        f"{'numerics':13} {'context':>7} {'weights MB':>10} {'KV MB':>7} {'floor ms':>8} {'step ms':>8} {'x floor':>7}"
        f" {'attention ms':>12} {'KV floor ms':>11}"
    )
    kv_per_token = kv_bytes_per_token(folder)
    for engine in [e for e in ("kvmesh", "kvmesh-exact") if e in summaries]:
        graph = folder / ("model_decode.onnx" if engine == "kvmesh" else "model_last.onnx")
        if not graph.is_file():
            graph = folder / "model_last.onnx"
        weights = graph_weight_bytes(graph)
        for name, context in (("short", 40), ("long", SIZES["prompt_tokens"])):
            step_ms = 1000 / summaries[engine][f"decode_{name}_tok_s"]
            kv = context * kv_per_token
            floor_ms = (weights + kv) / bandwidth * 1000
            attention = attention_ms(graph, 1, context, THREADS)
            label = "int8 act." if engine == "kvmesh" else "exact"
            print(
                f"{label:13} {context:7} {weights / 1e6:10.1f} {kv / 1e6:7.1f} {floor_ms:8.2f} {step_ms:8.2f} "
                f"{step_ms / floor_ms:7.2f} {attention:12.2f} {kv / bandwidth * 1000:11.2f}"
            )
            rows[f"{engine}_{name}"] = {
                "context": context,
                "weight_bytes": weights,
                "kv_bytes": kv,
                "floor_ms": floor_ms,
                "step_ms": step_ms,
                "attention_ms": attention,
            }
    return rows


if __name__ == "__main__":
    main()
