"""What an input file really is, judged from its bytes, and whether an image is safe to decode.

Headers and file names are chosen by whoever serves the file, so the fetcher and the runner
decide by magic numbers instead, and only for the few formats the engines handle. Images are
opened lazily so their declared size is checked before any pixel is decoded: a few kilobytes
of PNG can declare 30000x30000 pixels (a decompression bomb) and exhaust the runner's memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import filetype
from PIL import Image, UnidentifiedImageError

from shared.errors import UnsafeInput

__all__ = [
    "IMAGE_CONTENT_TYPES",
    "MEDIA_EXTENSIONS",
    "VIDEO_CONTENT_TYPES",
    "check_image",
    "image_dimensions",
    "sniff_kind",
]

IMAGE_CONTENT_TYPES: Final[frozenset[str]] = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp"}
)
VIDEO_CONTENT_TYPES: Final[frozenset[str]] = frozenset(
    {"video/mp4", "video/quicktime", "video/webm", "video/x-matroska"}
)
MEDIA_EXTENSIONS: Final[dict[str, str]] = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "video/webm": ".webm",
    "video/x-matroska": ".mkv",
}

# PIL picks a decoder by probing every registered plugin; some (EPS) shell out to
# Ghostscript. Only the decoder for the sniffed format is ever allowed to run.
_PIL_FORMATS: Final[dict[str, str]] = {
    "image/jpeg": "JPEG",
    "image/png": "PNG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
}
# filetype decides from the first 8 KiB (its own signature window).
_SNIFF_BYTES: Final = 8192


def sniff_kind(path_or_bytes: Path | bytes) -> tuple[str, str]:
    """Return ``(kind, content_type)`` with kind ``"image"`` or ``"video"``, from magic numbers.

    Raises ``UnsafeInput`` (code ``unsupported_media``) for anything else: SVG, HTML, PDF, an
    archive, or a format the engines cannot read, whatever its name or Content-Type said.
    """
    if isinstance(path_or_bytes, bytes):
        head = path_or_bytes[:_SNIFF_BYTES]
    else:
        with path_or_bytes.open("rb") as file:
            head = file.read(_SNIFF_BYTES)
    guess = filetype.guess(head)
    content_type = guess.mime if guess is not None else None
    if content_type in IMAGE_CONTENT_TYPES:
        return "image", content_type
    if content_type in VIDEO_CONTENT_TYPES:
        return "video", content_type
    supported = ", ".join(ext.lstrip(".") for ext in MEDIA_EXTENSIONS.values())
    found = content_type or "unrecognised bytes"
    raise UnsafeInput(
        f"input is {found}, not a supported image or video ({supported})",
        code="unsupported_media",
        details={"sniffed": found},
    )


def image_dimensions(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header alone; no pixel data is decoded."""
    content_type = sniff_kind(path)[1]
    with _open_image(path, content_type) as image:
        return image.size


def check_image(path: Path, max_pixels: int) -> tuple[int, int]:
    """Refuse decompression bombs and corrupt or truncated images; return ``(width, height)``.

    The declared size is checked before decoding; the full decode that follows is what
    finds a truncated file (a JPEG cut short still has a valid header). Raises
    ``UnsafeInput`` with code ``image_too_large``, ``corrupt_media`` or ``unsupported_media``.
    """
    kind, content_type = sniff_kind(path)
    if kind != "image":
        raise UnsafeInput(f"input is {content_type}, not an image", code="unsupported_media")
    with _open_image(path, content_type) as image:
        width, height = image.size
        if width <= 0 or height <= 0 or width * height > max_pixels:
            raise _too_large(width, height, max_pixels)
        try:
            image.verify()
        except Exception as exc:
            raise _corrupt(exc) from exc
    # verify() leaves the image unusable, so decoding needs a second, fresh open.
    with _open_image(path, content_type) as image:
        try:
            image.load()
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad data
            raise _corrupt(exc) from exc
    return width, height


def _open_image(path: Path, content_type: str) -> Image.Image:
    """Open lazily with only the sniffed format's decoder; map PIL's refusals to UnsafeInput."""
    pil_format = _PIL_FORMATS.get(content_type)
    if pil_format is None:
        raise UnsafeInput(f"input is {content_type}, not an image", code="unsupported_media")
    try:
        return Image.open(path, formats=[pil_format])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own, looser cap; the warning only arrives as an exception when warnings
        # are errors (as in the tests), otherwise check_image's own cap refuses it.
        raise UnsafeInput(
            f"image declares too many pixels to decode safely ({exc})", code="image_too_large"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _corrupt(exc) from exc


def _too_large(width: int, height: int, max_pixels: int) -> UnsafeInput:
    return UnsafeInput(
        f"image is {width}x{height} pixels; the limit is {max_pixels} pixels",
        code="image_too_large",
        details={"width": width, "height": height, "max_pixels": max_pixels},
    )


def _corrupt(exc: BaseException) -> UnsafeInput:
    return UnsafeInput(f"image is corrupt or truncated ({exc})", code="corrupt_media")
