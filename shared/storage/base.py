"""The storage provider interface: put one result file somewhere and say where it is.

Keys are deterministic per task and output index (:func:`result_key`), so a retried
upload overwrites the same object instead of leaving a duplicate behind.
"""

from __future__ import annotations

import abc
import dataclasses
import mimetypes
from pathlib import Path
from typing import Any

__all__ = ["StorageProvider", "StoredObject", "result_key"]


@dataclasses.dataclass(frozen=True)
class StoredObject:
    provider: str
    key: str
    url: str
    content_type: str
    size: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def result_key(task_id: str, index: int, content_type: str, *, suffix: str | None = None) -> str:
    """``results/<task_id>/<index>.<ext>``: the same task and output always map to one key."""
    extension = suffix or mimetypes.guess_extension(content_type, strict=False) or ".bin"
    if extension == ".jpe":
        extension = ".jpg"
    return f"results/{task_id}/{index:03d}{extension}"


class StorageProvider(abc.ABC):
    """One place results can go. Methods are blocking; the runner calls them in a thread."""

    name: str = "base"

    def accepts(self, content_type: str) -> bool:
        """Whether this provider can hold this kind of file (Cloudflare Images: images only)."""
        return True

    @abc.abstractmethod
    def upload_file(self, local_path: Path, key: str, content_type: str) -> StoredObject:
        """Stream ``local_path`` to ``key`` (overwriting) and return where it can be read."""

    @abc.abstractmethod
    def health(self) -> dict[str, Any]:
        """``{"status": "configured"|"error", ...}`` without uploading anything."""
