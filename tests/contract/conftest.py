"""One TaskStore contract, every backend: SQLite on a temporary file, Firestore on its emulator.

``store_factory`` makes independent store instances over the same data (separate
SQLite connections, separate Firestore clients), as separate runners would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.store.base import TaskStore
from tests.cloud_fixtures import FirestoreEmulator, firestore_emulator

__all__ = ["firestore_emulator"]

StoreFactory = Callable[[], TaskStore]


@pytest.fixture(params=["sqlite", pytest.param("firestore", marks=pytest.mark.emulator)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_factory(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StoreFactory]:
    stores: list[TaskStore] = []
    if backend == "sqlite":
        from shared.store.sqlite import SQLiteTaskStore

        path = tmp_path / "tasks.sqlite3"

        def make() -> TaskStore:
            stores.append(SQLiteTaskStore(path))
            return stores[-1]

    else:
        from google.cloud import firestore

        from shared.store.firestore import FirestoreTaskStore

        emulator: FirestoreEmulator = request.getfixturevalue("firestore_emulator")
        emulator.reset()
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", emulator.host)

        def make() -> TaskStore:
            client = firestore.Client(project=emulator.project)
            stores.append(FirestoreTaskStore(client))
            return stores[-1]

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> TaskStore:
    return store_factory()
