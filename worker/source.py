"""A colocated worker's KV source: its prefill node in this very process (its own store, queue,
cache events and Prefill service, as a prefill node's), the KV handed over as is."""

from __future__ import annotations

from decode_svc.sources import PendingKV, Prefilled, PrefillJob, StoreJob
from kvmesh.model.kv import KVCache
from prefill_svc.node import PrefillNode


class LocalPrefill:
    def __init__(self, node: PrefillNode) -> None:
        self.node = node

    async def start(self, job: PrefillJob) -> tuple[Prefilled, PendingKV]:
        outcome = await self.node.prefill(job.tokens, job.params, job.salt, job.request_id, job.replay)
        info = Prefilled(
            outcome.first_token,
            outcome.first_logprob,
            outcome.cached_tokens,
            outcome.compute_s * 1000,
            outcome.store_read_s * 1000,
            0,
            self.node.config.block_size if self.node.config.prefix_cache else 0,
        )

        async def handed_over() -> KVCache:
            return outcome.kv

        return info, PendingKV(handed_over, lambda: None)

    async def store(self, job: StoreJob) -> int:
        return await self.node.store_kv(job.tokens, job.salt, job.first_block, job.kv, job.decoded, job.last)

    async def close(self) -> None:
        await self.node.close()
