"""The configured fallback chain: try each provider in order until one holds the result.

A result that took minutes of GPU time should not be lost because one storage service
is down, so a failed provider is logged and the next one is tried. Providers that cannot
hold the file's type (Cloudflare Images and videos) are skipped, not failed. What was
tried is recorded on the returned object so the task document shows where the result
went and why.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.errors import ComfySwapError, UpstreamUnavailable
from shared.logs import get_logger, log_event, log_failure
from shared.storage.base import StorageProvider, StoredObject

__all__ = ["StorageChain"]

logger = get_logger(__name__)


class StorageChain(StorageProvider):
    """Ordered providers behaving as one: the first that accepts and succeeds wins."""

    name = "chain"

    def __init__(self, providers: Sequence[StorageProvider]) -> None:
        if not providers:
            raise ValueError("a storage chain needs at least one provider")
        self.providers = list(providers)

    @property
    def provider_names(self) -> list[str]:
        return [provider.name for provider in self.providers]

    def accepts(self, content_type: str) -> bool:
        return any(provider.accepts(content_type) for provider in self.providers)

    def upload(self, local_path: Path, key: str, content_type: str) -> StoredObject:
        """Upload to the first provider that accepts ``content_type`` and succeeds.

        The returned object's ``extra["tried"]`` lists every provider passed over before
        it, with the reason (skipped for the type, or the error). When every provider
        fails, raises ``UpstreamUnavailable(code="storage_unavailable")`` whose details
        hold each provider's error; it is retryable when any of those errors was.
        """
        tried: list[dict[str, Any]] = []
        failures: list[tuple[str, ComfySwapError]] = []
        for provider in self.providers:
            if not provider.accepts(content_type):
                tried.append({"provider": provider.name, "skipped": f"does not accept {content_type}"})
                continue
            try:
                stored = provider.upload_file(local_path, key, content_type)
            except Exception as exc:
                error = _as_service_error(provider.name, exc, key)
                failures.append((provider.name, error))
                tried.append({"provider": provider.name, "error": error.message, "code": error.code})
                log_failure(
                    logger,
                    "storage_provider_failed",
                    error,
                    provider=provider.name,
                    key=key,
                    retryable=error.retryable,
                    upstream=error.details,
                )
                continue
            if tried:
                log_event(logger, "storage_fallback_used", provider=provider.name, key=key, tried=tried)
            if failures:
                self._remove_late_copies(key, [name for name, _ in failures])
            return dataclasses.replace(stored, extra={**stored.extra, "tried": tried})
        raise self._all_failed(key, content_type, tried, failures)

    def upload_file(self, local_path: Path, key: str, content_type: str) -> StoredObject:
        """The provider interface, so a chain can stand wherever one provider can."""
        return self.upload(local_path, key, content_type)

    def _remove_late_copies(self, key: str, failed: list[str]) -> None:
        """A provider that timed out may still finish the upload after the fallback won
        (a frozen GCS upload lands later): delete the key there, off the upload path; the
        orphan sweep catches a copy that lands even after that."""
        losers = [provider for provider in self.providers if provider.name in failed]
        threading.Thread(
            target=_delete_from, args=(losers, key), name="remove-late-copies", daemon=True
        ).start()

    def delete(self, key: str) -> bool:
        """Remove ``key`` from every provider that holds it (a result has one home; a
        fallback race or a cancelled upload may have left a copy elsewhere). Best effort:
        a provider that fails is logged, and the orphan sweep tries again later."""
        return _delete_from(self.providers, key)

    def health(self) -> dict[str, Any]:
        reports = [{"provider": provider.name, **provider.health()} for provider in self.providers]
        healthy = any(report.get("status") == "configured" for report in reports)
        return {"status": "configured" if healthy else "error", "providers": reports}

    def _all_failed(
        self,
        key: str,
        content_type: str,
        tried: list[dict[str, Any]],
        failures: list[tuple[str, ComfySwapError]],
    ) -> UpstreamUnavailable:
        if not failures:
            # Nothing was even attempted: the configuration cannot store this type at all,
            # so a retry would meet the same chain.
            message = (
                f"no configured storage provider accepts {content_type} ({', '.join(self.provider_names)})"
            )
            retryable = False
        else:
            message = "every storage provider failed: " + "; ".join(error.message for _, error in failures)
            retryable = any(error.retryable for _, error in failures)
        error = UpstreamUnavailable(
            message,
            code="storage_unavailable",
            details={
                "key": key,
                "content_type": content_type,
                "tried": tried,
                "errors": [{"provider": name, **error.to_dict()} for name, error in failures],
            },
            retryable=retryable,
        )
        log_event(logger, "storage_unavailable", level=logging.ERROR, key=key, tried=tried)
        return error


def _as_service_error(provider: str, exc: Exception, key: str) -> ComfySwapError:
    """Providers raise the service's errors; anything else is a bug or an unmapped failure.

    An unmapped exception is still treated as a transient upstream failure so the chain
    (and the task's retry) gets a chance, with the exception's type kept for diagnosis.
    """
    if isinstance(exc, ComfySwapError):
        return exc
    return UpstreamUnavailable(
        f"{provider}: {type(exc).__name__}: {exc}",
        code="storage_upload_failed",
        details={"provider": provider, "key": key, "exception": type(exc).__name__},
    )


def _delete_from(providers: Sequence[StorageProvider], key: str) -> bool:
    removed = False
    for provider in providers:
        try:
            if provider.delete(key):
                removed = True
                log_event(logger, "storage_object_removed", provider=provider.name, key=key)
        except NotImplementedError:
            continue
        except Exception as exc:
            log_event(
                logger,
                "storage_delete_failed",
                level=logging.WARNING,
                provider=provider.name,
                key=key,
                error=repr(exc),
            )
    return removed
