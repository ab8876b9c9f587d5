"""SafeFetcher downloads from a real HTTP server on 127.0.0.1: content, caps, redirects, errors."""

from __future__ import annotations

import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from shared.errors import JobFailed, UnsafeInput, UpstreamUnavailable
from shared.safe_fetch import SafeFetcher
from tests.security.support import LocalHttpServer, data_url, png_declaring, run

FIELD = "task_data.source_url"


@pytest.fixture
def fetcher(make_fetcher: Callable[..., SafeFetcher]) -> SafeFetcher:
    return make_fetcher(allow_loopback=True)


def test_downloads_a_real_jpeg_judged_by_its_bytes(
    fetcher: SafeFetcher, http_server: LocalHttpServer, dest_dir: Path, jpeg_bytes: bytes
) -> None:
    url = http_server.serve("/uploads/face.png", jpeg_bytes, content_type="text/plain")

    fetched = run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert (fetched.kind, fetched.content_type) == ("image", "image/jpeg")
    assert (fetched.width, fetched.height) == (512, 600)
    assert fetched.size == len(jpeg_bytes)
    assert fetched.path.read_bytes() == jpeg_bytes
    assert fetched.path.parent == dest_dir
    assert fetched.path.suffix == ".jpg"
    assert fetched.source_url == fetched.final_url == url


# Media judged by its bytes, whatever the server calls it: fixture, served type, and what
# the fetch finds (kind, content type, width, height, file suffix).
DOWNLOADS = {
    "a png": ("png_bytes", "image/png", ("image", "image/png", 512, 512, ".png")),
    # This fetcher has no check_video: a video is typed by its bytes, not decoded.
    "a video, without decoding it": (
        "mp4_bytes",
        "application/octet-stream",
        ("video", "video/mp4", None, None, ".mp4"),
    ),
}


@pytest.mark.parametrize(("media", "served_as", "expected"), DOWNLOADS.values(), ids=DOWNLOADS.keys())
def test_downloads_media_of_each_kind(
    fetcher: SafeFetcher,
    http_server: LocalHttpServer,
    dest_dir: Path,
    request: pytest.FixtureRequest,
    media: str,
    served_as: str,
    expected: tuple[str, str, int | None, int | None, str],
) -> None:
    url = http_server.serve("/media", request.getfixturevalue(media), content_type=served_as)

    fetched = run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert (
        fetched.kind,
        fetched.content_type,
        fetched.width,
        fetched.height,
        fetched.path.suffix,
    ) == expected


def test_file_names_are_generated_never_taken_from_the_url(
    fetcher: SafeFetcher, http_server: LocalHttpServer, dest_dir: Path, png_bytes: bytes
) -> None:
    url = http_server.serve("/..%2F..%2Fetc%2Fcron.d%2Fevil.sh", png_bytes)

    fetched = run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert list(dest_dir.iterdir()) == [fetched.path]
    assert fetched.path.name.startswith("input-")
    assert "evil" not in fetched.path.name


def test_follows_a_redirect_chain_within_loopback(
    fetcher: SafeFetcher, http_server: LocalHttpServer, dest_dir: Path, png_bytes: bytes
) -> None:
    final_url = http_server.serve("/final.png", png_bytes)
    http_server.redirect("/step2", "/final.png", status=307)  # relative Location
    http_server.redirect("/step1", http_server.url("/step2"), status=301)
    start_url = http_server.redirect("/start", "step1", status=303)

    fetched = run(fetcher.fetch_to_file(start_url, dest_dir, field=FIELD))

    assert fetched.final_url == final_url
    assert fetched.source_url == start_url
    assert [path for path, _ in http_server.requests] == ["/start", "/step1", "/step2", "/final.png"]


def test_refuses_more_redirects_than_allowed(
    make_fetcher: Callable[..., SafeFetcher], http_server: LocalHttpServer, dest_dir: Path
) -> None:
    url = http_server.redirect("/loop", "/loop")
    fetcher = make_fetcher(allow_loopback=True, max_redirects=2)

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert caught.value.code == "too_many_redirects"
    assert http_server.hits("/loop") == 3


def test_refuses_html_named_like_a_jpeg(
    fetcher: SafeFetcher, http_server: LocalHttpServer, dest_dir: Path
) -> None:
    url = http_server.serve("/photo.jpg", b"<html><body>not a photo</body></html>", content_type="image/jpeg")

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert caught.value.code == "unsupported_media"
    assert caught.value.details["field"] == FIELD
    assert list(dest_dir.iterdir()) == []


