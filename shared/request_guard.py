"""What every request passes before routing or authentication, on the API and the runner.

* ``normalise_path``: the path a route and an auth decision are made on. Dot segments are
  resolved (``/results/../internal/tasks/run`` is ``/internal/tasks/run``, whatever prefix
  it started with); what cannot be a route of ours (a control character such as NUL, a
  backslash, a ``%`` left after the server's one decoding, i.e. ``%252e%252e``) is a 400.
* ``parse_json``: a body or a workflow graph parsed within a nesting depth; deeper JSON
  (``[[[[…``) is a 400 naming the field, never a RecursionError (500), and never a task
  document Firestore (20 levels of maps and arrays) cannot store.

The body-size cap itself is applied by each server before it reads (the dev server's WSGI
middleware, the functions' ``dispatch_request``, the runner's ASGI middleware), against
``MAX_REQUEST_BYTES`` and with the same 413 body.
"""

from __future__ import annotations

import json
from typing import Any

from shared.errors import BadRequest, PayloadTooLarge, ValidationFailed

__all__ = ["MAX_JSON_DEPTH", "body_too_large", "check_depth", "json_depth", "normalise_path", "parse_json"]

# Deep enough for every request and ComfyUI API graph we know (a graph is 4-5 levels).
MAX_JSON_DEPTH = 32


def normalise_path(path: str) -> str:
    """The canonical form of an (already percent-decoded) request path, or BadRequest."""
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in path):
        raise BadRequest("the request path contains a control character", code="bad_path")
    if "\\" in path or "%" in path:
        raise BadRequest("the request path is encoded twice or holds a backslash", code="bad_path")
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise BadRequest("the request path climbs above the root", code="bad_path")
            segments.pop()
            continue
        segments.append(segment)
    normal = "/" + "/".join(segments)
    if segments and path.endswith(("/", "/.", "/..")):
        normal += "/"
    return normal


def body_too_large(limit: int, size: int | None = None) -> PayloadTooLarge:
    said = f"of {size} bytes " if size is not None else ""
    return PayloadTooLarge(
        f"request body {said}is over the {limit}-byte limit (MAX_REQUEST_BYTES)",
        code="body_too_large",
        details={"field": "body", "limit_bytes": limit},
    )


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of ``value`` (a scalar is 0), counting no further than ``limit + 1``;
    iterative, so no input can exhaust the interpreter's stack."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest


def parse_json(raw: bytes | str, *, field: str = "body", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` with a 400 for anything that is not JSON of at most ``max_depth`` levels."""
    if not raw:
        raise ValidationFailed(field, "a JSON object is required")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValidationFailed(field, f"JSON nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationFailed(field, f"not valid JSON: {exc}") from None
    # Each level opens a bracket: text with no more brackets than the limit (counted in C,
    # brackets inside strings included) cannot be deeper, and needs no walk (issue 15).
    if _brackets(raw) > max_depth:
        check_depth(value, field=field, max_depth=max_depth)
    return value


def _brackets(raw: bytes | str) -> int:
    if isinstance(raw, str):
        return raw.count("{") + raw.count("[")
    return raw.count(b"{") + raw.count(b"[")


def check_depth(value: Any, *, field: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    if json_depth(value, max_depth) > max_depth:
        raise ValidationFailed(field, f"JSON nested deeper than {max_depth} levels")
