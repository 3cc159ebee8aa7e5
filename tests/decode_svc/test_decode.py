"""The Decode service over real gRPC on 127.0.0.1: a real prefill node, a real decode node, the
tiny model; and the colocated worker."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvmesh.generate import Finished, generate
from kvmesh.model.folder import ModelFolder
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.sampling import SamplingParams
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, stream_pb2
from tests.helpers.relay import Relay
from tests.helpers.servers import MakeServer, ServerThread

ROOT = Path(__file__).parents[2]
PROMPTS = [
    [int(t) for t in np.random.default_rng(s).integers(0, 256, n)] for s, n in ((1, 9), (2, 40), (3, 23), (4, 61))
]


def _alone(folder: ModelFolder, prompt: list[int], params: SamplingParams) -> list[int]:
    """`kvmesh generate` in one process: the reference."""
    *_, done = generate(ModelRunner(folder, RunnerConfig(threads=1)), _tok(folder), prompt, params)
    assert isinstance(done, Finished)
    return done.token_ids


def _tok(folder: ModelFolder):  # type: ignore[no-untyped-def]
    from kvmesh.model.tokenizer import ChatTokenizer

    return ChatTokenizer(folder)


def _decode(address: str, prompt: list[int], prefill: str, **params: object) -> tuple[list[int], stream_pb2.Finished]:
    stub = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(address))
    request = decode_pb2.DecodeRequest(
        tokens=prompt, prefill_node=prefill, params=stream_pb2.GenerationParams(**params)
    )
    tokens, finished = [], None
    for ev in stub.Decode(request, timeout=60):
        if ev.HasField("token"):
            tokens.append(ev.token.token_id)
        if ev.HasField("finished"):
            finished = ev.finished
    assert finished is not None
    return tokens, finished


@pytest.mark.parametrize("variant", ["fp32", "int4_f16"])  # int4_f16: the CUDA graph (float16 KV on the wire)
def test_disaggregated_greedy_equals_one_process(
    variant: str, servers: MakeServer, request: pytest.FixtureRequest
) -> None:
    folder: ModelFolder = request.getfixturevalue(f"tiny_{variant}")
    p, d = servers("prefill", folder), servers("decode", folder)
    kv_per_token = ModelRunner(folder).layout.bytes_per_token
    for prompt in PROMPTS:
        tokens, finished = _decode(d.address, prompt, p.address, max_tokens=20)
        assert tokens == _alone(folder, prompt, SamplingParams(max_tokens=20))
        assert finished.usage.prompt_tokens == len(prompt) and finished.usage.completion_tokens == len(tokens)
        assert finished.timings.kv_bytes == len(prompt) * kv_per_token
    again, finished = _decode(d.address, PROMPTS[1], p.address, max_tokens=20)
    assert finished.usage.cached_tokens == 39  # its 5 stored blocks, less the last token (recomputed for logits)
    assert again == _alone(folder, PROMPTS[1], SamplingParams(max_tokens=20))


def test_batch_mates_do_not_change_anyones_tokens(tiny_fp32: ModelFolder, servers: MakeServer) -> None:
    p, d = servers("prefill", tiny_fp32), servers("decode", tiny_fp32)
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 7, "max_tokens": 24}
    alone = [_decode(d.address, q, p.address, max_tokens=24)[0] for q in PROMPTS] + [
        _decode(d.address, PROMPTS[0], p.address, **seeded)[0]
    ]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        if i < len(PROMPTS):
            results[i] = _decode(d.address, PROMPTS[i], p.address, max_tokens=24)[0]
        else:
            results[i] = _decode(d.address, PROMPTS[0], p.address, **seeded)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(alone))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(alone))] == alone
    assert alone[-1] == _alone(tiny_fp32, PROMPTS[0], SamplingParams(0.9, 0, 0.95, 7, 24))


def test_colocated_worker_gives_the_same_tokens(tiny_fp32: ModelFolder, servers: MakeServer) -> None:
    w = servers("worker", tiny_fp32)
    for prompt in PROMPTS[:2]:
        assert _decode(w.address, prompt, "", max_tokens=16)[0] == _alone(
            tiny_fp32, prompt, SamplingParams(max_tokens=16)
        )
    assert _decode(w.address, PROMPTS[1], "", max_tokens=4)[1].usage.cached_tokens == 39


def test_colocated_worker_prefills_into_its_slots_and_gets_each_back(
    tiny_fp32: ModelFolder, servers: MakeServer
) -> None:
    """Prompts are prefilled in place into a lent decode slot. However a request ends (its first
    token its last, cancelled mid-stream, or done) the one slot comes back: a leaked one would
    leave the next request waiting for a slot forever."""
    w = servers("worker", tiny_fp32, slots=1, max_waiting=0)
    batch = w.server.node.batcher.batch
    lent, lend = [], batch._lend

    def recorded():  # type: ignore[no-untyped-def]
        place = lend()
        lent.append(None if place is None else place.slot)
        return place

    batch._lend = recorded
    want = _alone(tiny_fp32, PROMPTS[1], SamplingParams(max_tokens=12))
    assert _decode(w.address, PROMPTS[1], "", max_tokens=1)[0] == want[:1]  # no join: the slot back unused
    call = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(w.address)).Decode(
        decode_pb2.DecodeRequest(tokens=PROMPTS[0], params=stream_pb2.GenerationParams(max_tokens=150))
    )
    next(call), next(call), next(call)
    call.cancel()

    def slot_back() -> None:  # a leaked slot never comes back: the assert fails after 10 s
        deadline = time.monotonic() + 10
        while (batch.active or batch._lent) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert batch.active == 0 and not batch._lent

    slot_back()  # the cancel reaches the batcher a moment later; with no wait list a request sent
    # before that is refused (RESOURCE_EXHAUSTED), which is not what this test is about
    for _ in range(3):
        assert _decode(w.address, PROMPTS[1], "", max_tokens=12)[0] == want
    slot_back()
    # in place into the one slot each time (None: a prefill that found it still busy, out of place)
    assert lent[:2] == [0, 0] and set(lent) <= {0, None} and lent.count(0) >= 4


@pytest.mark.parametrize("shape", ["worker", "pools"])
def test_prompts_waiting_at_once_are_prefilled_in_one_run(
    shape: str, tiny_fp32: ModelFolder, servers: MakeServer
) -> None:
    """Prompts that wait for the model thread at once are prefilled together (a colocated
    worker's each into its decode slot, a prefill node's out of place, the stored prefix they
    share read once), and each reply is the one it gets alone: four cold prompts, then four new
    ones after the same 40-token prefix (a system prompt's), which the first four stored; then
    four that add one token to it, which a prefill node runs alone (its one-row kernel)."""
    if shape == "worker":
        w = servers("worker", tiny_fp32, slots=4)
        prefill, at, decode, via = w.server.prefill, w, w, ""
    else:
        p, d = servers("prefill", tiny_fp32), servers("decode", tiny_fp32, slots=4)
        prefill, at, decode, via = p.server.node, p, d, p.address
    common = PROMPTS[1]  # 40 tokens: 5 blocks of 8
    for round_ in range(3):
        suffixes = [
            [PROMPTS[i][: 3 + 5 * i] for i in range(4)],
            [PROMPTS[i][::-1][: 3 + 5 * i] for i in range(4)],
            [[PROMPTS[i][-1]] for i in range(4)],
        ][round_]
        prompts = [[*common, *suffix] for suffix in suffixes]
        want = [_alone(tiny_fp32, q, SamplingParams(max_tokens=12)) for q in prompts]
        gate = threading.Event()
        results: dict[int, tuple[list[int], stream_pb2.Finished]] = {}

        async def hold(gate: threading.Event = gate) -> None:  # the model thread busy: prompts queue behind it
            prefill.queue.background(lambda: gate.wait(10) and False)

        def send(i: int, results: dict[int, tuple[list[int], stream_pb2.Finished]] = results) -> None:
            results[i] = _decode(decode.address, prompts[i], via, max_tokens=12)  # noqa: B023

        at.call(hold())
        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while sum(map(len, prefill.queue._waiting.values())) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = prefill.metrics.together._value.get()
        gate.set()
        for t in threads:
            t.join(60)
        assert [results[i][0] for i in range(4)] == want
        together = 0 if round_ == 2 and shape == "pools" else 4  # else all four in one run
        assert prefill.metrics.together._value.get() - before == together
        assert [results[i][1].usage.cached_tokens for i in range(4)] == [0 if round_ == 0 else 40] * 4


def test_cancelled_stream_frees_its_slot(tiny_fp32: ModelFolder, servers: MakeServer) -> None:
    p, d = servers("prefill", tiny_fp32), servers("decode", tiny_fp32, slots=1, max_waiting=0)
    stub = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(d.address))
    long = decode_pb2.DecodeRequest(
        tokens=PROMPTS[0], prefill_node=p.address, params=stream_pb2.GenerationParams(max_tokens=150)
    )
    call = stub.Decode(long)
    next(call), next(call), next(call)
    with pytest.raises(grpc.RpcError) as busy:  # the one slot is taken, nothing may wait
        _decode(d.address, PROMPTS[1], p.address, max_tokens=5)
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    call.cancel()
    load = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(d.address)).GetLoad
    deadline = time.monotonic() + 10
    while load(decode_pb2.GetDecodeLoadRequest()).running_sequences and time.monotonic() < deadline:
        time.sleep(0.02)
    assert load(decode_pb2.GetDecodeLoadRequest()).free_slots == 1
    assert len(_decode(d.address, PROMPTS[1], p.address, max_tokens=5)[0]) == 5


@pytest.mark.parametrize(
    "fault", ["flip:1", "drop:1", "tokens:1", "heads:1", "fingerprint:0", "first:1000000", "huge:0"]
)
def test_damaged_kv_stream_is_data_loss_and_nothing_is_decoded(
    fault: str, tiny_fp32: ModelFolder, servers: MakeServer
) -> None:
    p = servers("prefill", tiny_fp32, chunk_bytes=4096)
    relay = ServerThread(lambda: Relay(p.address, fault))
    d = servers("decode", tiny_fp32)
    stub = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(d.address))
    request = decode_pb2.DecodeRequest(
        tokens=PROMPTS[3], prefill_node=relay.address, params=stream_pb2.GenerationParams(max_tokens=20)
    )
    tokens = []
    try:
        with pytest.raises(grpc.RpcError) as err:
            for ev in stub.Decode(request, timeout=30):
                if ev.HasField("token"):
                    tokens.append(ev)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS  # type: ignore[attr-defined]
        # at most the first token, sent before the KV (none when the header itself lies)
        assert len(tokens) <= (1 if fault.split(":")[0] in ("flip", "drop") else 0)
        assert (
            decode_pb2_grpc.DecodeStub(grpc.insecure_channel(d.address))
            .GetLoad(decode_pb2.GetDecodeLoadRequest())
            .running_sequences
            == 0
        )
    finally:
        relay.stop()


def test_prefill_node_dying_mid_stream_is_unavailable_not_a_hang(tiny_fp32: ModelFolder, servers: MakeServer) -> None:
    p = servers("prefill", tiny_fp32, chunk_bytes=4096)
    relay = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.relay", p.address, "die:1"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert relay.stdout is not None
    port = int(relay.stdout.readline())
    d = servers("decode", tiny_fp32)
    with pytest.raises(grpc.RpcError) as err:  # the call's 60 s deadline would end a hang in DEADLINE_EXCEEDED
        _decode(d.address, PROMPTS[3], f"127.0.0.1:{port}", max_tokens=20)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    relay.wait(10)


@pytest.mark.parametrize(
    ("prompt", "params", "code"),
    [
        ([], {}, grpc.StatusCode.INVALID_ARGUMENT),
        ([5] * 250, {}, grpc.StatusCode.INVALID_ARGUMENT),  # longer than a slot (200)
        ([5, 6], {"temperature": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT),
        ([5, 6], {"top_p": 2.0}, grpc.StatusCode.INVALID_ARGUMENT),
        ([5, 6], {"max_tokens": 10**8}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_requests(
    tiny_fp32: ModelFolder, servers: MakeServer, prompt: list[int], params: dict[str, object], code: grpc.StatusCode
) -> None:
    p, d = servers("prefill", tiny_fp32), servers("decode", tiny_fp32)
    with pytest.raises(grpc.RpcError) as err:
        _decode(d.address, prompt, p.address, **params)
    assert err.value.code() == code  # type: ignore[attr-defined]


def test_unknown_prefill_node_is_unavailable(tiny_fp32: ModelFolder, servers: MakeServer) -> None:
    d = servers("decode", tiny_fp32)
    with pytest.raises(grpc.RpcError) as err:
        _decode(d.address, PROMPTS[0], "127.0.0.1:1", max_tokens=4)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_free_slots_go_to_the_group_with_the_fewest_running(tiny_fp32: ModelFolder) -> None:
    """Six of tenant A queue before one of tenant B for two slots: B is admitted among the first
    ones (its group runs nothing), not after every A that came before it."""
    from decode_svc.batcher import Batcher, Sequence
    from kvmesh.sampling import Sampler

    runner = ModelRunner(tiny_fp32, RunnerConfig(threads=1))
    admitted: list[str] = []
    done = threading.Event()
    batcher = Batcher(runner, 2, 64, lambda *_: None)
    try:
        _, kv = runner.prefill([5, 6, 7])
        hold = threading.Event()
        batcher.batch.step = _gated(batcher.batch.step, hold)  # type: ignore[method-assign]

        def seq(name: str, group: bytes, tokens: int) -> Sequence:
            def emit(ev: tuple[int, float] | tuple[str, str]) -> None:
                if name not in admitted:
                    admitted.append(name)
                if ev == ("end", "length") and len(admitted) == 7:
                    done.set()

            return Sequence(name, 5, Sampler(SamplingParams()), tokens, (), emit, group=group)

        for name, group, tokens in [("a1", b"A", 1), ("a2", b"A", 30), ("a3", b"A", 2), ("a4", b"A", 2)]:
            batcher.submit(seq(name, group, tokens), kv)
        batcher.submit(seq("a5", b"A", 2), kv)
        batcher.submit(seq("a6", b"A", 2), kv)
        batcher.submit(seq("b1", b"B", 2), kv)
        hold.set()
        assert done.wait(30)
    finally:
        batcher.close()
    assert (
        admitted[0] == "a1"
        and admitted.index("b1") <= 2
        and sorted(admitted) == sorted(["a1", "a2", "a3", "a4", "a5", "a6", "b1"])
    )


def _gated(step, gate: threading.Event):  # type: ignore[no-untyped-def]
    def run(tokens):  # type: ignore[no-untyped-def]
        gate.wait(30)  # every sequence is queued before the first step
        return step(tokens)

    return run


def test_held_back_text_comes_as_a_text_event_of_no_token(tiny_fp32: ModelFolder, servers: MakeServer) -> None:
    """A stop string the reply begins but never completes: the text held back for it comes at the
    end as a TextEvent (no token id), and the reply's text is what it is without the stop."""
    p, d = servers("prefill", tiny_fp32), servers("decode", tiny_fp32)
    stub = decode_pb2_grpc.DecodeStub(grpc.insecure_channel(d.address))

    def events(**params: object) -> list[decode_pb2.DecodeEvent]:
        request = decode_pb2.DecodeRequest(
            tokens=PROMPTS[0], prefill_node=p.address, params=stream_pb2.GenerationParams(**params)
        )
        return list(stub.Decode(request, timeout=60))

    plain = events(max_tokens=12, ignore_eos=True)
    text = "".join(e.token.text for e in plain if e.HasField("token"))
    assert text and not any(e.HasField("text") for e in plain)
    held = events(max_tokens=12, ignore_eos=True, stop=[text[-1] + "\x00never"])
    kinds = [e.WhichOneof("kind") for e in held]
    assert kinds == ["prefilled"] + ["token"] * 12 + ["text", "finished"]
    assert "".join(e.token.text or e.text.text for e in held[1:-1]) == text
    assert held[-2].text.text.endswith(text[-1]) and held[-1].finished.usage.completion_tokens == 12
