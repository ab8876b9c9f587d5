"""Session-scoped cloud emulators for tests: the official Firestore emulator.

comfyswap.emulators starts it (a Java program shipped with the Google Cloud CLI, bound to
127.0.0.1, its output in a file) and it is stopped by its PID at the end of the session.
Where the CLI or Java is missing, the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from comfyswap.emulators import (
    EmulatorUnavailable,
    FirestoreEmulator,
    find_firestore_emulator,
    start_firestore_emulator,
)

__all__ = ["FirestoreEmulator", "find_firestore_emulator", "firestore_emulator", "started_or_skip"]

FIRESTORE_EMULATOR_PROJECT = "comfyswap-test"

_EMULATOR_KEY = pytest.StashKey[FirestoreEmulator]()


@pytest.fixture(scope="session")
def firestore_emulator(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> FirestoreEmulator:
    """One emulator per test session, however many test folders import this fixture (each
    import is its own fixture to pytest, so the instance is kept on the config)."""
    running = request.config.stash.get(_EMULATOR_KEY, None)
    if running is not None:
        return running
    try:
        running = start_firestore_emulator(
            tmp_path_factory.mktemp("firestore-emulator"), project=FIRESTORE_EMULATOR_PROJECT
        )
    except EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    request.config.add_cleanup(running.stop)
    request.config.stash[_EMULATOR_KEY] = running
    return running


@contextlib.contextmanager
def started_or_skip(*starters: Callable[[], Any]) -> Iterator[list[Any]]:
    """Start each emulator in turn (each has ``stop()``), stop them all in reverse at the
    end; a missing one stops those already started and skips with the reason."""
    started: list[Any] = []
    try:
        for start in starters:
            started.append(start())
    except EmulatorUnavailable as exc:
        for server in reversed(started):
            server.stop()
        pytest.skip(str(exc))
    try:
        yield started
    finally:
        for server in reversed(started):
            server.stop()
