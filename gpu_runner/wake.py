"""Wake-ups on the runner's event loop that cost no task of their own.

Every ComfyUI job waits a few times with a deadline (the lease keeper until its next
renewal, the pull loop for new work, the prompt's watch for its end). Python 3.11's
``asyncio.wait_for(event.wait(), timeout)`` wraps each such wait in a task of its own:
two task steps and a callback more per wait, about a fifth of the event loop's callbacks
on a 64x64 job (figure 8). :class:`Wake` waits on one future and one timer instead.
:class:`CancelSignal` is the worker's cancel event: an ``asyncio.Event`` that also calls
back, so a job's phases stop at once without a task parked on ``cancel.wait()`` each.
Both belong to one event loop; threads reach them with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

__all__ = ["CancelSignal", "Wake", "nothing"]


class Wake:
    """``asyncio.Event``'s ``set``/``clear``/``is_set``, and ``wait(timeout)``: True when
    set (now or while waiting), False when ``timeout`` seconds passed first."""

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[bool]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    async def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(timeout, _expire, waiter) if timeout is not None else None
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiters.remove(waiter)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class CancelSignal(asyncio.Event):
    """An ``asyncio.Event`` (engines wait on it, test it, as before) that also calls the
    callbacks given to :meth:`on_set` when it is set."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], object]] = []

    def set(self) -> None:
        if self.is_set():
            return
        super().set()
        for callback in list(self._callbacks):
            callback()

    def on_set(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback`` when set (at once if it is set already); returns the function
        that takes it back."""
        if self.is_set():
            callback()
            return nothing
        self._callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return remove


def nothing() -> None:
    """A callback that does nothing (a removal with nothing to remove, a stop with nothing to stop)."""
