"""shared.media: sniffing by magic numbers, header-only dimensions, bomb and corruption checks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from shared.errors import UnsafeInput
from shared.media import check_image, image_dimensions, sniff_kind
from tests.security.support import encode_video, png_declaring


def _encode_image(pil_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 100, 50)).save(buffer, pil_format)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("pil_format", "content_type"),
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
    ],
)
def test_sniffs_each_supported_image_format(pil_format: str, content_type: str, tmp_path: Path) -> None:
    payload = _encode_image(pil_format)
    path = tmp_path / "input.bin"
    path.write_bytes(payload)

    assert sniff_kind(payload) == ("image", content_type)
    assert sniff_kind(path) == ("image", content_type)
    assert image_dimensions(path) == (40, 30)
    assert check_image(path, max_pixels=40 * 30) == (40, 30)


@pytest.mark.parametrize(
    ("container_format", "codec", "content_type"),
    [
        ("mp4", "mpeg4", "video/mp4"),
        ("mov", "mpeg4", "video/quicktime"),
        ("webm", "libvpx", "video/webm"),
        ("matroska", "mpeg4", "video/x-matroska"),
    ],
)
def test_sniffs_each_supported_video_format(container_format: str, codec: str, content_type: str) -> None:
    assert sniff_kind(encode_video(container_format, codec)) == ("video", content_type)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"<html><body>hello</body></html>",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
        b"%PDF-1.7\n",
        b"PK\x03\x04zip",
        b"\x7fELF\x02\x01\x01",
        b"%!PS-Adobe-3.0 EPSF-3.0\n",
    ],
    ids=["empty", "html", "svg", "pdf", "zip", "elf", "eps"],
)
def test_refuses_everything_else(payload: bytes) -> None:
    with pytest.raises(UnsafeInput) as caught:
        sniff_kind(payload)
    assert caught.value.code == "unsupported_media"


def test_image_dimensions_reads_only_the_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(20_000, 100))

    assert image_dimensions(path) == (20_000, 100)


def test_check_image_refuses_a_decompression_bomb(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(30_000, 30_000))

    with pytest.raises(UnsafeInput) as caught:
        check_image(path, max_pixels=40_000_000)
    assert caught.value.code == "image_too_large"


def test_check_image_applies_its_own_cap_below_pils(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    path.write_bytes(png_declaring(5_000, 5_000))  # 25 MP: under PIL's limit, over ours

    with pytest.raises(UnsafeInput) as caught:
        check_image(path, max_pixels=1_000_000)
    assert caught.value.code == "image_too_large"
    assert caught.value.details == {"width": 5_000, "height": 5_000, "max_pixels": 1_000_000}


def test_check_image_refuses_a_truncated_jpeg(tmp_path: Path, jpeg_bytes: bytes) -> None:
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg_bytes[: len(jpeg_bytes) * 2 // 3])

    with pytest.raises(UnsafeInput) as caught:
        check_image(path, max_pixels=40_000_000)
    assert caught.value.code == "corrupt_media"


def test_check_image_refuses_a_png_with_a_bad_checksum(tmp_path: Path, png_bytes: bytes) -> None:
    damaged = bytearray(png_bytes)
    damaged[100] ^= 0xFF  # inside the first IDAT chunk's data: its CRC no longer matches
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(damaged))

    with pytest.raises(UnsafeInput) as caught:
        check_image(path, max_pixels=40_000_000)
    assert caught.value.code == "corrupt_media"


def test_check_image_refuses_a_video(tmp_path: Path, mp4_bytes: bytes) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4_bytes)

    with pytest.raises(UnsafeInput) as caught:
        check_image(path, max_pixels=40_000_000)
    assert caught.value.code == "unsupported_media"


def test_check_image_accepts_real_photos(tmp_path: Path, jpeg_bytes: bytes, png_bytes: bytes) -> None:
    jpeg_path = tmp_path / "face.jpg"
    jpeg_path.write_bytes(jpeg_bytes)
    png_path = tmp_path / "astronaut.png"
    png_path.write_bytes(png_bytes)

    assert check_image(jpeg_path, max_pixels=40_000_000) == (512, 600)
    assert check_image(png_path, max_pixels=40_000_000) == (512, 512)
