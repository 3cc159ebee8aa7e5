"""A background thread that fails unexpectedly is never a silent hang: the node turns NOT_SERVING,
the requests that needed the thread end in INTERNAL, and the thread goes on."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.model.folder import ModelFolder
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc, stream_pb2
from tests.helpers.servers import MakeServer, ServerThread


def _status(server: ServerThread) -> int:
    with grpc.insecure_channel(server.address) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def _wait_not_serving(server: ServerThread, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while _status(server) == health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "still SERVING"
        time.sleep(0.05)


def test_an_exception_in_the_store_writer(tiny_fp32: ModelFolder, servers: MakeServer) -> None:
    node = servers("prefill", tiny_fp32)
    store = node.server.node.store

    def broken(*args: object, **kw: object) -> object:
        raise RuntimeError("injected: the store is broken")

    store.put = broken  # type: ignore[method-assign]
    store.pin = broken  # type: ignore[method-assign]
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 200, 40)]
    with grpc.insecure_channel(node.address) as channel:
        stub = prefill_pb2_grpc.PrefillStub(channel)
        list(stub.Prefill(prefill_pb2.PrefillRequest(tokens=prompt), timeout=30))  # its blocks go to the writer
        _wait_not_serving(node)
        with pytest.raises(grpc.RpcError) as err:  # needs the writer: INTERNAL, at once, not a hang
            stub.Pin(prefill_pb2.PinRequest(tokens=prompt), timeout=30)
        assert err.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
        assert stub.GetLoad(prefill_pb2.GetLoadRequest(), timeout=5).store_writes_pending == 0  # it went on
    assert b'kvmesh_prefill_faults_total{error="RuntimeError"}' in _metrics(node)


def _metrics(server: ServerThread) -> bytes:
    from prometheus_client import generate_latest

    return bytes(generate_latest(server.server.node.metrics.registry))


def test_an_exception_in_the_decode_loop(tiny_fp32: ModelFolder, servers: MakeServer) -> None:
    prefill = servers("prefill", tiny_fp32)
    node = servers("decode", tiny_fp32)
    batch = node.server.node.batcher.batch

    def broken(tokens: object) -> object:
        raise RuntimeError("injected: the step failed")

    batch.step = broken  # type: ignore[method-assign]
    request = decode_pb2.DecodeRequest(
        tokens=[5, 6, 7, 8], prefill_node=prefill.address, params=stream_pb2.GenerationParams(max_tokens=8)
    )
    with grpc.insecure_channel(node.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(decode_pb2_grpc.DecodeStub(channel).Decode(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    _wait_not_serving(node)
    assert b'kvmesh_decode_faults_total{error="RuntimeError"}' in _metrics(node)
