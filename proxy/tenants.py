"""Tenants: who an API key names, their secret cache salt, and their fair share of the cluster.

A keys line is `KEY=TENANT`, optionally followed by that tenant's limits, `streams=N` (calls
running at once) and `tokens=N` (prompt + max_tokens of those calls); a tenant without its own
takes the proxy's defaults. Beyond its limits a tenant's next call is RESOURCE_EXHAUSTED at once,
so one tenant's flood (say 100 streams it never reads) cannot take every slot and wait-list place
of the cluster from the others.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kvmesh.errors import InvalidArgument, ResourceExhausted


@dataclass(frozen=True)
class Limits:
    streams: int
    tokens: int


@dataclass
class Tenant:
    name: str
    salt: bytes
    limits: Limits
    streams: int = 0  # running now
    tokens: int = 0  # their prompt + max_tokens

    @contextmanager
    def call(self) -> Iterator[Callable[[int], None]]:
        """Hold one stream of this tenant's share for the length of a call, checked before any work
        (a tenant at its limit has no prompt tokenized); the call then holds its tokens (prompt +
        max_tokens) with the function it is given, once it knows them."""
        if self.streams + 1 > self.limits.streams:
            raise self._over()
        self.streams += 1
        held = 0

        def hold(tokens: int) -> None:
            nonlocal held
            if self.tokens + tokens > self.limits.tokens:
                raise self._over()
            self.tokens, held = self.tokens + tokens, held + tokens

        try:
            yield hold
        finally:
            self.streams, self.tokens = self.streams - 1, self.tokens - held

    def _over(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"tenant {self.name[:64]} is at its limit ({self.streams} streams, {self.tokens} tokens running; "
            f"at most {self.limits.streams} and {self.limits.tokens})"
        )


def salt_of(tenant: str, secret: str) -> bytes:
    """The tenant's cache salt: an HMAC of its name keyed by the cluster's secret (a caller who knows
    the name but not the secret cannot name it to a prefill node)."""
    return hmac.new(secret.encode(), tenant.encode(), hashlib.sha256).digest()[:16]


def parse(lines: list[str], defaults: Limits, secret: str) -> dict[str, Tenant]:
    """API key -> its Tenant (one object per tenant name, shared by all its keys)."""
    tenants: dict[str, Tenant] = {}
    by_key: dict[str, Tenant] = {}
    for n, line in enumerate(lines, 1):
        head, *options = line.split()
        key, _, name = head.partition("=")
        if not key or not name:
            raise InvalidArgument(f"API key line {n} is not KEY=TENANT [streams=N] [tokens=N]")  # never echo a key
        limits = _limits(options, defaults, n)
        tenant = tenants.get(name)
        if tenant is None:
            tenant = tenants[name] = Tenant(name, salt_of(name, secret), limits)
        elif options and limits != tenant.limits:
            raise InvalidArgument(f"API key line {n} gives tenant {name[:64]} other limits than an earlier line")
        by_key[key] = tenant
    return by_key


def _limits(options: list[str], defaults: Limits, n: int) -> Limits:
    values = {"streams": defaults.streams, "tokens": defaults.tokens}
    for option in options:
        name, _, value = option.partition("=")
        if name not in values or not value.isdigit() or int(value) < 1:
            raise InvalidArgument(f"API key line {n}: limits are streams=N and tokens=N, N >= 1")
        values[name] = int(value)
    return Limits(**values)
