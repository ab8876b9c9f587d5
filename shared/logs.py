"""JSON log lines on stdout in Cloud Logging's structured shape.

Cloud Logging reads ``severity``, ``message`` and
``logging.googleapis.com/trace`` from each JSON line; everything else lands in
``jsonPayload`` where log-based metrics (infra/terraform/monitoring.tf) pick up
``event``, ``task_id``, ``code`` and the timing fields.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.errors import ComfySwapError
    from shared.tasks import Task

__all__ = [
    "bind_task",
    "bind_trace",
    "configure_logging",
    "encode_json",
    "get_logger",
    "log_event",
    "log_task_claimed",
    "unbind_task",
    "unbind_trace",
]

_task_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)
_trace_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace", default=None)

# Attributes every LogRecord has; anything else was passed through ``extra=``.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# The pathname of an event's record: log_event skips the caller lookup.
_NO_SOURCE = "(event)"
# Never write these keys' values, whatever a caller passes in ``extra``.
_SECRET_KEYS = {"authorization", "api_key", "token", "secret", "password", "r2_secret_key", "x-api-key"}


# One encoder for every line: json.dumps(..., default=str) builds a new one per call.
# One encoder for log lines and JSON answers (shared.http), str() for what JSON lacks:
# json.dumps(..., default=str) would build a new one per call.
encode_json = json.JSONEncoder(default=str).encode
# The date and time of day of the latest whole second logged, formatted once a second.
_second: tuple[int, str] = (-1, "")


def _utc_iso(timestamp: float) -> str:
    """``datetime.fromtimestamp(timestamp, UTC).isoformat()``, its date and time of day
    formatted once per second (formatting a datetime was a tenth of a log line's CPU)."""
    global _second
    whole = int(timestamp // 1)
    micro = round((timestamp - whole) * 1e6)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    second, text = _second
    if second != whole:
        text = dt.datetime.fromtimestamp(whole, tz=dt.UTC).isoformat()[:-6]
        _second = (whole, text)
    return f"{text}.{micro:06d}+00:00" if micro else f"{text}+00:00"


class CloudLoggingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "time": _utc_iso(record.created),
            "logger": record.name,
        }
        task_id = getattr(record, "task_id", None) or _task_id_var.get()
        if task_id:
            entry["task_id"] = task_id
        trace = _trace_var.get()
        if trace:
            entry["logging.googleapis.com/trace"] = trace
        for key, value in vars(record).items():
            if key in _RESERVED or key.startswith("_") or key in entry:
                continue
            entry[key] = "[redacted]" if key.lower() in _SECRET_KEYS else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return encode_json(entry)


def configure_logging(level: str = "INFO") -> None:
    """Route the root logger to one JSON line per record on stdout (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_comfyswap", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(CloudLoggingFormatter())
    handler._comfyswap = True  # type: ignore[attr-defined]  # marker so reconfiguring replaces it
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("urllib3", "google", "botocore", "boto3", "httpx", "httpcore", "websockets", "werkzeug"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def bind_task(task_id: str | None) -> contextvars.Token[str | None]:
    """Attach a task id to every log line of the current context."""
    return _task_id_var.set(task_id)


def unbind_task(token: contextvars.Token[str | None]) -> None:
    _task_id_var.reset(token)


def bind_trace(trace: str | None) -> contextvars.Token[str | None]:
    return _trace_var.set(trace)


def unbind_trace(token: contextvars.Token[str | None]) -> None:
    _trace_var.reset(token)


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """One structured event (``event`` is what log-based metrics filter on).

    The record goes through the logger's handlers and filters like any other, but is made
    without ``Logger.log``'s caller lookup (a walk up the stack on every line, issue 15):
    the JSON line names its logger and event, never a source file or line."""
    if logger.isEnabledFor(level):
        extra = {"event": event, **fields}
        logger.handle(logger.makeRecord(logger.name, level, _NO_SOURCE, 0, event, (), None, extra=extra))


def log_failure(
    logger: logging.Logger, event: str, error: ComfySwapError, *, level: int = logging.WARNING, **fields: Any
) -> None:
    """An event about a failure, carrying the error's ``code`` and message (``error``) as
    every failure event does, so log queries read them the same way."""
    log_event(logger, event, level=level, code=error.code, error=error.message, **fields)


def log_task_claimed(logger: logging.Logger, task: Task, *, worker_id: str) -> None:
    """``task_claimed``, the queue-wait metric's event: logged by whoever claims a task,
    fetch_task in pull mode and the runner's push endpoint in push mode."""
    log_event(
        logger,
        "task_claimed",
        task_id=task.taskId,
        worker_id=worker_id,
        attempt=task.attempts,
        queue_wait_s=task.timings.get("queue_wait_s"),
    )
