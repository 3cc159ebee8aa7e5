"""Sampling parameters between kvmesh's plain objects and their protobuf forms: the one place
every service converts them (the proxy, decode nodes and prefill nodes all meet them)."""

from __future__ import annotations

from kvmesh.sampling import SamplingParams
from kvmesh.v1 import prefill_pb2, stream_pb2

DEFAULT_MAX_TOKENS = 256  # GenerationParams.max_tokens 0 is read as this


def params_from_pb(msg: stream_pb2.GenerationParams) -> SamplingParams:
    seed = msg.seed if msg.HasField("seed") else None
    return SamplingParams(
        msg.temperature,
        msg.top_k,
        msg.top_p or 1.0,
        seed,
        msg.max_tokens or DEFAULT_MAX_TOKENS,
        tuple(msg.stop),
        msg.ignore_eos,
    )


def params_to_pb(p: SamplingParams) -> stream_pb2.GenerationParams:
    return stream_pb2.GenerationParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        seed=p.seed,
        max_tokens=p.max_tokens,
        stop=list(p.stop),
        ignore_eos=p.ignore_eos,
    )


def sampling_to_pb(p: SamplingParams) -> prefill_pb2.Sampling:
    """What the prefill node needs to draw the first token."""
    return prefill_pb2.Sampling(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed)


def sampling_from_pb(msg: prefill_pb2.Sampling) -> SamplingParams:
    seed = msg.seed if msg.HasField("seed") else None
    return SamplingParams(msg.temperature, msg.top_k, msg.top_p or 1.0, seed, max_tokens=1)
