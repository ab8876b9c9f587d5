"""``make run-emulated``: the cloud code path on one machine, on emulators.

Starts, on 127.0.0.1, the Firestore emulator (the task store), the Cloud Tasks emulator
(push dispatch to the runner), fake-gcs-server (GCS, the primary result store) and
moto's S3 server (R2, the fallback), then the API (the three functions behind the dev
server) and the runner in push mode, configured exactly as in the cloud except for the
emulator hosts. Prints where everything is and how to try it; Ctrl-C or SIGTERM stops
every process it started, each by its PID, runner first so an in-flight task is drained.

The emulators hold their data in memory, so they stay up for the whole run: when the API
or the runner exits (a crash, a kill -9 to try recovery by hand) it is started again and
the terminal says so; only an emulator that exits ends the run.

A thread POSTs ``/internal/reap`` every minute, as Cloud Scheduler does in the cloud:
it re-queues tasks whose runner died and re-enqueues PENDING tasks whose push was lost.

What the emulators cannot check (OIDC tokens, task-name de-duplication, signatures) is
listed in the banner and in the README ("The cloud path on one machine").
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import httpx

from comfyswap.emulators import (
    DEFAULT_LOCATION,
    DEFAULT_PROJECT,
    LOOPBACK,
    EmulatorProcess,
    EmulatorUnavailable,
    create_gcs_bucket,
    create_s3_bucket,
    gcs_env,
    r2_env,
    start_cloud_tasks_emulator,
    start_fake_gcs_server,
    start_firestore_emulator,
    start_moto_server,
    start_process,
    task_path_env,
)

QUEUE = "comfyswap-runner"
BUCKET = "comfyswap-results"
# moto checks no signatures: any key pair works, and none of these is a real secret.
S3_ACCESS_KEY = "emulated-access-key"
S3_SECRET_KEY = "emulated-secret-key"  # noqa: S105  # moto's stand-in credential, not a secret
REAP_EVERY_S = 60.0
# Settings that would make the pushes fail: the emulator cannot attach an OIDC token or
# an API key to the requests it sends the runner, so this mode runs open, on loopback.
_AUTH_SETTINGS = ("API_KEYS", "API_KEYS_FILE", "CLOUD_TASKS_INVOKER_EMAIL")


class _StopRequested(BaseException):
    """SIGTERM arrived: stop like Ctrl-C (a BaseException, so no `except Exception` swallows it)."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _StopRequested


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_emulated", description=(__doc__ or "").split("\n\n")[0].strip("`: ")
    )
    parser.add_argument("--api-port", type=int, default=int(os.environ.get("API_PORT", "8080")))
    parser.add_argument("--runner-port", type=int, default=int(os.environ.get("RUNNER_PORT", "8090")))
    for name in ("firestore", "cloud-tasks", "gcs", "s3"):
        parser.add_argument(f"--{name}-port", type=int, default=0, help="0 (default) = a free port")
    parser.add_argument(
        "--storage",
        choices=["gcs", "r2"],
        default="gcs",
        help="primary result store (fake-gcs-server or moto as R2); the other one is the fallback",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=5,
        help="Cloud Tasks emulator re-deliveries of a failed push (it retries every 0.1 s, no backoff)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("DATA_DIR", "./.comfyswap")) / "emulated",
        help="runner work files and every process's log (default DATA_DIR/emulated)",
    )
    return parser.parse_args(argv)


def _reap_forever(api_url: str, stop: threading.Event) -> None:
    """Cloud Scheduler's job: POST /internal/reap every minute until ``stop``."""
    with httpx.Client(base_url=api_url, timeout=30.0) as client:
        while not stop.wait(REAP_EVERY_S):
            try:
                client.post("/internal/reap").raise_for_status()
            except httpx.HTTPError as exc:
                sys.stderr.write(f"run-emulated: reap failed: {exc}\n")


def _banner(
    *,
    api_url: str,
    runner_url: str,
    firestore_host: str,
    cloud_tasks_host: str,
    queue_name: str,
    max_retries: int,
    gcs_url: str,
    s3_url: str,
    primary: str,
    log_dir: Path,
) -> str:
    gcs_role, r2_role = ("primary", "fallback") if primary == "gcs" else ("fallback", "primary")
    return f"""
ComfySwap on the emulated cloud (Ctrl-C stops everything)

  API          {api_url}   the three functions (dev server)
  runner       {runner_url}   push endpoint POST /internal/tasks/run
  Firestore    {firestore_host}   task store, project {DEFAULT_PROJECT}
  Cloud Tasks  {cloud_tasks_host}   queue {queue_name}, {max_retries} re-deliveries
  GCS          {gcs_url}   bucket {BUCKET} (fake-gcs-server, {gcs_role})
  R2           {s3_url}   bucket {BUCKET} (moto S3, {r2_role})
  logs         {log_dir}/   (tail -f {log_dir}/runner.log)

Try it:
  .venv/bin/comfyswap --api-url {api_url} demo
  .venv/bin/comfyswap --api-url {api_url} swap --source FACE.jpg --target PHOTO.png --wait
  .venv/bin/comfyswap --api-url {api_url} list

Auth: open local mode, 127.0.0.1 only. The Cloud Tasks emulator cannot send OIDC tokens,
so CLOUD_TASKS_INVOKER_EMAIL is unset and the runner's push endpoint takes an API key with
the runner role instead; no API keys are configured here, so it accepts any caller.
Not checked by the emulators: OIDC, Cloud Tasks name de-duplication and backoff, GCS and
S3 signatures and ACLs (see the README, "The cloud path on one machine").
"""


def run(args: argparse.Namespace) -> int:
    for name in [name for name in _AUTH_SETTINGS if os.environ.get(name)]:
        sys.stderr.write(f"run-emulated: ignoring {name}: this mode runs open (see the banner)\n")
        del os.environ[name]
    for label, port in (("API", args.api_port), ("runner", args.runner_port)):
        if not _port_is_free(port):
            sys.stderr.write(f"run-emulated: the {label} port {port} is in use (--{label.lower()}-port)\n")
            return 2
    data_dir: Path = args.data_dir.resolve()
    log_dir = data_dir / "logs"
    api_url = f"http://{LOOPBACK}:{args.api_port}"
    runner_url = f"http://{LOOPBACK}:{args.runner_port}"
    started: list[tuple[str, Callable[[], None]]] = []
    reaper_stop = threading.Event()
    previous_handler = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        print("starting the Firestore emulator ...", flush=True)
        firestore = start_firestore_emulator(log_dir, port=args.firestore_port)
        started.append(("Firestore emulator", firestore.stop))
        print("starting the Cloud Tasks emulator ...", flush=True)
        cloud_tasks = start_cloud_tasks_emulator(
            log_dir, port=args.cloud_tasks_port, max_retries=args.max_retries
        )
        started.append(("Cloud Tasks emulator", cloud_tasks.stop))
        queue_name = cloud_tasks.create_queue(QUEUE, project=firestore.project, location=DEFAULT_LOCATION)
        print("starting fake-gcs-server and moto ...", flush=True)
        gcs = start_fake_gcs_server(log_dir, port=args.gcs_port)
        started.append(("fake-gcs-server", gcs.stop))
        create_gcs_bucket(gcs.url, BUCKET, project=firestore.project)
        s3 = start_moto_server(log_dir, port=args.s3_port)
        started.append(("moto", s3.stop))
        create_s3_bucket(s3.url, BUCKET, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)
        env = {
            **task_path_env(firestore, cloud_tasks, queue=QUEUE, location=DEFAULT_LOCATION),
            **gcs_env(gcs.url, BUCKET),
            **r2_env(s3.url, BUCKET, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY),
            "STORAGE_PROVIDER": args.storage,
            "STORAGE_FALLBACK": "r2" if args.storage == "gcs" else "gcs",
            "API_HOST": LOOPBACK,
            "API_PORT": str(args.api_port),
            "RUNNER_HOST": LOOPBACK,
            "RUNNER_PORT": str(args.runner_port),
            "RUNNER_URL": runner_url,
            "TASK_API_URL": f"{api_url}/api",
            "DATA_DIR": str(data_dir),
            "APP_ENV": "development",
        }
        print("starting the API and the runner ...", flush=True)
        api = Service("API", [sys.executable, "-m", "comfyswap.cli", "api"], api_url, log_dir, env)
        started.append(("API", api.stop))
        # The runner drains in-flight tasks for SHUTDOWN_GRACE_S before it exits.
        grace_s = float(os.environ.get("SHUTDOWN_GRACE_S", "5")) + 10
        runner = Service("runner", [sys.executable, "-m", "gpu_runner"], runner_url, log_dir, env, grace_s)
        started.append(("runner", runner.stop))
        threading.Thread(
            target=_reap_forever, args=(api_url, reaper_stop), name="reaper", daemon=True
        ).start()
        print(
            _banner(
                api_url=api_url,
                runner_url=runner_url,
                firestore_host=firestore.host,
                cloud_tasks_host=cloud_tasks.host,
                queue_name=queue_name,
                max_retries=args.max_retries,
                gcs_url=gcs.url,
                s3_url=s3.url,
                primary=args.storage,
                log_dir=log_dir,
            ),
            flush=True,
        )
        return _watch([cloud_tasks.server, firestore.server, gcs, s3], [runner, api])
    except EmulatorUnavailable as exc:
        sys.stderr.write(f"run-emulated: {exc}\n")
        return 2
    except (KeyboardInterrupt, _StopRequested):
        return 0
    finally:
        reaper_stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_all(started)
        signal.signal(signal.SIGTERM, previous_handler)


@dataclasses.dataclass
class Service:
    """The API or the runner: started, and started again whenever it exits."""

    name: str
    command: list[str]
    url: str
    log_dir: Path
    env: dict[str, str]
    stop_timeout_s: float = 10.0
    restarts: int = 0
    process: EmulatorProcess = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.process = self._start()

    def _start(self) -> EmulatorProcess:
        return start_process(
            self.name.lower(),
            self.command,
            url=self.url,
            log_dir=self.log_dir,
            env=self.env,
            health_path="/api/health",
            timeout_s=180,
        )

    def restart_if_exited(self) -> None:
        """Start it again if it exited; say so on the terminal (with the end of its log)."""
        if self.process.alive():
            return
        code = self.process.process.returncode
        sys.stderr.write(
            f"run-emulated: the {self.name} exited with {code}; restarting it (the emulators keep "
            f"their data). The end of {self.process.log_path}:\n{self.process.log()[-1500:]}\n"
        )
        self.process = self._start()
        self.restarts += 1
        print(f"run-emulated: the {self.name} is up again (pid {self.process.pid})", flush=True)

    def stop(self) -> None:
        self.process.stop(timeout_s=self.stop_timeout_s)


def _watch(emulators: list[EmulatorProcess], services: list[Service]) -> int:
    """Wait for Ctrl-C / SIGTERM (raised here). A service that exits is started again; an
    emulator that exits ends the run (its data was in memory)."""
    while True:
        for process in emulators:
            if not process.alive():
                sys.stderr.write(
                    f"run-emulated: {process.name} exited with {process.process.returncode}; "
                    f"the end of {process.log_path}:\n{process.log()[-3000:]}\n"
                )
                return 1
        for service in services:
            try:
                service.restart_if_exited()
            except (RuntimeError, TimeoutError) as exc:
                sys.stderr.write(f"run-emulated: could not restart the {service.name}: {exc}; trying again\n")
        time.sleep(0.5)


def _stop_all(started: list[tuple[str, Callable[[], None]]]) -> None:
    """Newest first: the runner drains its task before the store and the queue go away."""
    if started:
        print("\nstopping ...", flush=True)
    for name, stop in reversed(started):
        try:
            stop()
        except Exception as exc:  # keep stopping the others
            sys.stderr.write(f"run-emulated: could not stop the {name}: {exc}\n")


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
