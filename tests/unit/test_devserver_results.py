"""The local API sends a signed `local` result from its own disk (one machine, one DATA_DIR):
no hop through the runner; anything it cannot vouch for is still the runner's to answer."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

import flask
import pytest

from comfyswap.devserver import build_app
from shared.settings import Settings
from shared.storage.local import LocalStorage
from tests.servers import free_port


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # No runner listens at runner_url: whatever is forwarded answers 503 runner_unavailable.
    return Settings(data_dir=tmp_path / "data", runner_url=f"http://127.0.0.1:{free_port()}")


@pytest.fixture
def app(settings: Settings) -> flask.Flask:
    return build_app(settings)


def _stored_result(settings: Settings, tmp_path: Path, payload: bytes) -> str:
    """A result as the runner stores it; its signed URL as path and query."""
    source = tmp_path / "out.png"
    source.write_bytes(payload)
    stored = LocalStorage.from_settings(settings).upload_file(source, "results/task_abc/000.png", "image/png")
    parts = urlsplit(stored.url)
    return f"{parts.path}?{parts.query}"


def test_a_signed_result_on_this_disk_is_sent_by_the_api_itself(app, settings, tmp_path):
    payload = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
    url = _stored_result(settings, tmp_path, payload)

    answer = app.test_client().get(url)

    assert answer.status_code == 200
    assert answer.data == payload
    assert answer.headers["Content-Type"] == "image/png"
    assert answer.headers["Cache-Control"] == "private, no-store"


def test_a_result_url_without_a_valid_signature_is_left_to_the_runner(app, settings, tmp_path):
    url = _stored_result(settings, tmp_path, b"secret pixels")
    path, _, _ = url.partition("?")
    expired = f"{path}?expires={int(time.time()) - 10}&signature={'0' * 64}"
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    client = app.test_client()

    answers = [client.get(candidate) for candidate in (path, expired, tampered)]

    # The runner (absent here) answers these, by the owner's API key or not at all.
    assert [answer.status_code for answer in answers] == [503, 503, 503]
    assert all(b"secret pixels" not in answer.data for answer in answers)


def test_a_signed_url_for_a_file_not_on_this_disk_is_left_to_the_runner(app, settings, tmp_path):
    url = _stored_result(settings, tmp_path, b"pixels")
    (settings.data_dir / "results" / "task_abc" / "000.png").unlink()

    answer = app.test_client().get(url)

    assert answer.status_code == 503
    assert answer.get_json()["error"]["code"] == "runner_unavailable"
