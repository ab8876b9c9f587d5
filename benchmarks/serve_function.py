"""``python -m benchmarks.serve_function TARGET SOURCE PORT``: one function, served exactly as
the dev server serves the three (functions-framework's gunicorn app, one worker, threads)."""

from __future__ import annotations

import sys

from functions_framework import create_app
from functions_framework._http.gunicorn import GunicornApplication


def main() -> None:
    target, source, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    app = create_app(target=target, source=source)  # type: ignore[no-untyped-call]  # functions-framework is untyped
    # The same options as comfyswap.devserver.serve, so the comparison is like for like.
    GunicornApplication(  # type: ignore[no-untyped-call]  # functions-framework is untyped
        app, "127.0.0.1", port, False, threads=64, workers=1, timeout=0, accesslog=None
    ).run()


if __name__ == "__main__":
    main()
