"""The embedded default: results are files under DATA_DIR/results, served over HTTP.

A result URL is signed and expires, as the cloud providers' signed URLs do: the runner
serves ``/results/<key>?expires=<unix time>&signature=<HMAC-SHA256(key.expires)>`` to anyone
holding that URL until it expires, and otherwise only to the task's owner (by API key).
The key is RESULT_URL_SECRET, or a random key kept in DATA_DIR/secrets so URLs outlive a
restart; nothing in a URL lets anyone guess another task's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from shared.errors import UnsafeInput
from shared.storage.base import StorageProvider, StoredObject

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = ["RESULT_HEADERS", "LocalStorage"]

# A result is its owner's (or a signed URL holder's): never kept by a shared cache.
RESULT_HEADERS = {"Cache-Control": "private, no-store"}


class LocalStorage(StorageProvider):
    name = "local"

    def __init__(
        self,
        root: Path,
        base_url: str,
        *,
        key_prefix: str = "results/",
        signing_key: bytes | None = None,
        url_ttl_s: int = 3600,
        link_from: Path | None = None,
    ) -> None:
        self.root = root.resolve()
        # Files under ``link_from`` (the runner's work folder: written once, deleted after
        # the task) are hard-linked into the store instead of copied; see upload_file.
        self._link_from = link_from.resolve() if link_from is not None else None
        self.base_url = base_url.rstrip("/")
        # Keys name objects as in a bucket (``results/<task>/000.png``); the folder is the
        # root of that prefix.
        self._key_prefix = key_prefix
        self.root.mkdir(parents=True, exist_ok=True)
        # None: a store whose URLs are never handed out (the input store).
        self._signing_key = signing_key
        self.url_ttl_s = url_ttl_s

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStorage:
        """The results store of the runner, its URLs signed."""
        return cls(
            settings.data_dir / "results",
            settings.effective_local_storage_base_url,
            signing_key=result_url_key(settings),
            url_ttl_s=settings.signed_url_ttl_s,
            link_from=settings.data_dir / "work",
        )

    def _signature(self, relative: str, expires: int) -> str:
        assert self._signing_key is not None, "this store hands out no URLs"
        message = f"{relative}.{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def signed_query(self, relative: str, *, now: float | None = None) -> str:
        """``expires=…&signature=…`` for the object at ``relative`` (a key without its prefix)."""
        expires = int(now if now is not None else time.time()) + self.url_ttl_s
        return urlencode({"expires": expires, "signature": self._signature(relative, expires)})

    def signature_valid(self, relative: str, expires: str | None, signature: str | None) -> bool:
        """True for an unexpired URL signed by this key (compared in constant time)."""
        if self._signing_key is None or not expires or not signature or not expires.isdigit():
            return False
        if int(expires) < time.time():
            return False
        return hmac.compare_digest(self._signature(relative, int(expires)), signature)

    def signed_file(self, relative: str, expires: str | None, signature: str | None) -> Path | None:
        """The file a signed, unexpired URL names (``relative``: the key without its prefix),
        when it is on this disk; None when the URL is not valid, leaves the folder, or the
        file is not here (whoever serves results then answers as for an unsigned URL)."""
        if not self.signature_valid(relative, expires, signature):
            return None
        try:
            path = self.path_for(self._key_prefix + relative)
        except UnsafeInput:
            return None
        return path if path.is_file() else None

    def path_for(self, key: str) -> Path:
        """The file behind ``key``; refuses any key that would leave the root."""
        relative = key.removeprefix(self._key_prefix)
        candidate = (self.root / relative).resolve()
        if not candidate.is_relative_to(self.root) or candidate == self.root:
            raise UnsafeInput(f"storage key {key!r} leaves the results folder", code="path_traversal")
        return candidate

    def upload_file(self, local_path: Path, key: str, content_type: str) -> StoredObject:
        destination = self.path_for(key)
        destination.parent.mkdir(parents=True, exist_ok=True)
        # Link (or copy) then rename: a reader never sees half a file, a retry replaces it.
        tmp_name = str(destination.parent / f".upload-{secrets.token_hex(8)}")
        try:
            try:
                # A hard link: the runner's outputs and the results share DATA_DIR's file
                # system, so "uploading" a video is a directory entry, not a copy of its
                # bytes. Only for the runner's own work files, which nothing rewrites in
                # place (a file an engine's service shares could be, and is copied).
                if not self._linkable(local_path):
                    raise OSError("not a work file: copy it")
                os.link(local_path, tmp_name)
            except OSError:
                # Another file system (or one without links): the kernel's copy.
                fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    _copy_into(local_path, fd)
                finally:
                    os.close(fd)
            os.replace(tmp_name, destination)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        relative = destination.relative_to(self.root).as_posix()
        return StoredObject(
            provider=self.name,
            key=key,
            url=f"{self.base_url}/{relative}"
            + (f"?{self.signed_query(relative)}" if self._signing_key is not None else ""),
            content_type=content_type,
            size=destination.stat().st_size,
        )

    def _linkable(self, local_path: Path) -> bool:
        return self._link_from is not None and local_path.resolve().is_relative_to(self._link_from)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        destination = self.path_for(key)
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(tmp_name, destination)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path_for(key).read_bytes()
        except FileNotFoundError:
            raise self._no_object(key) from None

    def delete(self, key: str) -> bool:
        path = self.path_for(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        # Empty task folders go too, up to (not including) the root.
        for parent in path.parents:
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break
        return True

    def list_keys(self, prefix: str) -> list[tuple[str, dt.datetime]]:
        relative = prefix.removeprefix(self._key_prefix)
        keys = []
        for path in self.root.rglob("*"):
            name = path.relative_to(self.root).as_posix()
            if path.is_file() and not path.name.startswith(".upload-") and name.startswith(relative):
                modified = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
                keys.append((self._key_prefix + name, modified))
        return keys

    def health(self) -> dict[str, Any]:
        writable = os.access(self.root, os.W_OK)
        return {"status": "configured" if writable else "error", "root": str(self.root)}


def result_url_key(settings: Settings) -> bytes:
    """RESULT_URL_SECRET, or the random key of this DATA_DIR (created once, owner-only)."""
    if settings.result_url_secret:
        return settings.result_url_secret.encode()
    path = settings.data_dir / "secrets" / "result-url.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".key-")
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32))
        # Two processes starting at once: link() is atomic, the first wins, both read the winner.
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            pass
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    return path.read_text().strip().encode()


def _copy_into(source: Path, fd: int) -> None:
    """Copy ``source`` into the open, empty file ``fd`` with the kernel's copy (sendfile, as
    shutil.copyfile does), or through userspace where sendfile cannot.

    Not shutil.copyfile onto the file's name: it reopens the file with O_TRUNC, and ext4
    writes out a file truncated to zero when it is closed (auto_da_alloc, a guard for
    programs that rewrite files in place), so a 200 MB result waited ~40 ms for the disk."""
    with source.open("rb") as src:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        try:
            while offset < size:
                sent = os.sendfile(fd, src.fileno(), offset, size - offset)
                if sent == 0:
                    break
                offset += sent
        except OSError:
            if offset:
                raise
            with open(fd, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst)
