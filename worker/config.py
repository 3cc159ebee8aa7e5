"""A colocated worker's settings: a whole decode node's and a whole prefill node's, one process and
one port. Flags `kvmesh worker --...` (a setting both have, such as --threads or --port, is given
once and goes to both), env KVMESH_WORKER_*."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from decode_svc.config import DecodeConfig
from prefill_svc.config import PrefillConfig

SHARED = frozenset(f.name for f in dataclasses.fields(DecodeConfig)) & frozenset(
    f.name for f in dataclasses.fields(PrefillConfig)
)


@dataclass(frozen=True)
class WorkerConfig:
    decode: DecodeConfig
    prefill: PrefillConfig

    @staticmethod
    def of(values: Mapping[str, object]) -> WorkerConfig:
        """Settings by name -> each half takes its own (the shared ones both)."""

        def part(cls: type) -> dict[str, object]:
            names = {f.name for f in dataclasses.fields(cls)}
            return {k: v for k, v in values.items() if k in names}

        unknown = set(values) - set(part(DecodeConfig)) - set(part(PrefillConfig))
        if unknown:
            raise TypeError(f"not a worker setting: {', '.join(sorted(unknown))}")
        return WorkerConfig(DecodeConfig(**part(DecodeConfig)), PrefillConfig(**part(PrefillConfig)))  # type: ignore[arg-type]