def test_refuses_an_svg(fetcher: SafeFetcher, http_server: LocalHttpServer, dest_dir: Path) -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><image href="http://169.254.169.254/"/></svg>'
    url = http_server.serve("/logo.svg", svg, content_type="image/svg+xml")

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))
    assert caught.value.code == "unsupported_media"


def test_refuses_a_video_where_only_images_are_allowed(
    fetcher: SafeFetcher, http_server: LocalHttpServer, dest_dir: Path, mp4_bytes: bytes
) -> None:
    url = http_server.serve("/clip.jpg", mp4_bytes)

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD, allowed_kinds=frozenset({"image"})))
    assert caught.value.code == "unsupported_media"


def test_refuses_a_truncated_jpeg(
    fetcher: SafeFetcher, http_server: LocalHttpServer, dest_dir: Path, jpeg_bytes: bytes
) -> None:
    url = http_server.serve("/cut.jpg", jpeg_bytes[: len(jpeg_bytes) // 2])

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert caught.value.code == "corrupt_media"
    assert list(dest_dir.iterdir()) == []


def test_refuses_a_decompression_bomb_from_its_header(
    fetcher: SafeFetcher, http_server: LocalHttpServer, dest_dir: Path
) -> None:
    bomb = png_declaring(30_000, 30_000)
    assert len(bomb) < 1024
    url = http_server.serve("/bomb.png", bomb)

    started = time.monotonic()
    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert caught.value.code == "image_too_large"
    assert time.monotonic() - started < 2.0  # refused from the header, nothing decoded


def test_refuses_an_image_over_the_pixel_cap(
    make_fetcher: Callable[..., SafeFetcher], http_server: LocalHttpServer, dest_dir: Path, jpeg_bytes: bytes
) -> None:
    url = http_server.serve("/face.jpg", jpeg_bytes)
    fetcher = make_fetcher(allow_loopback=True, max_image_pixels=512 * 600 - 1)

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert caught.value.code == "image_too_large"
    assert caught.value.details["width"] == 512


def _declares_a_gigabyte(handler: BaseHTTPRequestHandler, server: LocalHttpServer, png: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(10**9))
    handler.end_headers()
    handler.wfile.write(b"\xff\xd8\xff" + b"\0" * 1000)


def _chunked_forever(handler: BaseHTTPRequestHandler, server: LocalHttpServer, png: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    chunk = png[:16_384]
    for _ in range(200):  # 3 MB in all, far past the cap
        if server.stopping.is_set():
            return
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    handler.wfile.write(b"0\r\n\r\n")


def _until_close(handler: BaseHTTPRequestHandler, server: LocalHttpServer, png: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.close_connection = True
    for _ in range(50):
        if server.stopping.is_set():
            return
        handler.wfile.write(png[:16_384])


# How a body gets past MAX_INPUT_BYTES: declared up front (refused without reading), or
# only found out while reading (chunked, or no length until the connection closes).
OVER_THE_CAP = {
    "declared content-length, refused without reading": ("/huge.jpg", _declares_a_gigabyte),
    "chunked body running past the cap": ("/stream.png", _chunked_forever),
    "body without length running past the cap": ("/no-length.png", _until_close),
}


@pytest.mark.parametrize(("path", "body"), OVER_THE_CAP.values(), ids=OVER_THE_CAP.keys())
def test_refuses_a_body_over_the_cap(
    make_fetcher: Callable[..., SafeFetcher],
    http_server: LocalHttpServer,
    dest_dir: Path,
    png_bytes: bytes,
    path: str,
    body: Callable[[BaseHTTPRequestHandler, LocalHttpServer, bytes], None],
) -> None:
    url = http_server.handle(path, lambda handler: body(handler, http_server, png_bytes))
    fetcher = make_fetcher(allow_loopback=True, max_bytes=100_000)

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert caught.value.code == "input_too_large"
    assert list(dest_dir.iterdir()) == []


def test_a_content_length_that_understates_the_body_is_not_overread(
    fetcher: SafeFetcher, http_server: LocalHttpServer, dest_dir: Path, jpeg_bytes: bytes
) -> None:
    """Bytes past Content-Length are never read, so the file is the declared prefix: truncated."""

    def understates(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(jpeg_bytes) // 2))
        handler.end_headers()
        handler.wfile.write(jpeg_bytes)

    url = http_server.handle("/lying.jpg", understates)

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))
    assert caught.value.code == "corrupt_media"


def _stalls(handler: BaseHTTPRequestHandler, server: LocalHttpServer) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.flush()
    server.stopping.wait(5)


def _drips(handler: BaseHTTPRequestHandler, server: LocalHttpServer) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    for _ in range(1000):
        handler.wfile.write(b"\0")
        handler.wfile.flush()
        if server.stopping.wait(0.1):
            return


# A server too slow: the body, the fetcher's timeout, what the message must say, and how
# soon the fetch must give up.
TOO_SLOW = {
    "a stalled server times out quickly": (_stalls, 0.5, "", 2.0),
    # Each read arrives within the per-read timeout; only the overall deadline stops it.
    "a slow drip is cut by the overall deadline": (_drips, 0.8, "did not finish within", 2.5),
}


@pytest.mark.parametrize(("body", "timeout_s", "message", "within_s"), TOO_SLOW.values(), ids=TOO_SLOW.keys())
def test_a_server_too_slow_is_retryably_unreachable(
    make_fetcher: Callable[..., SafeFetcher],
    http_server: LocalHttpServer,
    dest_dir: Path,
    body: Callable[[BaseHTTPRequestHandler, LocalHttpServer], None],
    timeout_s: float,
    message: str,
    within_s: float,
) -> None:
    url = http_server.handle("/slow.jpg", lambda handler: body(handler, http_server))
    fetcher = make_fetcher(allow_loopback=True, timeout_s=timeout_s)

    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert time.monotonic() - started < within_s
    assert message in caught.value.message
    assert caught.value.code == "input_unreachable"
    assert caught.value.retryable is True
    assert list(dest_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("status", "error", "code", "retryable"),
    [
        (404, JobFailed, "input_not_found", False),
        (403, JobFailed, "input_not_found", False),
        (410, JobFailed, "input_not_found", False),
        (204, JobFailed, "input_not_found", False),
        (302, JobFailed, "input_not_found", False),  # a redirect without Location
        (429, UpstreamUnavailable, "input_unreachable", True),
        (500, UpstreamUnavailable, "input_unreachable", True),
        (503, UpstreamUnavailable, "input_unreachable", True),
    ],
)
def test_maps_origin_statuses_to_permanent_or_retryable_errors(
    status: int,
    error: type[Exception],
    code: str,
    retryable: bool,
    fetcher: SafeFetcher,
    http_server: LocalHttpServer,
    dest_dir: Path,
) -> None:
    url = http_server.serve("/x.jpg", b"" if status == 204 else b"nope", status=status)

    with pytest.raises(error) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert getattr(caught.value, "code", None) == code
    assert getattr(caught.value, "retryable", None) is retryable
    assert not isinstance(caught.value, UnsafeInput)


def test_a_refused_connection_is_retryable(
    fetcher: SafeFetcher, http_server: LocalHttpServer, dest_dir: Path
) -> None:
    url = http_server.url("/x.jpg")
    http_server.stop()  # nothing listens on the port any more

    with pytest.raises(UpstreamUnavailable) as caught:
        run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))
    assert caught.value.code == "input_unreachable"


def test_fetches_a_data_url_with_the_same_checks(
    fetcher: SafeFetcher, dest_dir: Path, png_bytes: bytes
) -> None:
    url = data_url("image/png", png_bytes)

    fetched = run(fetcher.fetch_to_file(url, dest_dir, field=FIELD))

    assert (fetched.content_type, fetched.width, fetched.height) == ("image/png", 512, 512)
    assert fetched.path.read_bytes() == png_bytes
    assert fetched.source_url == "data:image/png;base64,..."


@pytest.mark.parametrize(
    ("payload_name", "media_type", "code"),
    [
        ("html", "image/jpeg", "unsupported_media"),
        ("bomb", "image/png", "image_too_large"),
        ("truncated", "image/jpeg", "corrupt_media"),
    ],
)
def test_refuses_bad_data_urls(
    payload_name: str, media_type: str, code: str, fetcher: SafeFetcher, dest_dir: Path, jpeg_bytes: bytes
) -> None:
    payloads = {
        "html": b"<html>hi</html>",
        "bomb": png_declaring(30_000, 30_000),
        "truncated": jpeg_bytes[: len(jpeg_bytes) // 2],
    }

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(data_url(media_type, payloads[payload_name]), dest_dir, field=FIELD))

    assert caught.value.code == code
    assert list(dest_dir.iterdir()) == []


def test_refuses_an_oversized_data_url(
    make_fetcher: Callable[..., SafeFetcher], dest_dir: Path, png_bytes: bytes
) -> None:
    fetcher = make_fetcher(max_bytes=1000)

    with pytest.raises(UnsafeInput) as caught:
        run(fetcher.fetch_to_file(data_url("image/png", png_bytes), dest_dir, field=FIELD))
    assert caught.value.code == "input_too_large"
