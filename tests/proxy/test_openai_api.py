"""The OpenAI HTTP API through the real `openai` SDK (and raw httpx for what the SDK will not send),
against a real proxy with a prefill and a decode node on 127.0.0.1, the tiny model."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from kvmesh.client import Client
from kvmesh.model.folder import ModelFolder
from proxy.config import ProxyConfig
from proxy.server import ProxyServer
from tests.helpers.servers import MakeServer, ServerThread

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proxy:
    server: ServerThread
    http: str  # base URL of the OpenAI API

    def sdk(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.http + "/v1", api_key=key, max_retries=0, timeout=60)


def _start(folder: ModelFolder, servers: MakeServer, **kw: object) -> Iterator[Proxy]:
    p, d = servers("prefill", folder), servers("decode", folder, slot_tokens=250)
    port = _free_port()
    config = ProxyConfig(
        model=folder.path, port=0, http_port=port, prefill=(p.address,), decode=(d.address,), block_size=8, **kw
    )  # type: ignore[arg-type]
    proxy = ServerThread(lambda: ProxyServer(config))
    assert proxy.call(proxy.server.node.backends.wait_healthy(20))
    yield Proxy(proxy, f"http://127.0.0.1:{port}")
    proxy.stop()


@pytest.fixture
def proxy(tiny_fp32: ModelFolder, servers: MakeServer) -> Iterator[Proxy]:
    yield from _start(tiny_fp32, servers)


def _model(proxy: Proxy) -> str:
    return proxy.sdk().models.list().data[0].id


def test_models_and_health(proxy: Proxy) -> None:
    models = proxy.sdk().models.list().data
    assert [m.id for m in models] == ["tiny"]  # the folder's name less its precision
    assert models[0].owned_by == "kvmesh" and models[0].created > 0
    assert httpx.get(proxy.http + "/health").status_code == 200


def test_chat_answers_as_the_grpc_api_does_and_says_where_it_went(proxy: Proxy) -> None:
    sdk, model = proxy.sdk(), _model(proxy)
    raw = sdk.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    reply = raw.parse()
    assert raw.headers["x-kvmesh-request-id"] and "reason=" in raw.headers["x-kvmesh-route"]
    grpc_reply = Client(proxy.server.address).chat(MESSAGES, max_tokens=12)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == grpc_reply.text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens == len(grpc_reply.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra is not None and reply.model_extra["kvmesh"]["decode_node"]


def test_a_streamed_chat_is_the_same_text_in_chunks(proxy: Proxy) -> None:
    sdk, model = proxy.sdk(), _model(proxy)
    whole = sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    chunks = list(
        sdk.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_completions_streamed_and_whole(proxy: Proxy) -> None:
    sdk, model = proxy.sdk(), _model(proxy)
    whole = sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    streamed = list(
        sdk.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def test_logprobs_and_seeded_sampling(proxy: Proxy) -> None:
    sdk, model = proxy.sdk(), _model(proxy)
    reply = sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, logprobs=True, temperature=0)  # type: ignore[arg-type]
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert all(t.logprob <= 0 for t in content)
    seeded = [
        sdk.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0.9, seed=3)  # type: ignore[arg-type]
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize(
    ("extra", "status", "words"),
    [
        ({"model": "gpt-4o"}, 404, "model_not_found"),
        ({"n": 2}, 400, "n is not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools is not supported"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"logit_bias": {"5": 10}}, 400, "logit_bias"),
        ({"top_logprobs": 3, "logprobs": True}, 400, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"temperature": 7}, 400, "temperature"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"frobnicate": 1}, 400, "frobnicate"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text parts"),
        ({"metadata": {"a": "b"}, "store": False, "user": "u1"}, 200, ""),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_name(
    proxy: Proxy, extra: dict[str, object], status: int, words: str
) -> None:
    body = {"model": _model(proxy), "messages": MESSAGES, "max_tokens": 4, **extra}
    r = httpx.post(proxy.http + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    if status != 200:
        error = r.json()["error"]
        assert words in error["message"] or words == error["code"]
        assert error["type"] in ("invalid_request_error", "rate_limit_error")


def test_bad_bodies_get_documented_statuses(proxy: Proxy) -> None:
    url = proxy.http + "/v1/chat/completions"
    assert httpx.post(url, content=b"{not json", timeout=30).status_code == 400
    assert httpx.post(url, json=[1, 2], timeout=30).status_code == 400
    assert httpx.post(url, content=b"x" * (5 << 20), timeout=30).status_code == 413
    assert httpx.get(proxy.http + "/v1/chat/completions", timeout=30).status_code == 405
    assert httpx.post(url, json={"messages": MESSAGES, "max_tokens": 2}, timeout=60).status_code == 200  # still serving


def test_api_keys_and_sessions(tiny_fp32: ModelFolder, servers: MakeServer) -> None:
    for proxy in _start(tiny_fp32, servers, api_keys=("k-a=tenant-a",)):
        with pytest.raises(openai.AuthenticationError):
            proxy.sdk("wrong").chat.completions.create(model="any", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
        with pytest.raises(openai.AuthenticationError):
            proxy.sdk("wrong").models.list()
        sdk = proxy.sdk("k-a")
        model = sdk.models.list().data[0].id
        history = [*MESSAGES]
        first = sdk.chat.completions.create(model=model, messages=history, max_tokens=8, prompt_cache_key="s-1")  # type: ignore[arg-type]
        history += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "More."},
        ]
        second = sdk.chat.completions.create(model=model, messages=history, max_tokens=8, prompt_cache_key="s-1")  # type: ignore[arg-type]
        cached = second.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
        assert cached >= first.usage.prompt_tokens // 8 * 8  # type: ignore[union-attr]
        # (the reason is what the router expected: the cache events of turn 1 may not have reached it yet)
        assert second.model_extra["kvmesh"]["routing_reason"]  # type: ignore[index]
        registry = proxy.server.server.node.metrics.registry
        assert (
            registry.get_sample_value(
                "kvmesh_proxy_http_requests_total", {"endpoint": "/v1/chat/completions", "status": "200"}
            )
            == 2
        )


def test_over_a_tenants_share_is_a_rate_limit_error(tiny_fp32: ModelFolder, servers: MakeServer) -> None:
    for proxy in _start(tiny_fp32, servers, api_keys=("k-small=small tokens=20",)):
        sdk = proxy.sdk("k-small")
        with pytest.raises(openai.RateLimitError) as err:
            sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=50)  # type: ignore[arg-type]
        assert err.value.response.headers["retry-after"] == "1"


def test_a_client_that_goes_away_frees_its_slot(tiny_fp32: ModelFolder, servers: MakeServer) -> None:
    p, d = servers("prefill", tiny_fp32), servers("decode", tiny_fp32, slots=1, max_waiting=0, slot_tokens=250)
    port = _free_port()
    config = ProxyConfig(model=tiny_fp32.path, port=0, http_port=port, prefill=(p.address,), decode=(d.address,))
    server = ServerThread(lambda: ProxyServer(config))
    try:
        assert server.call(server.server.node.backends.wait_healthy(20))
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 190, "stream": True, "temperature": 0}
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # streaming; then the client leaves
        deadline = time.monotonic() + 10
        while d.server.node.batcher.running and time.monotonic() < deadline:  # left at the next step
            time.sleep(0.02)
        again = httpx.post(url, json={**body, "stream": False, "max_tokens": 4}, timeout=60)
        assert again.status_code == 200, again.text  # the one slot was free again
    finally:
        server.stop()


def test_a_huge_body_is_refused_while_another_stream_flows(proxy: Proxy) -> None:
    url = proxy.http + "/v1/chat/completions"
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 190, "stream": True, "temperature": 0}
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        huge = httpx.post(url, content=b"{" + b" " * (16 << 20) + b"}", timeout=60)
        rest = [line for line in lines if line.startswith("data: ")]
    assert first.startswith("data: ") and huge.status_code == 413
    assert rest[-1] == "data: [DONE]"


def test_the_sdk_raises_its_own_typed_errors(proxy: Proxy) -> None:
    sdk = proxy.sdk()
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="n is not supported"):
        sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, n=3)  # type: ignore[arg-type]
