"""How a stored task reaches a runner: pushed (Cloud Tasks) or pulled (fetch_task)."""

from __future__ import annotations

import abc

from shared.tasks import Task

__all__ = ["Dispatcher", "NoopDispatcher"]


class Dispatcher(abc.ABC):
    @abc.abstractmethod
    def dispatch(self, task: Task) -> None:
        """Make sure a runner will get ``task``; raise shared.errors.TransientError if not now."""


class NoopDispatcher(Dispatcher):
    """Pull mode: runners claim through fetch_task; the store's notification wakes them."""

    def dispatch(self, task: Task) -> None:
        return None
