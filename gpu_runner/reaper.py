"""The runner's upkeep: the reaper (push mode) and the orphan sweep (every mode).

A crashed runner's task runs again within seconds:

Cloud Scheduler calls ``/internal/reap`` once a minute at best, and a killed runner's
Cloud Task is not delivered again (its retry finds the task still leased and stops). So
every push runner also re-queues expired leases every ``REAPER_INTERVAL_S`` and enqueues
each one again at once under its new dispatch generation (a new Cloud Tasks name). Many
runners reaping at once is safe: each re-queue is a compare-and-set, only one wins.

On start it also enqueues again the tasks left PENDING while no runner was up (their
delivery may have run out of retries), under the same name, which Cloud Tasks
de-duplicates when the old delivery is still pending.

Every ``ORPHAN_SWEEP_INTERVAL_S`` it also removes result objects and inputs that no live
task needs, and finished tasks past their ``expire_at`` with their results and inputs
(shared.storage.orphans).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from shared.dispatch import (
    Dispatcher,
    NoopDispatcher,
    OwnPoolsDispatcher,
    make_dispatcher,
)
from shared.logs import get_logger, log_event
from shared.service import TaskService
from shared.settings import Settings
from shared.storage.chain import StorageChain
from shared.storage.orphans import sweep_expired_tasks, sweep_orphans
from shared.store.base import TaskStore
from shared.tasks import Task

__all__ = ["Reaper"]

logger = get_logger(__name__)


class Reaper:
    def __init__(self, settings: Settings, store: TaskStore, storage: StorageChain, *, push: bool) -> None:
        self.settings = settings
        self.storage = storage
        self.push = push
        try:
            dispatcher: Dispatcher = OwnPoolsDispatcher(make_dispatcher(settings))
        except Exception as exc:  # no Cloud Tasks credentials here: reap, the sweep enqueues
            log_event(logger, "reaper_cannot_dispatch", error=repr(exc), level=30)
            dispatcher = NoopDispatcher()
        self.service = TaskService(settings, store, dispatcher)

    def requeued(self, task: Task) -> None:
        """The worker put ``task`` back to PENDING: enqueue it now (failures are logged and
        the periodic sweep enqueues it later)."""
        self.service.dispatch_task(task)

    def sweep_at_start(self) -> None:
        self.service.redispatch_stale_pending(0.0, new_generation=False)

    def sweep_orphans(self) -> None:
        sweep_orphans(self.storage, self.service.store, self.service.input_store)
        # Firestore deletes expired tasks by its TTL policy, and expire_at is exempt from
        # indexes there (a sequential field), so the query is for SQLite only.
        if self.settings.task_store != "firestore":
            sweep_expired_tasks(self.storage, self.service.store, self.service.input_store)

    async def run_forever(self) -> None:
        if self.push:
            await self._guarded(self.sweep_at_start)
        reap_every = self.settings.reaper_interval_s if self.push else 0.0
        sweep_every = self.settings.orphan_sweep_interval_s
        next_reap = next_sweep = time.monotonic()
        next_reap += reap_every
        next_sweep += sweep_every
        while reap_every > 0 or sweep_every > 0:
            due = min(at for at, every in ((next_reap, reap_every), (next_sweep, sweep_every)) if every > 0)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            if reap_every > 0 and now >= next_reap:
                await self._guarded(self.service.reap_expired_leases)
                next_reap = now + reap_every
            if sweep_every > 0 and now >= next_sweep:
                await self._guarded(self.sweep_orphans)
                next_sweep = now + sweep_every

    @staticmethod
    async def _guarded(work: Callable[[], object]) -> None:
        try:
            await asyncio.to_thread(work)
        except Exception as exc:  # the store hiccuped; the next round tries again
            log_event(logger, "upkeep_failed", work=getattr(work, "__name__", "?"), error=repr(exc), level=30)
