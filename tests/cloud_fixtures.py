"""Session-scoped cloud emulators for tests: the official Firestore emulator.

The emulator is a Java program shipped with the Google Cloud CLI. It is started
directly (faster than ``gcloud emulators firestore start``), bound to 127.0.0.1, with
its output in a file (it logs a stack trace per failed request and stalls on a full
pipe), and stopped by its PID at the end of the session. Where the CLI or Java is
missing, the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.servers import ServerProcess, free_port, start_server

__all__ = ["FirestoreEmulator", "find_firestore_emulator", "firestore_emulator"]

FIRESTORE_EMULATOR_PROJECT = "comfyswap-test"
_EMULATOR_RELATIVE_PATH = Path("platform/cloud-firestore-emulator/cloud_firestore_emulator")


def find_firestore_emulator() -> tuple[Path | None, str]:
    """The emulator binary, or None and why it cannot be used here."""
    if shutil.which("java") is None:
        return None, "java is not installed (the Firestore emulator is a Java program)"
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None, "the Google Cloud CLI (gcloud) is not installed"
    try:
        sdk_root = subprocess.run(
            [gcloud, "info", "--format=value(installation.sdk_root)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"`gcloud info` failed: {exc}"
    binary = Path(sdk_root) / _EMULATOR_RELATIVE_PATH
    if not binary.exists():
        return None, (
            f"the Firestore emulator is not installed at {binary} "
            "(Debian package google-cloud-cli-firestore-emulator)"
        )
    return binary, ""


class FirestoreEmulator:
    """A running emulator: its host:port for FIRESTORE_EMULATOR_HOST, and a reset."""

    def __init__(self, server: ServerProcess, host: str, project: str) -> None:
        self.server = server
        self.host = host
        self.project = project

    def reset(self) -> None:
        """Delete every document of the project (the emulator's own endpoint)."""
        response = httpx.delete(
            f"http://{self.host}/emulator/v1/projects/{self.project}/databases/(default)/documents",
            timeout=30,
        )
        response.raise_for_status()


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
    binary, reason = find_firestore_emulator()
    if binary is None:
        pytest.skip(f"Firestore emulator unavailable: {reason}")
    port = free_port()
    host = f"127.0.0.1:{port}"
    server = start_server(
        "firestore-emulator",
        [str(binary), "start", "--host=127.0.0.1", f"--port={port}"],
        url=f"http://{host}",
        log_dir=tmp_path_factory.mktemp("firestore-emulator"),
        timeout_s=120,
    )
    request.config.add_cleanup(server.stop)
    running = FirestoreEmulator(server, host, FIRESTORE_EMULATOR_PROJECT)
    request.config.stash[_EMULATOR_KEY] = running
    return running
