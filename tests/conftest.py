"""Fixtures for every test: an isolated environment, fresh settings, real sample media."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from the same environment and forgets cached settings/services."""
    saved = dict(os.environ)
    from shared.settings import reset_settings_cache

    reset_settings_cache()
    yield
    os.environ.clear()
    os.environ.update(saved)
    reset_settings_cache()
    try:
        from shared.http import service

        service.cache_clear()
    except ImportError:
        pass


@pytest.fixture(scope="session")
def grace_hopper_path() -> Path:
    from comfyswap.samples import GRACE_HOPPER_JPG

    return GRACE_HOPPER_JPG


@pytest.fixture(scope="session")
def astronaut_png() -> Path:
    from comfyswap.samples import ASTRONAUT_PNG

    return ASTRONAUT_PNG
