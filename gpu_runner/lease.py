"""Keeping a held task's lease: heartbeat, throttled progress, and noticing the loss.

One keeper runs beside each task a runner holds. It sleeps until the next renewal is due,
new progress is worth writing, or the store publishes a change that took the task away (a
client's cancel, the reaper's takeover); a lost lease sets the task's cancel event, which
stops the engine, and the worker then writes nothing, so a task never ends with two results.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from logging import WARNING
from typing import Any

from gpu_runner.engines.base import ProgressCallback
from gpu_runner.wake import CancelSignal, Wake
from shared.errors import ComfySwapError, Conflict, NotFound
from shared.logs import get_logger, log_event
from shared.store.base import TaskStore
from shared.store.notify import TaskChange
from shared.tasks import LEASED_STATUSES, Progress

__all__ = ["HeldTask", "keep_lease", "progress_reporter"]

logger = get_logger(__name__)

_LEASED_VALUES = frozenset(status.value for status in LEASED_STATUSES)


@dataclasses.dataclass
class HeldTask:
    """What a runner knows of one task it holds, shared by its pipeline, its lease keeper
    and drain."""

    task_id: str
    cancel: CancelSignal
    owner: str = ""
    lease_lost: bool = False
    progress: Progress | None = None
    progress_written: Progress | None = None
    in_engine: bool = False
    # Wakes the lease keeper: a change published by someone else, or progress it waits for.
    wake: Wake = dataclasses.field(default_factory=Wake)
    taken: bool = False  # a published change says the task left this runner
    wants_progress: bool = False
    finishing: bool = False  # our own final write is under way: its change is not a loss
    marking_processing: bool = False  # the PROCESSING write has left
    # The asyncio task running process() (a pull-loop task or a push request): shutdown
    # cancels it, and its CancelledError path is the one place a task is released.
    job: asyncio.Task[Any] | None = None
    releasing: bool = False
    shutting_down: bool = False  # drain stopped it: give it back rather than record a cancel


def progress_reporter(held: HeldTask) -> ProgressCallback:
    """The engine's progress callback: keeps the latest progress and wakes the keeper when
    it waits for some. Engines call it from their own threads too."""
    loop = asyncio.get_running_loop()

    def on_progress(progress: Progress) -> None:
        held.progress = progress
        if held.wants_progress:
            held.wants_progress = False
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(held.wake.set)

    return on_progress


async def keep_lease(
    held: HeldTask, store: TaskStore, *, worker_id: str, lease_seconds: float, progress_interval_s: float
) -> None:
    """Renew the lease, write progress (throttled), and stop the engine the moment the
    store publishes a change that took the task away (a cancel, the reaper): the
    keeper sleeps until such a change, new progress, or the next renewal is due."""
    loop = asyncio.get_running_loop()
    lease = lease_seconds
    heartbeat_every = max(1.0, lease / 3)
    # Progress reaches the task at most every PROGRESS_INTERVAL_S (and not before that
    # long after the claim): a short image task writes none, a long one a few per
    # minute; each write also renews the lease, so progress and heartbeat never cost two.
    progress_every = progress_interval_s

    def on_change(change: TaskChange) -> None:
        if held.finishing:
            return  # our own final write (or a change racing it, which that write's fence settles)
        if change.status in _LEASED_VALUES and change.lease_owner == worker_id:
            return  # our own FETCHED -> PROCESSING, progress or renewal
        held.taken = True
        with contextlib.suppress(RuntimeError):  # the loop closed under a late change
            loop.call_soon_threadsafe(held.wake.set)

    if store.subscribes_in_process:
        # Registering a callback in this process (the embedded store): no I/O, no thread hop.
        unsubscribe = store.subscribe_task(held.task_id, on_change)
    else:
        unsubscribe = await asyncio.to_thread(store.subscribe_task, held.task_id, on_change)
    next_heartbeat = loop.time() + heartbeat_every
    next_progress = loop.time() + progress_every
    try:
        while True:
            progress_due = held.progress is not None and held.progress != held.progress_written
            due = min(next_heartbeat, next_progress) if progress_due else next_heartbeat
            held.wants_progress = not progress_due
            held.wake.clear()
            if not held.taken:
                await held.wake.wait(max(0.0, due - loop.time()))
            now = loop.time()
            if held.finishing:
                return  # the final write is under way; it needs no renewal
            try:
                if held.taken:
                    current = await asyncio.to_thread(store.get_or_raise, held.task_id)
                    holder = current.lease.owner if current.lease else None
                    if current.status not in LEASED_STATUSES or holder != worker_id:
                        raise Conflict("lease lost", code="lease_lost")
                    held.taken = False  # an older change, delivered late
                progress = held.progress
                if progress is not None and progress != held.progress_written and now >= next_progress:
                    await asyncio.to_thread(
                        store.set_progress,
                        held.task_id,
                        worker_id=worker_id,
                        progress=progress,
                        lease_seconds=lease,
                    )
                    held.progress_written = progress
                    next_progress = now + progress_every
                    next_heartbeat = now + heartbeat_every
                elif now >= next_heartbeat:
                    await asyncio.to_thread(
                        store.heartbeat, held.task_id, worker_id=worker_id, lease_seconds=lease
                    )
                    next_heartbeat = now + heartbeat_every
            except (Conflict, NotFound):
                held.lease_lost = True
                held.cancel.set()
                log_event(logger, "lease_lost", task_id=held.task_id, level=WARNING)
                return
            except Exception as exc:  # the store hiccuped; the next beat retries before the lease ends
                error = exc.message if isinstance(exc, ComfySwapError) else repr(exc)
                log_event(logger, "heartbeat_failed", task_id=held.task_id, error=error, level=WARNING)
                next_heartbeat = now + min(5.0, heartbeat_every)
    except asyncio.CancelledError:
        return
    finally:
        unsubscribe()
