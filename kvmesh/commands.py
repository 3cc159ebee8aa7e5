"""What each CLI command does, over the engine objects."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from kvmesh import aio, cluster, gc_tuning, logs
from kvmesh.errors import KvmeshError
from kvmesh.generate import Delta
from kvmesh.generate import generate as run_generate
from kvmesh.model.folder import ModelFolder
from kvmesh.model.gguf_import import Precision
from kvmesh.model.prepare import default_model_dir, find_default_gguf, prepare, wait_prepared
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.model.tokenizer import ChatTokenizer, chat_messages
from kvmesh.sampling import SamplingParams
from kvmesh.settings import build
from kvmesh.v1 import generation_pb2, stream_pb2

if TYPE_CHECKING:
    from kvmesh.client import Reply


def rpc_error(e: grpc.RpcError) -> str:
    """A failed call in one line: its status and the server's message (not the call object's repr)."""
    if isinstance(e, grpc.Call):
        return f"{e.code().name}: {e.details()}"
    return str(e)


def model_prepare(args: argparse.Namespace) -> int:
    precisions: list[Precision] = ["int4", "fp32"] if args.precision == "all" else [args.precision]
    if args.out and len(precisions) > 1:
        print("kvmesh: error: --out needs one --precision", file=sys.stderr)
        return 2
    gguf = args.gguf or find_default_gguf()
    for p in precisions:
        out = args.out or (default_model_dir(p) if args.gguf is None else Path(f"{gguf.stem}-{p}"))
        prepare(
            gguf,
            out,
            p,
            args.accuracy_level,
            args.force,
            args.exact_decode,
            args.activations,
            attention=args.decode_attention,
        )
        print(out)
    return 0


def model_wait(args: argparse.Namespace) -> int:
    """The model folder written by someone else (a deployment's Job) into a volume read here; then
    the rest of the command line, replacing this process (a compose service's entrypoint)."""
    out = default_model_dir(args.precision)
    gguf = find_default_gguf()
    wait_prepared(
        gguf,
        out,
        args.precision,
        args.timeout_s,
        args.accuracy_level,
        args.exact_decode,
        args.activations,
        attention=args.decode_attention,
    )
    command = args.then[1:] if args.then[:1] == ["--"] else args.then
    print(f"{out}: ready", flush=True)
    if command:
        os.execvp(command[0], command)
    return 0


def _folder(args: argparse.Namespace) -> ModelFolder:
    return ModelFolder.load(args.model or default_model_dir("int4"))


def _runner(args: argparse.Namespace, folder: ModelFolder) -> ModelRunner:
    config = RunnerConfig(threads=args.threads, provider=args.provider, decode_numerics=args.decode_numerics)
    return ModelRunner(folder, config)


def model_info(args: argparse.Namespace) -> int:
    folder = _folder(args)
    runner = _runner(args, folder)
    lay = runner.layout
    print(f"folder       {folder.path}\ngraph        {runner.graph}")
    print(f"layout       {lay.layers} layers x {lay.kv_heads} KV heads x {lay.head_dim} head_dim, {lay.dtype}")
    print(f"KV bytes     {lay.bytes_per_token} per token\ncontext      {folder.context_length}")
    print(f"decode       {runner.decode_numerics_said}\nprefill      {runner.prefill_numerics}")
    group = folder.group_graph
    together = f"{group.name} (prompts waiting at once prefilled in one run)" if group else "none"
    print(f"together     {together}")
    print(f"providers    {', '.join(runner.session.get_providers())}\nfingerprint  {folder.fingerprint}")
    return 0


def generate(args: argparse.Namespace) -> int:
    params = SamplingParams(
        args.temperature, args.top_k, args.top_p or 1.0, args.seed, args.max_tokens, tuple(args.stop)
    )
    folder = _folder(args)
    runner, tok = _runner(args, folder), ChatTokenizer(folder)
    gc_tuning.tune_for_serving()
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

    logs.setup("prefill")
    aio.run(serve(build(PrefillConfig, args)))
    return 0


def decode(args: argparse.Namespace) -> int:
    from decode_svc.config import DecodeConfig
    from decode_svc.server import serve

    logs.setup("decode")
    aio.run(serve(build(DecodeConfig, args)))
    return 0


def worker(args: argparse.Namespace) -> int:
    from decode_svc.config import DecodeConfig
    from prefill_svc.config import PrefillConfig
    from worker.config import WorkerConfig
    from worker.server import serve

    logs.setup("worker")
    aio.run(serve(WorkerConfig(build(DecodeConfig, args), build(PrefillConfig, args))))
    return 0


def proxy(args: argparse.Namespace) -> int:
    from proxy.config import ProxyConfig
    from proxy.server import serve

    logs.setup("proxy")
    aio.run(serve(build(ProxyConfig, args)))
    return 0


def _stats(finished: stream_pb2.Finished | None, started: generation_pb2.Started | None, ttft_s: float) -> str:
    where = f", prefill {started.prefill_node} ({started.routing_reason})" if started else ""
    if finished is None:
        return f"[time to first token {ttft_s * 1000:.0f} ms{where}]"
    u = finished.usage
    return (
        f"[{u.prompt_tokens} prompt tokens, {u.cached_tokens} cached, {u.completion_tokens} generated, "
        f"finish: {finished.finish_reason}, time to first token {ttft_s * 1000:.0f} ms{where}]"
    )


def remote_generate(args: argparse.Namespace) -> int:
    """`kvmesh generate --endpoint`: through a proxy, streamed."""
    from kvmesh.client import Client, Reply

    client = Client(_endpoint(args), args.api_key)
    messages = None if args.raw else chat_messages(args.prompt, args.system)
    params = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens,
        "stop": args.stop,
        **({"seed": args.seed} if args.seed is not None else {}),
    }
    reply, start = Reply(), time.perf_counter()
    first = _stream(client.generate(messages, "" if messages else args.prompt, args.session, **params), reply, start)
    print("\n" + _stats(reply.finished, reply.started, first), file=sys.stderr)
    return 0


def _stream(events: Iterator[generation_pb2.GenerateEvent], reply: Reply, start: float) -> float:
    """Write the text to stdout as it comes. -> seconds to the first token (0: none)."""
    first = 0.0
    try:
        for event in events:
            reply.add(event)
            kind = event.WhichOneof("kind")
            if kind == "token":
                first = first or time.perf_counter() - start
            if kind in ("token", "text"):
                sys.stdout.write(event.token.text if kind == "token" else event.text.text)
                sys.stdout.flush()
    except KvmeshError:
        if first:
            print(file=sys.stderr)  # the error on a line of its own, after the text so far
        raise
    return first


def cluster_chat(args: argparse.Namespace) -> int:
    """Interactive, multi-turn under one session id; per turn: cached tokens, time to first token."""
    import uuid

    from kvmesh.client import Client, Reply

    client, session = Client(_endpoint(args), args.api_key), args.session or uuid.uuid4().hex
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"session {session}; an empty line or end of input ends it", file=sys.stderr)
    while line := _read_line("> "):
        messages.append({"role": "user", "content": line})
        reply, start = Reply(), time.perf_counter()
        first = _stream(client.generate(messages, session_id=session, max_tokens=args.max_tokens), reply, start)
        print("\n" + _stats(reply.finished, reply.started, first), file=sys.stderr)
        messages.append({"role": "assistant", "content": reply.text})
    return 0


