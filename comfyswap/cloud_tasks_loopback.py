"""Run gcloud-tasks-emulator bound to 127.0.0.1 (run with the emulator's own venv python).

gcloud-tasks-emulator 0.6.2 always listens on ``[::]:PORT`` (every interface) and has no
flag to change it; ``make run-emulated`` and the tests listen on loopback only. This
launcher narrows the gRPC server's listening address before handing over to the
emulator's own command line, so every flag (``start -p PORT -r 3 ...``) works unchanged.

comfyswap.emulators runs this file by its path with the emulator's interpreter, whose
venv has no comfyswap: it must import nothing but grpc and the emulator.
"""

from __future__ import annotations

from typing import Any

import grpc  # type: ignore[import-untyped]  # runs in the emulator's venv, grpcio has no hints

_real_server = grpc.server


def _loopback_server(*args: Any, **kwargs: Any) -> Any:
    server = _real_server(*args, **kwargs)
    add_insecure_port = server.add_insecure_port

    def add_loopback_port(address: str) -> int:
        port = address.rsplit(":", 1)[1]
        return int(add_insecure_port(f"127.0.0.1:{port}"))

    server.add_insecure_port = add_loopback_port
    return server


grpc.server = _loopback_server

if __name__ == "__main__":
    from gcloud_tasks_emulator.__main__ import main  # type: ignore[import-not-found]  # emulator venv only

    main()
