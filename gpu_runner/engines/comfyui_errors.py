"""ComfyUI's answers as the shared errors (shared/errors.py): what a client can act on.

A 400 validation answer (or a 200 with ``node_errors``) is ``JobFailed``
``comfyui_validation_failed`` with a message naming node, class, input and reason; a
runtime ``execution_error`` is ``JobFailed`` ``comfyui_execution_error``. Messages that
reach clients carry no server paths and no traceback: those stay in the runner's log
(docs/comfyui-protocol.md, section 7).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final

import httpx

from shared.errors import JobFailed
from shared.logs import get_logger, log_event

__all__ = [
    "TERMINAL_EVENTS",
    "execution_error",
    "json_or_text",
    "scrub",
    "scrub_all",
    "terminal_from_history",
    "validation_error",
]

logger = get_logger(__name__)

TERMINAL_EVENTS: Final = frozenset({"execution_success", "execution_error", "execution_interrupted"})


def json_or_text(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"error": {"type": "unparsable", "message": response.text[:2000]}, "node_errors": {}}
    return body if isinstance(body, dict) else {"error": {"message": str(body)}, "node_errors": {}}


def terminal_from_history(entry: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    status = entry.get("status") or {}
    for message in status.get("messages") or []:
        if isinstance(message, list) and len(message) == 2 and message[0] in TERMINAL_EVENTS:
            return str(message[0]), dict(message[1])
    if status.get("status_str") == "success":
        return "execution_success", {}
    if status.get("status_str") == "error":
        return "execution_error", {"exception_message": "ComfyUI reported an error without details"}
    return None


def _node_error_reason(error: dict[str, Any]) -> str:
    error = _hide_file_choices(error)
    message = str(error.get("message") or error.get("type") or "invalid")
    details = str(error.get("details") or "")
    reason = f"{message}: {details}" if details else message
    extra = error.get("extra_info") or {}
    exception_type = extra.get("exception_type")
    if exception_type == "KeyError":
        missing = details.strip("'\"")
        reason += f" (a link refers to node {missing}, which is not in the workflow)"
    elif exception_type == "IndexError":
        reason += " (a link refers to an output slot its node does not have)"
    return reason


def validation_error(body: dict[str, Any], status: int) -> JobFailed:
    """A 400 (or a 200 with node_errors) as a message the workflow's author can act on."""
    problems: list[dict[str, Any]] = []
    lines: list[str] = []
    node_errors = body.get("node_errors") or {}
    if isinstance(node_errors, dict):
        for node_id, node_error in node_errors.items():
            class_type = node_error.get("class_type", "?")
            for node_problem in node_error.get("errors") or []:
                extra = node_problem.get("extra_info") or {}
                input_name = extra.get("input_name")
                reason = _node_error_reason(node_problem)
                where = f"node {node_id} ({class_type})" + (f" input {input_name!r}" if input_name else "")
                lines.append(f"{where}: {reason}")
                problems.append(
                    {
                        "node_id": str(node_id),
                        "class_type": class_type,
                        "input_name": input_name,
                        "type": node_problem.get("type"),
                        "reason": reason,
                    }
                )
    raw_error = body.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    if not lines:
        message = str(error.get("message") or "the workflow is invalid")
        details = str(error.get("details") or "")
        if error.get("type") == "prompt_no_outputs":
            details = "add an output node such as SaveImage"
        lines.append(f"{message} ({details})" if details else message)
    return JobFailed(
        scrub("ComfyUI rejected the workflow: " + "; ".join(lines)),
        code="comfyui_validation_failed",
        details={
            "error_type": error.get("type"),
            "problems": scrub_all(problems),
            "upstream_status": status,
            "upstream_body": scrub_all(body),
        },
    )