def _read_line(prompt: str) -> str:
    try:
        return input(prompt).strip()
    except EOFError:  # Ctrl-D or the end of piped input: the conversation ends cleanly
        return ""


def _endpoint(args: argparse.Namespace) -> str:
    """--endpoint, else the running local cluster's proxy (kvmesh up), else the default port."""
    if args.endpoint:
        return str(args.endpoint)
    proxies = [p.address for p in cluster.load_state() if p.kind == "proxy"]
    return proxies[0] if proxies else "127.0.0.1:50051"


def up_spec(args: argparse.Namespace) -> tuple[cluster.ClusterSpec, str]:
    """The cluster `kvmesh up ARGS` starts, and why that shape."""
    shape, why = cluster.shape_for(len(os.sched_getaffinity(0)), args.prefill, args.decode, args.workers, args.threads)
    shape["pin"] = bool(args.pin or shape.get("pin", False))
    rest = {name: getattr(args, name) for name in ("port", "policy", "model", "prefix_cache", "http_port")}
    return cluster.ClusterSpec(**shape, **rest), why  # type: ignore[arg-type]


def cluster_up(args: argparse.Namespace) -> int:
    spec, why = up_spec(args)
    print(f"shape: {cluster.describe(spec)} ({why})")
    procs = cluster.up(spec)
    for p in procs:
        print(f"{p.name:10} {p.address:16} pid {p.pid}  log {p.log}")
    http = f", OpenAI API http://127.0.0.1:{spec.http_port}/v1" if spec.http_port else ""
    print(f"kvmesh is up: the endpoint is {procs[-1].address} (gRPC){http} (kvmesh status; kvmesh down)")
    return 0


