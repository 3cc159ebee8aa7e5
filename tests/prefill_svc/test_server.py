"""The Prefill service over real gRPC on 127.0.0.1 (port 0), a real LMDB store and the tiny model."""

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from kv_transfer.wire import receive
from kvmesh.model.folder import ModelFolder
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.sampling import Sampler, SamplingParams
from kvmesh.v1 import kv_pb2, prefill_pb2, prefill_pb2_grpc
from prefill_svc.config import PrefillConfig
from prefill_svc.server import PrefillServer
from tests.helpers.servers import ServerThread

BLOCK = 8
PROMPT = [int(t) for t in np.random.default_rng(9).integers(0, 256, 30)]  # 3 full blocks + 6


def _config(folder: ModelFolder, store: Path, **kw: object) -> PrefillConfig:
    base = {
        "model": folder.path,
        "store": store,
        "port": 0,
        "block_size": BLOCK,
        "chunk_bytes": 4096,
        "threads": 1,
        "drain_seconds": 1.0,
        "node_id": "p0",
    }
    return PrefillConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture
def server(tiny_fp32: ModelFolder, tmp_path: Path) -> Iterator[ServerThread]:
    s = ServerThread(lambda: PrefillServer(_config(tiny_fp32, tmp_path / "store")))
    yield s
    s.stop()


def _stub(server: ServerThread) -> prefill_pb2_grpc.PrefillStub:
    return prefill_pb2_grpc.PrefillStub(grpc.insecure_channel(server.address))


def _request(tokens: list[int], **kw: object) -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(request_id="r", tokens=tokens, **kw)  # type: ignore[arg-type]


