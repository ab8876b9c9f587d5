"""Where a pull-mode runner gets its next task: the fetch_task function over HTTP, or the
store itself (a runner co-located with its store, and tests).

A fetch is a long poll, and shutdown cancels it rather than wait for its end: each source
makes that safe (the store source gives back a claim that lands meanwhile; the task API
claims nothing for a runner that hung up, see shared.http.caller_gone)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import functools
import time
from collections.abc import Callable
from typing import Protocol

import httpx

from gpu_runner.wake import Wake
from shared.errors import UpstreamUnavailable
from shared.service import claim_for_runner
from shared.settings import Settings
from shared.store.base import TaskStore
from shared.store.notify import TaskChange
from shared.tasks import Task, utcnow

__all__ = ["HttpTaskSource", "StoreTaskSource", "TaskSource"]

# A claim's answer: the task taken (or None), whether more work may be claimable now, and
# when to look again although nothing is published (None: only a change brings work).
_Claimed = tuple[Task | None, bool, dt.datetime | None]


class TaskSource(Protocol):
    async def next_task(self, *, worker_id: str, environments: list[str], wait_s: float) -> Task | None: ...

    async def close(self) -> None: ...


class HttpTaskSource:
    """Pull mode: claim through the fetch_task function (the seed's consumer endpoint)."""

    def __init__(self, task_api_url: str, *, api_key: str = "") -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._client = httpx.AsyncClient(base_url=task_api_url.rstrip("/"), headers=headers, timeout=60.0)

    async def next_task(self, *, worker_id: str, environments: list[str], wait_s: float) -> Task | None:
        params = {"worker_id": worker_id, "environments": ",".join(environments), "wait": str(wait_s)}
        try:
            response = await self._client.get("/comm/task/fetch", params=params, timeout=wait_s + 15.0)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"task API not reachable: {exc}", code="task_api_unavailable") from exc
        if response.status_code != 200:
            raise UpstreamUnavailable(
                f"task API answered {response.status_code}: {response.text[:300]}", code="task_api_error"
            )
        data = response.json().get("data")
        return Task.from_document(data) if data else None

    async def close(self) -> None:
        await self._client.aclose()


class StoreTaskSource:
    """Claims straight from the store: a runner on the machine of its store (the embedded
    SQLite one: no hop through the task API), and tests. The same claim as fetch_task's.

    One subscription to the store's work changes serves every fetch (not one per fetch).
    A claim looks, in the same thread hop, whether more work is claimable (after taking a
    task) and when to look again (when there is none): a fetch then claims only when that
    probe said so, a change was published, or the wake time came, so a runner working
    through tasks one at a time makes one claim per task, not a second one that finds
    nothing."""

    def __init__(self, store: TaskStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings
        self._published = Wake()
        self._subscribed: tuple[frozenset[str], asyncio.AbstractEventLoop, Callable[[], None]] | None = None
        # Whether the next fetch claims before it waits; and when to look again although
        # nothing was published (a retry backoff's end, a lease to expire), from the last claim.
        self._claim_first = True
        self._wake_at: dt.datetime | None = None

    async def _subscribe(self, environments: list[str]) -> None:
        wanted = frozenset(environments)
        loop = asyncio.get_running_loop()
        if self._subscribed is not None and self._subscribed[:2] == (wanted, loop):
            return
        await self.close()
        self._published = published = Wake()
        self._claim_first = True  # other environments: what the last claim saw says nothing

        def on_work(change: TaskChange) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed under a late change
                loop.call_soon_threadsafe(published.set)

        unsubscribe = await asyncio.to_thread(self._store.subscribe_work, environments, on_work)
        self._subscribed = (wanted, loop, unsubscribe)

    async def next_task(self, *, worker_id: str, environments: list[str], wait_s: float) -> Task | None:
        deadline = time.monotonic() + wait_s
        # Subscribed before the first claim, so work published in between is not missed.
        await self._subscribe(environments)

        def claim() -> _Claimed:
            task = claim_for_runner(
                self._store, self._settings, worker_id=worker_id, environments=environments
            )
            now = utcnow()
            if task is not None and self._store.may_have_work(environments, now):
                return task, True, None
            return task, False, self._store.next_wake_at(environments, now)

        while True:
            # Cleared before the claim: a change committed after it began sets it again.
            if self._claim_first or self._published.is_set():
                self._published.clear()
                try:
                    task, self._claim_first, self._wake_at = await self._claim_or_give_back(claim, worker_id)
                except BaseException:
                    # A claim that failed (or was cancelled) has not used up the change
                    # that prompted it: the next fetch claims at once.
                    self._claim_first = True
                    raise
                if task is not None:
                    return task
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if self._wake_at is not None:
                remaining = min(remaining, max(0.0, (self._wake_at - utcnow()).total_seconds()) + 0.001)
            if not await self._published.wait(remaining):
                self._claim_first = True  # the wake time, or the fetch's end: look once more

    async def _claim_or_give_back(self, claim: Callable[[], _Claimed], worker_id: str) -> _Claimed:
        """The claim runs on in its thread when the fetch is cancelled (shutdown): what it
        takes then is given back at once, not left leased to a runner that stopped looking."""
        # The executor's future itself (as asyncio.to_thread, without a task around it).
        claiming = asyncio.get_running_loop().run_in_executor(
            None, functools.partial(contextvars.copy_context().run, claim)
        )
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                late = (await claiming)[0]
                if late is not None:
                    release = functools.partial(
                        self._store.release, late.taskId, worker_id=worker_id, reason="shutdown"
                    )
                    await asyncio.to_thread(release)
            raise

    async def close(self) -> None:
        if self._subscribed is not None:
            unsubscribe = self._subscribed[2]
            self._subscribed = None
            unsubscribe()
