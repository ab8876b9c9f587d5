"""Dispatchers: the interface and a factory choosing one from settings."""

from __future__ import annotations

from shared.dispatch.base import Dispatcher, NoopDispatcher
from shared.settings import Settings

__all__ = ["Dispatcher", "NoopDispatcher", "make_dispatcher"]


def make_dispatcher(settings: Settings) -> Dispatcher:
    if settings.dispatch_mode == "push":
        from shared.dispatch.cloud_tasks import CloudTasksDispatcher

        return CloudTasksDispatcher.from_settings(settings)
    return NoopDispatcher()
