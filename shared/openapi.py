"""The public API's OpenAPI document (shared/openapi.yaml), loaded once per process."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

__all__ = ["OPENAPI_PATH", "openapi_document"]

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")


@functools.cache
def openapi_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(OPENAPI_PATH.read_text())
    return document
