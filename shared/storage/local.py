"""The embedded default: results are files under DATA_DIR/results, served over HTTP."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from shared.errors import UnsafeInput
from shared.storage.base import StorageProvider, StoredObject

__all__ = ["LocalStorage"]


class LocalStorage(StorageProvider):
    name = "local"

    def __init__(self, root: Path, base_url: str, *, key_prefix: str = "results/") -> None:
        self.root = root.resolve()
        self.base_url = base_url.rstrip("/")
        # Keys name objects as in a bucket (``results/<task>/000.png``); the folder is the
        # root of that prefix.
        self._key_prefix = key_prefix
        self.root.mkdir(parents=True, exist_ok=True)

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
        # Copy then rename: a reader never sees half a file, a retry simply replaces it.
        fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=".upload-")
        try:
            os.close(fd)
            # copyfile uses the kernel's copy (sendfile / copy_file_range) where it can.
            shutil.copyfile(local_path, tmp_name)
            os.replace(tmp_name, destination)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        relative = destination.relative_to(self.root).as_posix()
        return StoredObject(
            provider=self.name,
            key=key,
            url=f"{self.base_url}/{relative}",
            content_type=content_type,
            size=destination.stat().st_size,
        )

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