def execution_error(data: dict[str, Any], prompt_id: str) -> JobFailed:
    """A runtime error as clients see it: node, class, exception; never the traceback or the
    server's paths (they stay in the runner's log, ``comfyui_execution_error``)."""
    node_id = data.get("node_id")
    node_type = data.get("node_type")
    exception_type = scrub(str(data.get("exception_type") or "Exception"))
    exception_message = scrub(str(data.get("exception_message") or "").strip())
    log_event(
        logger,
        "comfyui_execution_error",
        level=logging.WARNING,
        prompt_id=prompt_id,
        node_id=node_id,
        node_type=node_type,
        exception_type=data.get("exception_type"),
        exception_message=data.get("exception_message"),
        traceback=list(data.get("traceback") or [])[-5:],
    )
    return JobFailed(
        f"ComfyUI failed in node {node_id} ({node_type}): {exception_type}: {exception_message}",
        code="comfyui_execution_error",
        details={
            "prompt_id": prompt_id,
            "node_id": node_id,
            "node_type": node_type,
            "exception_type": exception_type,
            "exception_message": exception_message,
        },
    )


# An absolute POSIX or Windows path of two components or more ("/opt/ComfyUI/comfy/sd.py",
# "C:\\ComfyUI\\input\\x.png"): the file name is kept, the server's layout is not shown.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.\-])(?:[A-Za-z]:)?(?:[\\/][^\\/\s'\"(),:;]+){2,}")
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):.*", re.DOTALL)


def scrub(text: str) -> str:
    """``text`` without tracebacks and with absolute paths cut to their file name."""
    text = _TRACEBACK.sub("", text).strip()
    return _ABSOLUTE_PATH.sub(lambda match: re.split(r"[\\/]", match.group(0))[-1], text)


def scrub_all(value: Any) -> Any:
    """``scrub`` applied to every string of a JSON value (ComfyUI's error bodies), and the
    choices of a file input left out of a ``value_not_in_list`` error."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, list):
        return [scrub_all(item) for item in value]
    if isinstance(value, dict):
        value = _hide_file_choices(value)
        return {key: scrub_all(item) for key, item in value.items() if key != "traceback"}
    return value


# A combo input whose choices are files on the server (checkpoints, LoRAs, VAEs, the input
# folder's images) would show any client what is installed and what other tenants uploaded:
# ComfyUI's "value not in list" error prints every choice. Enumerations (upscale_method) keep
# their list: it is what the workflow's author needs.
_FILE_CHOICE = re.compile(
    r"\.(safetensors|sft|ckpt|pt|pth|bin|onnx|gguf|png|jpe?g|webp|gif|bmp|tiff?)$", re.IGNORECASE
)
_CHOICE_LIST = re.compile(r" not in \[.*\]\s*$", re.DOTALL)


def _lists_files(choices: Any) -> bool:
    return isinstance(choices, list) and any(
        isinstance(choice, str) and _FILE_CHOICE.search(choice) for choice in choices
    )


def _hide_file_choices(error: dict[str, Any]) -> dict[str, Any]:
    """``error`` (one node problem) without the server's file names, if it lists them."""
    if error.get("type") != "value_not_in_list":
        return error
    extra = error.get("extra_info")
    config = extra.get("input_config") if isinstance(extra, dict) else None
    details = str(error.get("details") or "")
    listed = _CHOICE_LIST.search(details)
    printed = re.findall(r"'([^']*)'", listed.group(0)) if listed else []
    if not _lists_files(config[0] if isinstance(config, list) and config else None) and not _lists_files(
        printed
    ):
        return error
    hidden = dict(error)
    hidden["details"] = _CHOICE_LIST.sub(" is not one of the files installed on the runner", details)
    if isinstance(extra, dict):
        hidden["extra_info"] = {key: item for key, item in extra.items() if key != "input_config"}
    return hidden


def refused(response: httpx.Response, what: str, *, code: str, quote: bool = False) -> JobFailed:
    """ComfyUI answered a request with a 4xx other than a validation error: not retried, the
    upstream status and body kept for the operator (``quote`` shows the body's start to the
    client too)."""
    message = f"ComfyUI refused {what} (HTTP {response.status_code})"
    if quote:
        message += f": {response.text[:300]}"
    return JobFailed(
        message,
        code=code,
        details={"upstream_status": response.status_code, "upstream_body": response.text[:2000]},
    )
