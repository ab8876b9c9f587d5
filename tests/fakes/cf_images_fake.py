"""A fake of the Cloudflare Images v1 API, served over real HTTP on 127.0.0.1 (tests only).

No emulator of Cloudflare Images exists, so this follows the documented API:

* ``POST /client/v4/accounts/{account}/images/v1``: multipart ``file`` (or ``url``,
  refused here: the fake never fetches), optional ``id`` (custom id, up to 1,024
  characters, subpaths allowed), ``metadata``, ``requireSignedURLs``;
* ``GET`` / ``DELETE /client/v4/accounts/{account}/images/v1/{id}``;
* ``GET /client/v4/accounts/{account}/images/v1/stats``;
* every answer in the ``{success, errors, messages, result}`` envelope;
* delivery at ``/{account_hash}/{id}/{variant}`` (imagedelivery.net's shape) and at
  ``/cdn-cgi/imagedelivery/{account_hash}/{id}/{variant}`` (custom domains), serving the
  stored bytes with the type sniffed from them (the real service may transcode).

Documented limits: 10 MB per stored image; PNG, GIF, JPEG, WebP, SVG. The error codes
are those the API is commonly seen to return (10000 authentication, 5400 bad request,
5404 not found, 5409 already exists, 5415 unsupported format); the docs stored here do
not list them, so clients should key on the HTTP status as much as on the code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["CloudflareImagesFake", "StoredImage"]

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_ID_CHARS = 1024
VARIANTS = ("public",)


@dataclasses.dataclass
class StoredImage:
    id: str
    filename: str
    data: bytes
    content_type: str
    uploaded: str
    metadata: dict[str, Any]


def sniff_image_type(data: bytes) -> str | None:
    """What Cloudflare would see: the format from the bytes, not from any header."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "image/svg+xml"
    return None


class CloudflareImagesFake:
    """Start with ``with CloudflareImagesFake() as fake:``; ``fake.api_base`` is CF_IMAGES_API_BASE."""

    def __init__(
        self,
        *,
        account_id: str = "test-account",
        api_token: str = "test-token",  # noqa: S107  # a fake's token, checked only by the fake
        account_hash: str = "FakeAccountHash",
        max_bytes: int = MAX_IMAGE_BYTES,
    ) -> None:
        self.account_id = account_id
        self.api_token = api_token
        self.account_hash = account_hash
        self.max_bytes = max_bytes
        self.images: dict[str, StoredImage] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="cf-images-fake", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/client/v4"

    def variant_url(self, image_id: str, variant: str = "public") -> str:
        return f"{self.base_url}/{self.account_hash}/{image_id}/{variant}"

    def start(self) -> CloudflareImagesFake:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> CloudflareImagesFake:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- API behaviour ----------------------------------------------------------------
    def _image_json(self, image: StoredImage) -> dict[str, Any]:
        return {
            "id": image.id,
            "filename": image.filename,
            "uploaded": image.uploaded,
            "requireSignedURLs": False,
            "meta": image.metadata,
            "variants": [self.variant_url(image.id, variant) for variant in VARIANTS],
        }

    def handle_api(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        prefix = f"/client/v4/accounts/{self.account_id}/images/v1"
        if headers.get("Authorization") != f"Bearer {self.api_token}":
            return _failure(403, 10000, "Authentication error")
        if not path.startswith(prefix):
            # Another account's images: Cloudflare answers as for a bad token.
            return _failure(403, 10000, "Authentication error")
        rest = path[len(prefix) :]
        if method == "POST" and rest in ("", "/"):
            return self._upload(headers, body)
        if method == "GET" and rest == "/stats":
            with self._lock:
                return _success({"count": {"current": len(self.images), "allowed": 100000}})
        if rest.startswith("/") and len(rest) > 1:
            image_id = unquote(rest[1:])
            with self._lock:
                if method == "GET":
                    image = self.images.get(image_id)
                    return (
                        _success(self._image_json(image)) if image else _failure(404, 5404, "Image not found")
                    )
                if method == "DELETE":
                    if self.images.pop(image_id, None) is None:
                        return _failure(404, 5404, "Image not found")
                    return _success({})
        return _failure(405, 5400, f"Bad request: {method} not allowed here")

    def _upload(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        content_type = headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            return _failure(400, 5400, "Bad request: the body must be multipart/form-data")
        fields, files = _parse_multipart(content_type, body)
        if "url" in fields:
            return _failure(400, 5400, "Bad request: upload by URL is not supported by this fake")
        if "file" not in files:
            return _failure(400, 5400, "Bad request: a 'file' field is required")
        filename, data = files["file"]
        if len(data) > self.max_bytes:
            return _failure(
                413, 5400, f"Bad request: image exceeds the {self.max_bytes // (1024 * 1024)} MB limit"
            )
        sniffed = sniff_image_type(data)
        if sniffed is None:
            return _failure(415, 5415, "Images must be uploaded as a PNG, GIF, JPEG, WebP or SVG file")
        image_id = fields.get("id") or str(uuid.uuid4())
        if len(image_id) > MAX_ID_CHARS:
            return _failure(400, 5400, f"Bad request: custom id longer than {MAX_ID_CHARS} characters")
        try:
            metadata = json.loads(fields["metadata"]) if "metadata" in fields else {}
        except ValueError:
            return _failure(400, 5400, "Bad request: metadata must be JSON")
        with self._lock:
            if image_id in self.images:
                return _failure(409, 5409, "Resource already exists")
            image = StoredImage(
                id=image_id,
                filename=filename,
                data=data,
                content_type=sniffed,
                uploaded=dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
                metadata=metadata,
            )
            self.images[image_id] = image
            return _success(self._image_json(image))

    def handle_delivery(self, path: str) -> StoredImage | None:
        """``/<hash>/<id>/<variant>`` or ``/cdn-cgi/imagedelivery/<hash>/<id>/<variant>``."""
        path = path.removeprefix("/cdn-cgi/imagedelivery")
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != self.account_hash or parts[-1] not in VARIANTS:
            return None
        image_id = unquote("/".join(parts[1:-1]))
        with self._lock:
            return self.images.get(image_id)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # stdlib signature
                return  # keep test output clean; requests are recorded on the fake instead

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _dispatch(self, method: str) -> None:
                path = urlsplit(self.path).path
                body = self._body()
                with fake._lock:
                    fake.requests.append((method, path))
                if path.startswith("/client/v4/"):
                    status, envelope = fake.handle_api(method, path, self.headers, body)
                    self._send(status, json.dumps(envelope).encode(), "application/json")
                    return
                image = fake.handle_delivery(path) if method == "GET" else None
                if image is None:
                    self._send(404, b"Not Found", "text/plain")
                    return
                self._send(200, image.data, image.content_type)

            def _send(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_POST(self) -> None:
                self._dispatch("POST")

            def do_DELETE(self) -> None:
                self._dispatch("DELETE")

        return Handler


def _success(result: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return 200, {"success": True, "errors": [], "messages": [], "result": result, "result_info": None}


def _failure(status: int, code: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {
        "success": False,
        "errors": [{"code": code, "message": f"ERROR {code}: {message}"}],
        "messages": [],
        "result": None,
    }


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """Form fields and files of a multipart body (the stdlib email parser handles the MIME)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    if not message.is_multipart():
        return fields, files
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            payload = b""
        filename = part.get_filename()
        if filename is not None:
            files[str(name)] = (filename, payload)
        else:
            fields[str(name)] = payload.decode()
    return fields, files
