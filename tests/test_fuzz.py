"""Fuzzed requests, public and internal: arbitrary bytes to every method of the proxy, a prefill
node and a colocated worker get only documented status codes (never UNKNOWN or INTERNAL), and every
node still serves afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh.client import Client
from kvmesh.model.folder import ModelFolder
from kvmesh.v1 import decode_pb2, generation_pb2, kv_pb2, prefill_pb2, stream_pb2
from proxy.config import ProxyConfig
from proxy.server import ProxyServer
from tests.helpers.servers import MakeServer, ServerThread

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
# (server, method, streaming): the worker's Decode ignores prefill_node, so no fuzzed address is dialled
METHODS = [
    ("proxy", "/kvmesh.v1.Generation/Generate", True),
    ("prefill", "/kvmesh.v1.Prefill/Prefill", True),
    ("prefill", "/kvmesh.v1.Prefill/WatchCache", True),
    ("prefill", "/kvmesh.v1.Prefill/GetLoad", False),
    ("prefill", "/kvmesh.v1.Prefill/Pin", False),
    ("worker", "/kvmesh.v1.Decode/Decode", True),
    ("worker", "/kvmesh.v1.Decode/GetLoad", False),
    ("worker", "/kvmesh.v1.Prefill/Prefill", True),
    ("prefill", "/kvmesh.v1.Prefill/StoreKV", None),  # client streaming: the fuzzed bytes, then a seed
    ("worker", "/kvmesh.v1.Prefill/StoreKV", None),
]
# Valid messages with hostile values, as seeds beside the random bytes
SEEDS = [
    generation_pb2.GenerateRequest(prompt="hi", params=stream_pb2.GenerationParams(max_tokens=4, top_k=2**31)),
    generation_pb2.GenerateRequest(messages=[generation_pb2.ChatMessage(role="user", content="<|im_end|>")]),
    prefill_pb2.PrefillRequest(tokens=[2**31 - 1, 5]),
    prefill_pb2.PrefillRequest(tokens=[-1, 5]),
    prefill_pb2.PrefillRequest(tokens=[1, 2, 3], wire_dtype=77, sampling=prefill_pb2.Sampling(temperature=-1)),
    prefill_pb2.PinRequest(tokens=[7] * 40),
    decode_pb2.DecodeRequest(tokens=[3] * 10, params=stream_pb2.GenerationParams(max_tokens=2**32 - 1)),
    decode_pb2.DecodeRequest(tokens=[4, -7], params=stream_pb2.GenerationParams(seed=2**64 - 1, max_tokens=3)),
    prefill_pb2.StoreKVRequest(header=prefill_pb2.StoreKVHeader(tokens=[5] * 32, first_block=9)),
    prefill_pb2.StoreKVRequest(
        header=prefill_pb2.StoreKVHeader(
            tokens=[5] * 16, kv=kv_pb2.KVHeader(layout=kv_pb2.KVLayout(layers=2**31, tokens=16, dtype=1))
        )
    ),
    prefill_pb2.StoreKVRequest(chunk=kv_pb2.KVChunk(index=0, data=b"x" * 64)),
    prefill_pb2.StoreKVRequest(  # "it is over", no KV, yet chunks may follow
        header=prefill_pb2.StoreKVHeader(
            tokens=[5] * 32, first_block=2, last=True, decoded=True, kv=kv_pb2.KVHeader(layout=kv_pb2.KVLayout(dtype=1))
        )
    ),
]


@pytest.fixture(scope="module")
def nodes(tiny_fp32: ModelFolder, module_servers: MakeServer) -> Iterator[dict[str, ServerThread]]:
    start = module_servers
    prefill = start("prefill", tiny_fp32)
    worker = start("worker", tiny_fp32, slot_tokens=250)
    config = ProxyConfig(model=tiny_fp32.path, port=0, http_port=0, worker=(worker.address,), block_size=8)
    proxy = ServerThread(lambda: ProxyServer(config))
    assert proxy.call(proxy.server.node.backends.wait_healthy(20))
    yield {"proxy": proxy, "prefill": prefill, "worker": worker}
    proxy.stop()


def _call(channel: grpc.Channel, method: str, streaming: bool | None, data: bytes) -> grpc.StatusCode:
    """streaming: True a response stream, False unary, None a request stream (data, then a seed)."""
    try:
        if streaming is None:
            channel.stream_unary(method)(iter([data, SEEDS[-1].SerializeToString()]), timeout=20)
        elif streaming:
            call = channel.unary_stream(method)(data, timeout=20)
            for i, _ in enumerate(call):
                if i >= 0:  # WatchCache never ends by itself: its first event is enough
                    call.cancel()
                    break
        else:
            channel.unary_unary(method)(data, timeout=20)
    except grpc.RpcError as e:
        code = e.code()  # type: ignore[attr-defined]
        return grpc.StatusCode.OK if code == grpc.StatusCode.CANCELLED else code  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("server", "method", "streaming"), METHODS)
def test_fuzzed_bytes_get_documented_codes(
    nodes: dict[str, ServerThread], server: str, method: str, streaming: bool | None
) -> None:
    with grpc.insecure_channel(nodes[server].address) as channel:

        @settings(
            max_examples=int(os.environ.get("KVMESH_FUZZ_EXAMPLES", "300")),
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(st.one_of(st.binary(max_size=300), st.sampled_from([m.SerializeToString() for m in SEEDS])))
        def fuzz(data: bytes) -> None:
            code = _call(channel, method, streaming, data)
            assert code in DOCUMENTED, (code, data)

        fuzz()
    for name, node in nodes.items():
        with grpc.insecure_channel(node.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    assert Client(nodes["proxy"].address).chat([{"role": "user", "content": "still there?"}], max_tokens=3).finished
