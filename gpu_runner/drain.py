"""Shutdown: stop claiming, give in-flight tasks a grace period, release the rest."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from shared.logs import get_logger, log_event

if TYPE_CHECKING:
    from gpu_runner.worker import Worker

__all__ = ["STOP_WAIT_S", "drain"]

logger = get_logger(__name__)

# At shutdown, how long a stopped engine may take to return before its task is cancelled.
STOP_WAIT_S = 2.0


async def drain(worker: Worker, grace_s: float) -> None:
    """Stop claiming; give in-flight tasks ``grace_s``; release the rest.

    A task still running after the grace is stopped by cancelling its asyncio task:
    its CancelledError path releases it and enqueues it again, the one release path
    (a push request uvicorn cancelled is already on it and is not cancelled twice)."""
    worker.draining = True
    log_event(logger, "draining", in_flight=len(worker.in_flight), grace_s=grace_s)
    pending = {task for task in worker.spawned if not task.done()}
    pending |= {
        held.job for held in worker.in_flight.values() if held.job is not None and not held.job.done()
    }
    if pending:
        _, still_running = await asyncio.wait(pending, timeout=grace_s)
    else:
        still_running = set()
    # Stop what is left: the engines first (ComfyUI interrupt, FaceFusion killed, the CPU
    # swap between frames), whose JobCancelled path releases; an engine that does not
    # stop in time has its asyncio task cancelled, whose path releases instead.
    stopping = [held for held in worker.in_flight.values() if held.job is not None and not held.job.done()]
    for held in stopping:
        held.shutting_down = True
        held.cancel.set()
    jobs = {held.job for held in stopping if held.job is not None}
    if jobs:
        _, stuck = await asyncio.wait(jobs, timeout=STOP_WAIT_S)
        for job in stuck:
            job.cancel()
        if stuck:
            await asyncio.wait(stuck, timeout=STOP_WAIT_S)
    if worker.fetch is not None:
        # A long poll in flight is stopped, not waited for (it could hold shutdown for its
        # whole wait): its source gives back or never makes a claim landing meanwhile, and
        # the pull loop gives back one it already got.
        worker.fetch.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.pull_stopped.wait(), timeout=STOP_WAIT_S)
    if still_running:
        # Background work (webhooks) gets a moment, not the platform's whole kill window.
        await asyncio.wait(still_running, timeout=1.0)
    for engine in worker.engines.values():
        await engine.close()
    if worker.source is not None:
        await worker.source.close()
