"""API_KEYS_FILE is read once per version of the file (mtime and size), not per request."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.auth import authenticate, hash_api_key
from shared.errors import Unauthorized
from shared.settings import Settings


def _write_keys(path: Path, key: str, owner: str) -> None:
    path.write_text(f"{hash_api_key(key)}:{owner}:client\n")


def test_the_keys_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys"
    _write_keys(keys_file, "csk_first", "alice")
    settings = Settings(data_dir=tmp_path, api_keys_file=keys_file)
    assert authenticate({"X-API-Key": "csk_first"}, settings).owner == "alice"
    version = keys_file.stat()

    # Same size, same mtime: the file counts as unchanged and is not parsed again.
    _write_keys(keys_file, "csk_other", "bobby")
    os.utime(keys_file, ns=(version.st_atime_ns, version.st_mtime_ns))
    assert authenticate({"X-API-Key": "csk_first"}, settings).owner == "alice"

    # A new mtime (an edit, a rotation) is read at the next request.
    os.utime(keys_file, ns=(version.st_atime_ns, version.st_mtime_ns + 1_000_000_000))
    assert authenticate({"X-API-Key": "csk_other"}, settings).owner == "bobby"
    with pytest.raises(Unauthorized):
        authenticate({"X-API-Key": "csk_first"}, settings)