def test_prefill_stream_carries_the_full_prefill(server: ServerThread, tiny_fp32: ModelFolder) -> None:
    runner = ModelRunner(tiny_fp32, RunnerConfig(threads=1))
    logits, kv = runner.prefill(PROMPT)
    token, logprob = Sampler(SamplingParams()).sample(logits)
    for expected_cached in (0, 3 * BLOCK):  # cold, then warm from the store
        got = receive(_stub(server).Prefill(_request(PROMPT)))
        h = got.header
        assert (h.cached_tokens, h.first_token, h.layout.tokens) == (expected_cached, token, len(PROMPT))
        assert h.first_logprob == pytest.approx(logprob, abs=1e-5)
        assert h.model_fingerprint == tiny_fp32.fingerprint
        for a, b in zip(got.kv.keys + got.kv.values, kv.keys + kv.values, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        server.call(_flush(server))


async def _flush(server: ServerThread) -> None:
    server.server.node.writer.flush()


def test_fp16_on_the_wire(server: ServerThread) -> None:
    f32 = receive(_stub(server).Prefill(_request(PROMPT)))
    f16 = receive(_stub(server).Prefill(_request(PROMPT, wire_dtype=kv_pb2.KV_DTYPE_FLOAT16)))
    assert f16.header.total_bytes * 2 == f32.header.total_bytes
    np.testing.assert_allclose(f16.kv.keys[1], f32.kv.keys[1], atol=2e-3, rtol=1e-3)


def test_watch_cache_snapshot_then_events(server: ServerThread) -> None:
    stub = _stub(server)
    events = stub.WatchCache(prefill_pb2.WatchCacheRequest())
    first = next(events)
    assert first.snapshot_done and not first.block_keys and first.node_id == "p0" and first.block_size == BLOCK
    receive(stub.Prefill(_request(PROMPT)))
    stored = next(events)
    assert stored.kind == prefill_pb2.CacheEvent.STORED and len(stored.block_keys) == 3
    assert stub.Pin(prefill_pb2.PinRequest(tokens=PROMPT)).pinned_tokens == 3 * BLOCK
    assert next(events).kind == prefill_pb2.CacheEvent.PINNED
    events.cancel()
    again = next(stub.WatchCache(prefill_pb2.WatchCacheRequest()))  # a resync: the snapshot has them
    assert again.snapshot_done and set(again.block_keys) == set(stored.block_keys)
    load = stub.GetLoad(prefill_pb2.GetLoadRequest())
    assert (load.store_blocks, load.pinned_blocks, load.queued_prefill_tokens) == (3, 3, 0)


def test_restarted_node_is_warm(tiny_fp32: ModelFolder, tmp_path: Path) -> None:
    for expected in (0, 3 * BLOCK):
        s = ServerThread(lambda: PrefillServer(_config(tiny_fp32, tmp_path / "store")))
        assert receive(_stub(s).Prefill(_request(PROMPT))).header.cached_tokens == expected
        s.stop()  # drains: the writer finishes storing before the store closes


def test_health_and_reflection(server: ServerThread) -> None:
    channel = grpc.insecure_channel(server.address)
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="kvmesh.v1.Prefill"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    ask = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    for version in ("v1alpha", "v1"):  # grpcurl asks v1 first; the two are the same messages
        method = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo")
        reply = reflection_pb2.ServerReflectionResponse.FromString(next(iter(method(iter([ask])))))
        names = {s.name for s in reply.list_services_response.service}
        assert {"kvmesh.v1.Prefill", "grpc.reflection.v1.ServerReflection"} <= names, version


@pytest.mark.parametrize(
    ("request_kw", "code"),
    [
        ({"tokens": []}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"tokens": [1] * 300}, grpc.StatusCode.INVALID_ARGUMENT),  # past the tiny model's context
        (
            {"tokens": PROMPT, "sampling": prefill_pb2.Sampling(temperature=float("nan"))},
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ({"tokens": PROMPT, "sampling": prefill_pb2.Sampling(top_p=1.5)}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_input_gets_a_clear_status(
    server: ServerThread, request_kw: dict[str, object], code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        receive(_stub(server).Prefill(prefill_pb2.PrefillRequest(**request_kw)))  # type: ignore[arg-type]
    assert err.value.code() == code  # type: ignore[attr-defined]


def test_over_the_queue_limit_is_resource_exhausted(tiny_fp32: ModelFolder, tmp_path: Path) -> None:
    s = ServerThread(lambda: PrefillServer(_config(tiny_fp32, tmp_path / "store", max_queued_tokens=16)))
    try:
        with pytest.raises(grpc.RpcError) as err:
            receive(_stub(s).Prefill(_request(PROMPT)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    finally:
        s.stop()


def test_one_tenant_filling_the_queue_does_not_lock_another_out(real_int4: ModelFolder, tmp_path: Path) -> None:
    """Tenant a sends six uncached prompts at once into a queue that holds four; tenant b's one
    prompt, sent after them, takes the place of a's newest waiting one and runs next, before the
    rest of a's backlog (on the real model, so the queue really forms behind the first prompt)."""
    import threading
    import time

    n = 300
    config = _config(real_int4, tmp_path / "store", max_queued_tokens=4 * n, block_size=16)
    s = ServerThread(lambda: PrefillServer(config))
    rng = np.random.default_rng(3)
    done: dict[str, tuple[float, str]] = {}

    def call(name: str, salt: bytes) -> None:
        prompt = [int(t) for t in rng.integers(0, 40_000, n)]
        stream = _stub(s).Prefill(_request(prompt, cache_salt=salt))  # starts the call now
        threading.Thread(target=finish, args=(name, stream)).start()
        time.sleep(0.02)  # arrivals in this order

    def finish(name: str, stream: Iterator[prefill_pb2.PrefillResponse]) -> None:
        try:
            receive(stream)
            done[name] = (time.perf_counter(), "OK")
        except grpc.RpcError as e:
            done[name] = (time.perf_counter(), e.code().name)  # type: ignore[attr-defined]

    try:
        for i in range(6):
            call(f"a{i}", b"tenant-a")
        call("b", b"tenant-b")
        deadline = time.monotonic() + 60
        while len(done) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        codes = {name: code for name, (_, code) in done.items()}
        # a4, a5: over the bound at once; a3: the newest waiting, pushed out for b
        assert codes == {
            "a0": "OK",
            "a1": "OK",
            "a2": "OK",
            "a3": "RESOURCE_EXHAUSTED",
            "a4": "RESOURCE_EXHAUSTED",
            "a5": "RESOURCE_EXHAUSTED",
            "b": "OK",
        }, codes
        finished = sorted((t, name) for name, (t, code) in done.items() if code == "OK")
        assert [name for _, name in finished] == ["a0", "b", "a1", "a2"]
        registry = s.server.node.metrics.registry  # type: ignore[attr-defined]
        assert registry.get_sample_value("kvmesh_prefill_pushed_out_total") == 1
    finally:
        s.stop()
