"""One deadline per storage operation (issue 19 #5): a store that accepts the connection
and never answers must not hold an upload for the client library's own timeout (120 s
for GCS, 60 s x 3 attempts for boto3); STORAGE_RETRY_DEADLINE_S bounds every call.

The hung store is a real TCP server on 127.0.0.1 that reads and never replies. The bound
checked is generous (three deadlines plus start-up), far below the libraries' defaults.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import ComfySwapError
from shared.settings import Settings
from shared.storage import make_provider

DEADLINE_S = 2.0


@contextlib.contextmanager
def hung_server() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a server that accepts, reads, and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept_forever() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            connection.settimeout(0.2)
            held.append(connection)

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in held:
            connection.close()
        listener.close()


def settings_for(provider: str, url: str, tmp_path: Path) -> Settings:
    common = {"data_dir": tmp_path, "storage_retry_deadline_s": DEADLINE_S}
    if provider == "gcs":
        return Settings(gcs_bucket_name="results", storage_emulator_host=url, **common)
    return Settings(
        r2_bucket_name="results",
        r2_endpoint_url=url,
        r2_access_key="test-access-key",
        r2_secret_key="test-secret-key",  # a stand-in for a server that never answers
        **common,
    )


@pytest.mark.parametrize("provider", ["gcs", "r2"])
def test_an_upload_to_a_hung_store_gives_up_within_the_deadline(provider: str, tmp_path: Path) -> None:
    result = tmp_path / "000.png"
    result.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 2048)
    with hung_server() as url:
        store = make_provider(provider, settings_for(provider, url, tmp_path))
        started = time.monotonic()
        with pytest.raises(ComfySwapError) as raised:
            store.upload_file(result, "results/task_x/000.png", "image/png")
        elapsed = time.monotonic() - started

    assert raised.value.retryable
    assert elapsed < 3 * DEADLINE_S + 3, (
        f"{provider} held a hung upload {elapsed:.1f}s (deadline {DEADLINE_S}s)"
    )
