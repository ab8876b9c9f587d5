"""gpu_runner.wake: the runner's timed wake-ups without a task per wait, and the cancel
event that calls back."""

from __future__ import annotations

import asyncio

from gpu_runner.wake import CancelSignal, Wake

# Far longer than a set() takes to arrive on a busy machine: a wait this long missed it.
LONG_S = 30.0


def test_a_wait_ends_true_when_set_meanwhile_and_false_at_its_timeout() -> None:
    async def scenario() -> tuple[bool, bool, bool, float]:
        loop = asyncio.get_running_loop()
        wake = Wake()
        loop.call_later(0.05, wake.set)
        started = loop.time()
        woken = await wake.wait(LONG_S)
        woken_after = loop.time() - started
        already = await wake.wait(0)  # still set: at once
        wake.clear()
        timed_out = await wake.wait(0.05)
        return woken, already, timed_out, woken_after

    woken, already, timed_out, woken_after = asyncio.run(scenario())

    assert (woken, already, timed_out) == (True, True, False)
    assert woken_after < LONG_S / 2


def test_every_waiter_wakes_and_a_cancelled_wait_leaves_nothing_behind() -> None:
    async def scenario() -> tuple[list[bool], int]:
        wake = Wake()
        waits = [asyncio.ensure_future(wake.wait(LONG_S)) for _ in range(3)]
        stopped = asyncio.ensure_future(wake.wait(LONG_S))
        await asyncio.sleep(0)
        stopped.cancel()
        await asyncio.gather(stopped, return_exceptions=True)
        wake.set()
        results = await asyncio.wait_for(asyncio.gather(*waits), timeout=LONG_S)
        return list(results), len(wake._waiters)

    results, left = asyncio.run(scenario())

    assert results == [True, True, True]
    assert left == 0


def test_a_cancel_signal_calls_back_once_and_at_once_when_already_set() -> None:
    async def scenario() -> tuple[list[str], bool]:
        calls: list[str] = []
        signal = CancelSignal()
        signal.on_set(lambda: calls.append("first"))
        taken_back = signal.on_set(lambda: calls.append("taken back"))
        taken_back()
        signal.set()
        signal.set()  # a second set calls nothing again
        signal.on_set(lambda: calls.append("late"))
        waited = await asyncio.wait_for(signal.wait(), timeout=LONG_S)  # still an asyncio.Event
        return calls, waited

    calls, waited = asyncio.run(scenario())

    assert calls == ["first", "late"]
    assert waited is True
