"""Task stores: the interface and a factory choosing the backend from settings."""

from __future__ import annotations

from shared.settings import Settings
from shared.store.base import TaskStore

__all__ = ["TaskStore", "make_task_store"]


def make_task_store(settings: Settings) -> TaskStore:
    """The configured store; the Firestore client is imported only when chosen."""
    if settings.task_store == "firestore":
        from shared.store.firestore import FirestoreTaskStore

        return FirestoreTaskStore.from_settings(settings)
    import datetime as dt

    from shared.store.sqlite import SQLiteTaskStore

    return SQLiteTaskStore(settings.sqlite_path, retention=dt.timedelta(days=settings.task_retention_days))
