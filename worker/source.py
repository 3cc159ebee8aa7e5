"""A colocated worker's KV source: its prefill node in this very process (its own store, queue,
cache events and Prefill service, as a prefill node's), the KV handed over as is: prefilled in
place into a decode slot lent by the batch where one is free (kvmesh/model/lease.py)."""

from __future__ import annotations

from collections.abc import Callable

from decode_svc.sources import PendingKV, Prefilled, PrefillJob, StoreJob
from kvmesh.model.kv import KVCache
from kvmesh.model.lease import SlotLease
from prefill_svc.node import PrefillNode


class LocalPrefill:
    def __init__(self, node: PrefillNode, lease: Callable[[], SlotLease | None]) -> None:
        """lease: the decode batch's (a slot the prompt is prefilled into, in place)."""
        self.node, self.lease = node, lease

    async def start(self, job: PrefillJob) -> tuple[Prefilled, PendingKV]:
        lease = self.lease()
        try:
            outcome = await self.node.prefill(job.tokens, job.params, job.salt, job.request_id, job.replay, lease)
        except BaseException:
            if lease is not None:
                lease.abandon()  # the slot goes back once the prefill thread is done with it
            raise
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

        return info, PendingKV(handed_over, lease.abandon if lease is not None else lambda: None)

    async def store(self, job: StoreJob) -> int:
        return await self.node.store_kv(job.tokens, job.salt, job.first_block, job.kv, job.decoded, job.last)

    async def close(self) -> None:
        await self.node.close()
