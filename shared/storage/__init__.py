"""Storage providers behind one interface, one registry and a configured fallback chain.

``make_storage_chain(settings)`` is what the runner calls: ``STORAGE_PROVIDER`` first,
then each name of ``STORAGE_FALLBACK``. Provider modules are imported only when a
provider of that kind is built, so a function that never uploads never pays for boto3 or
google-cloud-storage at import time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shared.errors import UpstreamUnavailable
from shared.storage.base import StorageProvider, StoredObject, result_key

if TYPE_CHECKING:
    from shared.settings import Settings
    from shared.storage.chain import StorageChain

__all__ = [
    "PROVIDER_NAMES",
    "StorageProvider",
    "StoredObject",
    "make_provider",
    "make_storage_chain",
    "result_key",
    "upstream_error",
]

# name -> (module, factory). The factory is a ``from_settings(settings)`` classmethod.
_REGISTRY: dict[str, tuple[str, str]] = {
    "local": ("shared.storage.local", "LocalStorage"),
    "gcs": ("shared.storage.gcs", "GCSStorage"),
    "r2": ("shared.storage.r2", "R2Storage"),
    "cf_images": ("shared.storage.cf_images", "CloudflareImagesStorage"),
}
PROVIDER_NAMES = tuple(_REGISTRY)

# Upstream bodies can be whole HTML error pages; keep enough to diagnose, not a megabyte.
_MAX_BODY_CHARS = 2000


def upstream_error(
    provider: str,
    message: str,
    *,
    status: int | None = None,
    body: str | None = None,
    key: str | None = None,
    code: str = "storage_upload_failed",
    retryable: bool | None = None,
) -> UpstreamUnavailable:
    """The error a provider raises when its service refused or failed an operation.

    It carries the upstream HTTP status and body (truncated) so an operator can see what
    the service said. Network failures (no status), timeouts, throttling and 5xx are
    retryable; any other 4xx is a configuration problem that retrying will not fix
    (callers say so explicitly for problems found before any request).
    """
    if retryable is None:
        retryable = status is None or status in (408, 429) or status >= 500
    details: dict[str, Any] = {"provider": provider, "status": status}
    if body:
        details["body"] = body[:_MAX_BODY_CHARS]
    if key is not None:
        details["key"] = key
    return UpstreamUnavailable(f"{provider}: {message}", code=code, details=details, retryable=retryable)


def require_configured(provider: str, missing: list[str]) -> None:
    """Refuse to build a client while required settings are empty: a configuration
    problem, so not retryable."""
    if missing:
        raise upstream_error(
            provider,
            f"not configured: set {', '.join(missing)}",
            code="storage_not_configured",
            retryable=False,
        )


def make_provider(name: str, settings: Settings) -> StorageProvider:
    """Build one provider by its ``STORAGE_PROVIDER`` name, importing its module only now."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown storage provider {name!r}; known: {', '.join(PROVIDER_NAMES)}")
    if name == "local":
        from shared.storage.local import LocalStorage

        return LocalStorage.from_settings(settings)
    module_name, class_name = _REGISTRY[name]
    provider_class = getattr(importlib.import_module(module_name), class_name)
    provider: StorageProvider = provider_class.from_settings(settings)
    return provider


def make_storage_chain(settings: Settings) -> StorageChain:
    """``STORAGE_PROVIDER`` then ``STORAGE_FALLBACK``, each name once, in that order."""
    from shared.storage.chain import StorageChain

    names = list(dict.fromkeys([settings.storage_provider, *settings.fallback_providers]))
    return StorageChain([make_provider(name, settings) for name in names])
