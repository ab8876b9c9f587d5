"""The one exception tree of ComfySwap, shaped by what the caller should do.

    ComfySwapError                 base: code, message, http_status, retryable, details
    ├── BadRequest (400)           the caller must change the request
    │   └── ValidationFailed       a named field is wrong, and why
    ├── Unauthorized (401)         no or unknown credentials
    ├── Forbidden (403)            credentials known, action not allowed
    ├── NotFound (404)             no such task (or not yours)
    ├── Conflict (409)             state changed under you: a transition, an idempotency key
    ├── PayloadTooLarge (413)      body or input over a cap
    ├── RateLimited (429)          slow down; carries retry_after
    ├── JobCancelled (409)         the client cancelled; the engine stopped
    ├── TransientError (503)       a dependency failed; the task will be retried
    │   ├── UpstreamUnavailable    ComfyUI / FaceFusion / storage unreachable
    │   └── RunnerBusy             engine slots full (push: Cloud Tasks backs off)
    └── JobFailed (422)            the job itself cannot succeed; never retried
        └── UnsafeInput            an input URL or file was refused (SSRF, size, type)

Every error carries a stable snake_case ``code`` that clients and dashboards key on,
and a message a user can act on. ``to_dict`` is the body's ``error`` field; each server
maps errors to responses in one place (``error_response`` in shared/http.py for the
functions, in gpu_runner/app.py for the runner).
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BadRequest",
    "ComfySwapError",
    "Conflict",
    "Forbidden",
    "JobCancelled",
    "JobFailed",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "RunnerBusy",
    "TransientError",
    "Unauthorized",
    "UnsafeInput",
    "UpstreamUnavailable",
    "ValidationFailed",
    "validation_failed_from",
]


class ComfySwapError(Exception):
    """Base of every error the service raises on purpose."""

    http_status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = dict(details or {})
        if retryable is not None:
            self.retryable = retryable

    def to_dict(self) -> dict[str, Any]:
        """The task's ``error`` field and the API's error body share this shape."""
        body: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": self.retryable}
        if self.details:
            body["details"] = self.details
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class BadRequest(ComfySwapError):
    http_status = 400
    default_code = "bad_request"


class ValidationFailed(BadRequest):
    """A field of the request is wrong; ``field`` is a dotted path such as ``task_data.source_url``."""

    default_code = "validation_failed"

    def __init__(self, field: str, reason: str, *, code: str | None = None, **kwargs: Any) -> None:
        details = {"field": field, "reason": reason, **kwargs.pop("details", {})}
        super().__init__(f"{field}: {reason}", code=code, details=details, **kwargs)
        self.field = field
        self.reason = reason


class Unauthorized(ComfySwapError):
    http_status = 401
    default_code = "unauthorized"


class Forbidden(ComfySwapError):
    http_status = 403
    default_code = "forbidden"


class NotFound(ComfySwapError):
    http_status = 404
    default_code = "not_found"


class Conflict(ComfySwapError):
    http_status = 409
    default_code = "conflict"


class JobCancelled(ComfySwapError):
    """Raised inside the runner when a task is cancelled (or its lease lost) mid-run."""

    http_status = 409
    default_code = "cancelled"


class PayloadTooLarge(ComfySwapError):
    http_status = 413
    default_code = "payload_too_large"


class RateLimited(ComfySwapError):
    http_status = 429
    default_code = "rate_limited"
    retryable = True

    def __init__(self, message: str, *, retry_after_s: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s
        self.details.setdefault("retry_after_s", retry_after_s)


class TransientError(ComfySwapError):
    """A dependency failed in a way that may pass; the task goes back to the queue."""

    http_status = 503
    default_code = "transient_error"
    retryable = True


class UpstreamUnavailable(TransientError):
    default_code = "upstream_unavailable"


class RunnerBusy(TransientError):
    default_code = "runner_busy"

    def __init__(self, message: str = "all engine slots are busy", *, retry_after_s: int = 5) -> None:
        super().__init__(message, details={"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s


class JobFailed(ComfySwapError):
    """The job cannot succeed with these inputs (no face, bad workflow): FAILED, not retried."""

    http_status = 422
    default_code = "job_failed"
    retryable = False


class UnsafeInput(JobFailed):
    """An input was refused: a URL to a private address, a file too large, not an image."""

    http_status = 400
    default_code = "unsafe_input"


def validation_failed_from(exc: Any, prefix: str = "") -> ValidationFailed:
    """The first error of a pydantic ``ValidationError`` as a ValidationFailed naming the
    field (under ``prefix``, dotted) and the reason in plain words."""
    error = exc.errors()[0]
    location = ".".join(str(part) for part in error["loc"])
    field = ".".join(part for part in (prefix, location) if part) or "body"
    reason = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        reason = "field required"
    elif error["type"] == "extra_forbidden":
        reason = "unknown field"
    return ValidationFailed(field, reason)
