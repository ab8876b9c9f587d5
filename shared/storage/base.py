"""The storage provider interface: put one result file somewhere and say where it is.

Keys are deterministic per task and output index (:func:`result_key`), so a retried
upload overwrites the same object instead of leaving a duplicate behind.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime as dt
import mimetypes
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from shared.errors import ComfySwapError, NotFound

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = ["StorageProvider", "StoredObject", "bucket_options", "result_key"]


def bucket_options(settings: Settings) -> dict[str, Any]:
    """The options every bucket provider (GCS, R2) reads from settings alike: signed URLs
    and their lifetime, and one retry deadline per operation."""
    return {
        "signed_urls": settings.signed_urls,
        "signed_url_ttl_s": settings.signed_url_ttl_s,
        "retry_deadline_s": settings.storage_retry_deadline_s,
    }


ClientT = TypeVar("ClientT")


class LazyClient(Generic[ClientT]):
    """The one client of a provider, built on first use (the runner's threads share it)."""

    def __init__(self, build: Callable[[], ClientT]) -> None:
        self._build = build
        self._client: ClientT | None = None
        self._lock = threading.Lock()

    def get(self) -> ClientT:
        with self._lock:
            if self._client is None:
                self._client = self._build()
            return self._client

    @property
    def built(self) -> ClientT | None:
        """The client if it was ever built (to close it), else None."""
        return self._client


def missing_settings(required: Mapping[str, object]) -> list[str]:
    """The names (as the user sets them) of the required settings that are empty."""
    return [name for name, value in required.items() if not value]


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

    def _wrap(self, exc: Exception, key: str | None) -> ComfySwapError:
        """The service's error for a client library's exception (providers map their own)."""
        return ComfySwapError(f"{self.name}: {type(exc).__name__}: {exc}", code="storage_upload_failed")

    @contextlib.contextmanager
    def _service_errors(self, key: str | None) -> Iterator[None]:
        """Library exceptions leave as the service's errors, with the upstream detail."""
        try:
            yield
        except ComfySwapError:
            raise
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    @staticmethod
    def _no_object(key: str) -> NotFound:
        return NotFound(f"no object {key}", code="object_not_found", details={"key": key})

    # --- object operations: inputs kept for a task's life, orphaned results removed ------
    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` at ``key`` (overwriting). Providers that cannot hold inputs refuse."""
        raise NotImplementedError(f"{self.name} does not keep task inputs")

    def read_bytes(self, key: str) -> bytes:
        """The object at ``key``; shared.errors.NotFound when there is none."""
        raise NotImplementedError(f"{self.name} does not keep task inputs")

    def delete(self, key: str) -> bool:
        """Remove the object at ``key``; False when there was none (not an error)."""
        raise NotImplementedError(f"{self.name} cannot delete objects")

    def list_keys(self, prefix: str) -> list[tuple[str, dt.datetime]]:
        """``(key, last modified)`` of every object under ``prefix`` (the orphan sweep's view).
        Providers that cannot list (Cloudflare Images by key) answer an empty list."""
        return []
