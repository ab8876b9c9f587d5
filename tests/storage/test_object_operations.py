"""Object operations the input store and the orphan sweep rely on, on every provider that
keeps inputs (local, fake-gcs-server, moto as R2): put, read, list, delete."""

from __future__ import annotations

import uuid

import pytest

from shared.errors import NotFound
from tests.storage.test_storage_contract import build_backend

pytestmark = pytest.mark.emulator


@pytest.mark.parametrize("name", ["local", "gcs", "r2"])
def test_put_read_list_delete(name: str, request: pytest.FixtureRequest) -> None:
    provider = build_backend(name, request).provider
    prefix = f"results/task_{uuid.uuid4().hex}/"
    key = prefix + "source_url"

    provider.put_bytes(key, b"\xff\xd8 face bytes", "image/jpeg")

    assert provider.read_bytes(key) == b"\xff\xd8 face bytes"
    assert [listed for listed, _ in provider.list_keys(prefix)] == [key]
    assert provider.delete(key) is True
    assert provider.delete(key) is False
    assert provider.list_keys(prefix) == []
    with pytest.raises(NotFound):
        provider.read_bytes(key)
