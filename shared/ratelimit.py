"""Per-key rate limits for the public API: a token bucket per API key owner.

Each owner gets a bucket of ``RATE_LIMIT_BURST`` tokens refilled at
``RATE_LIMIT_PER_MINUTE`` per minute; a request takes one token, and a request finding
the bucket empty is refused with :class:`shared.errors.RateLimited` (429) whose
``Retry-After`` says when the next token arrives. Public routes and runner credentials
are not limited (a pulling runner long-polls fetch_task all day).

Scope, honestly: the buckets live in the memory of one function instance. Cloud
Functions scale out to many instances, each with its own buckets, so a client spread
over N instances may get up to N times the limit. The global limit of the deployment is
the gateway's API-key quota (infra/terraform); this module bounds what one instance
serves to one tenant, and it is the whole limit of the embedded single-process server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator

from shared.auth import Principal
from shared.errors import RateLimited
from shared.settings import Settings

__all__ = ["RateLimiter", "WaitSlots"]

# How often buckets that have refilled completely are forgotten (memory stays bounded).
_SWEEP_EVERY_S = 60.0


@dataclasses.dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by API key owner; thread-safe (the dev server is threaded)."""

    def __init__(self, *, per_minute: int, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = per_minute / 60.0
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._last_sweep = clock()

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        return cls(per_minute=settings.rate_limit_per_minute, burst=settings.rate_limit_burst)

    def check(self, principal: Principal) -> None:
        """Take a token for ``principal``, or raise RateLimited; runners are never limited."""
        if "runner" in principal.roles:
            return
        self.take(principal.owner)

    def take(self, owner: str) -> None:
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(owner)
            if bucket is None:
                bucket = self._buckets[owner] = _Bucket(tokens=float(self.burst), updated=now)
            else:
                elapsed = max(0.0, now - bucket.updated)
                bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate_per_s)
                bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                self._forget_idle(now)
                return
            wait_s = (1.0 - bucket.tokens) / self.rate_per_s
        retry_after_s = max(1, math.ceil(wait_s))
        raise RateLimited(
            f"rate limit of {self.rate_per_s * 60:g} requests a minute (burst {self.burst}) "
            f"reached for this API key; retry in {retry_after_s}s",
            retry_after_s=retry_after_s,
        )

    def _forget_idle(self, now: float) -> None:
        """Drop buckets that are full again: a new bucket starts full, so nothing changes."""
        if now - self._last_sweep < _SWEEP_EVERY_S:
            return
        self._last_sweep = now
        refill_s = self.burst / self.rate_per_s
        idle = [owner for owner, bucket in self._buckets.items() if now - bucket.updated >= refill_s]
        for owner in idle:
            del self._buckets[owner]


class WaitSlots:
    """How many long polls (``?wait=``) each API key owner holds at once on this instance.

    A held wait keeps one of the server's worker threads; without a cap per owner one
    tenant's hundred waits take every thread and health checks queue behind them. Over
    the cap a wait is refused at once (429, retry in a second), so the others keep theirs.
    """

    def __init__(self, per_owner: int) -> None:
        self.per_owner = per_owner
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, owner: str) -> Iterator[None]:
        with self._lock:
            held = self._held.get(owner, 0)
            if held >= self.per_owner:
                raise RateLimited(
                    f"this API key already holds {held} long polls (MAX_WAITS_PER_TENANT); "
                    "ask again without wait, or when one of them has answered",
                    retry_after_s=1,
                    code="too_many_waits",
                )
            self._held[owner] = held + 1
        try:
            yield
        finally:
            with self._lock:
                self._held[owner] -= 1
                if not self._held[owner]:
                    del self._held[owner]
