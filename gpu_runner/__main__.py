"""``python -m gpu_runner``: serve the runner (push endpoint, ops routes, pull loop)."""

from __future__ import annotations

from gpu_runner.app import create_app
from gpu_runner.serving import serve
from shared.settings import get_settings


def main() -> None:
    settings = get_settings()
    app = create_app(settings)
    serve(
        app,
        host=settings.runner_host,
        port=settings.runner_port,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )


if __name__ == "__main__":
    main()
