"""The three functions served in-process by functions-framework, on a fresh SQLite store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

REPO_ROOT = Path(__file__).resolve().parents[2]


class Api:
    """Each function loaded by functions-framework from its own folder, as in the cloud."""

    def __init__(self) -> None:
        self.clients: dict[str, FlaskClient] = {
            name: create_app(
                target=name, source=str(REPO_ROOT / "functions" / name / "main.py")
            ).test_client()
            for name in ("create_task", "get_task", "fetch_task")
        }

    def create(self, body: Any, **kwargs: Any) -> Any:
        return self.clients["create_task"].post("/api/tasks/create", json=body, **kwargs)

    def get(self, task_id: str, **kwargs: Any) -> Any:
        return self.clients["get_task"].get(f"/api/tasks/{task_id}", **kwargs)

    def list(self, **kwargs: Any) -> Any:
        return self.clients["get_task"].get("/api/tasks/", **kwargs)

    def fetch(self, **kwargs: Any) -> Any:
        return self.clients["fetch_task"].get("/api/comm/task/fetch", **kwargs)


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TASK_STORE", "sqlite")
    monkeypatch.setenv("DISPATCH_MODE", "pull")
    monkeypatch.delenv("API_KEYS", raising=False)
    from shared.http import service

    service.cache_clear()
    yield Api()
    service.cache_clear()
