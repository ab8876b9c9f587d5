"""Dispatchers: the interface, the re-dispatch sweep and a factory choosing one from settings."""

from __future__ import annotations

from shared.dispatch.base import (
    Dispatcher,
    NoopDispatcher,
    OwnPoolsDispatcher,
    RedispatchReport,
    redispatch_stale_pending,
)
from shared.settings import Settings

__all__ = [
    "Dispatcher",
    "NoopDispatcher",
    "OwnPoolsDispatcher",
    "RedispatchReport",
    "make_dispatcher",
    "redispatch_stale_pending",
]


def make_dispatcher(settings: Settings) -> Dispatcher:
    """Pull mode needs no dispatch; push mode imports the Cloud Tasks client only when chosen."""
    if settings.dispatch_mode == "push":
        from shared.dispatch.cloud_tasks import CloudTasksDispatcher

        dispatcher: Dispatcher = CloudTasksDispatcher.from_settings(settings)
        return dispatcher
    return NoopDispatcher()
