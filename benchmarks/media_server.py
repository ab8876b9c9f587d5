"""``python -m benchmarks.media_server PORT DIR``: the origin the runner downloads inputs from.

The standard library's ``http.server`` leaves Nagle's algorithm on and writes headers and
body separately, so every small response waits ~40 ms for a delayed ACK: a stall no real
origin (nginx, GCS, S3) has, and one that would be charged to the runner. This server is
the same threaded file server with TCP_NODELAY, speaking HTTP/1.1 with keep-alive.
"""

from __future__ import annotations

import functools
import http.server
import sys


class _Handler(http.server.SimpleHTTPRequestHandler):
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # stdlib signature
        return


def main() -> None:
    port, directory = int(sys.argv[1]), sys.argv[2]
    handler = functools.partial(_Handler, directory=directory)
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        server.daemon_threads = True
        server.serve_forever()


if __name__ == "__main__":
    main()