def cluster_status(args: argparse.Namespace) -> int:
    rows = cluster.status()
    if not rows:
        print("no cluster is up (kvmesh up)")
        return 1
    for r in rows:
        extra = "  ".join(str(r[k]) for k in ("load", "decode", "cache") if k in r)
        print(f"{r['name']:10} {r['address']:16} {r['process']:8} {r['health']:12} {extra}")
    return 0


def cluster_down(args: argparse.Namespace) -> int:
    print(f"stopped {cluster.down()} processes")
    return 0


def health(args: argparse.Namespace) -> int:
    """gRPC health check: 0 when SERVING, 1 otherwise (compose healthchecks run it)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(args.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=3
            )
    except grpc.RpcError as e:
        print(f"{args.address}: {rpc_error(e)}", file=sys.stderr)
        return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def bench(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    from kvmesh.loadgen import cascade, report
    from kvmesh.loadgen.summary import Summary
    from kvmesh.loadgen.workload import WorkloadSpec, build_workload

    spec, fleet = build(WorkloadSpec, args), build(cascade.Fleet, args)
    folder = ModelFolder.load(Path(fleet.model) if fleet.model else default_model_dir("int4"))
    tok = ChatTokenizer(folder)
    workload = build_workload(spec, tok.encode, tok.decode)
    fleet = replace(fleet, model=str(folder.path))  # the clusters run under their own KVMESH_HOME
    print(f"workload: {len(workload.sessions)} sessions, {workload.requests} requests", file=sys.stderr)
    if args.endpoint:
        summaries = [cascade.run_endpoint(args.endpoint, workload, progress=not args.no_progress)]
    else:
        configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
        for c in configs:
            cascade.cluster_spec(c, fleet)  # an unknown name fails before any cluster starts

        def done(s: Summary) -> None:
            print(f"{s.config}: {s.requests} requests, TTFT p50 {s.ttft_p50_ms:.0f} ms", file=sys.stderr)

        summaries = cascade.run_cascade(workload, fleet, configs, done, progress=not args.no_progress)
    print(report.table(summaries))
    for path in report.write(spec, asdict(fleet), summaries, Path(args.out)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def simulate(args: argparse.Namespace) -> int:
    import json
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import replace

    from kvmesh.errors import InvalidArgument
    from kvmesh.sim import study
    from kvmesh.sim.fleet import Costs, Scenario, balanced_rate

    scenario = build(Scenario, args)
    costs = study.costs_from_bench(Path(args.calibration)) if args.calibration else Costs()
    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    if unknown := [n for n in names if n not in study.POLICIES]:
        raise InvalidArgument(f"unknown policies {unknown}: choose from {', '.join(study.POLICIES)}")
    # Every policy faces the traffic a cache-aware fleet of this size is loaded to `utilization` by.
    rate = scenario.rate or balanced_rate(scenario, costs)
    scenario = replace(scenario, rate=rate)
    print(f"{scenario.sessions} sessions at {rate:.1f}/s on {scenario.nodes} nodes; costs {costs}", file=sys.stderr)
    jobs = args.jobs or len(os.sched_getaffinity(0))
    # spawn, not fork: this process has ONNX Runtime's threads loaded, a forked child could hang on their locks
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(study.run_policy, n, scenario, costs, args.load_bound) for n in names]
        small = replace(scenario, sessions=args.sizing_sessions)
        targets = {f"p50 <= {args.ttft_p50_target_ms:.0f} ms": (args.ttft_p50_target_ms, 50)}
        targets[f"p99 <= {args.ttft_p99_target_ms:.0f} ms"] = (args.ttft_p99_target_ms, 99)
        sized = [n for n in names if n in ("cache_aware", "naive")] if args.sizing_sessions else []
        sizing = {
            (t, n): pool.submit(study.nodes_needed, n, small, costs, ms, pct, rate, 256 * scenario.nodes)
            for t, (ms, pct) in targets.items()
            for n in sized
        }
        outcomes = [f.result() for f in futures]
        needed: dict[str, dict[str, int]] = {}
        for (t, n), f in sizing.items():
            needed.setdefault(t, {})[n] = f.result()
    print(study.table(outcomes, needed))
    if needed:
        print(f"(TTFT targets at {rate:.1f} sessions/s, sized on {args.sizing_sessions} sessions)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulate.json").write_text(json.dumps(study.to_json(scenario, costs, outcomes, needed), indent=2))
    print(f"wrote {out / 'simulate.json'}", file=sys.stderr)
    return 0
