"""The embedded default: results are files under DATA_DIR/results, served over HTTP."""

from __future__ import annotations

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

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root.resolve()
        self.base_url = base_url.rstrip("/")
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        """The file behind ``key``; refuses any key that would leave the root."""
        relative = key.removeprefix("results/")
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

    def health(self) -> dict[str, Any]:
        writable = os.access(self.root, os.W_OK)
        return {"status": "configured" if writable else "error", "root": str(self.root)}
