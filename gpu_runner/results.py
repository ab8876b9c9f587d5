"""A finished job's outputs: uploaded, described in the task's output data, and removed
again when no task will point at them (the lease was lost meanwhile)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_runner.engines.base import EngineResult
from gpu_runner.lease import HeldTask
from shared.errors import Conflict, JobCancelled
from shared.logs import get_logger, log_event
from shared.storage.base import StoredObject, result_key
from shared.store.base import TaskStore
from shared.tasks import Task

__all__ = ["Discarder", "Uploader", "complete_fenced", "discard_results", "upload_outputs"]

logger = get_logger(__name__)

Uploader = Callable[[Path, str, str], StoredObject]
# Removes a result object from every store (the storage chain's delete).
Discarder = Callable[[str], object]


async def discard_results(discard: Discarder | None, keys: list[str]) -> None:
    """Remove result objects no task will point to (best effort; the orphan sweep is the
    backstop for what cannot be removed now)."""
    if discard is None:
        return
    for key in keys:
        try:
            await asyncio.to_thread(discard, key)
        except Exception as exc:
            log_event(logger, "result_discard_failed", key=key, error=repr(exc), level=logging.WARNING)
            continue
        log_event(logger, "result_discarded", key=key)


async def upload_outputs(
    task: Task, result: EngineResult, held: HeldTask, upload: Uploader, discard: Discarder | None
) -> dict[str, Any]:
    """Upload each output and return the task's output data; a lease lost before or
    during an upload discards what was uploaded and stops with JobCancelled."""
    outputs: list[dict[str, Any]] = []
    for index, output in enumerate(result.outputs):
        if held.lease_lost:
            await discard_results(discard, [item["key"] for item in outputs])
            raise JobCancelled("lease lost before upload")
        key = result_key(task.taskId, index, output.content_type, suffix=output.path.suffix or None)
        stored = await asyncio.to_thread(upload, output.path, key, output.content_type)
        if held.lease_lost:
            # Cancelled while the upload hung: the object must not outlive the task's claim.
            await discard_results(discard, [*(item["key"] for item in outputs), stored.key])
            raise JobCancelled("lease lost during upload")
        outputs.append(
            {
                # The engine's description first: the storage fields below (its `key`
                # above all) are what the client downloads, never overwritten by it.
                **output.extra,
                "url": stored.url,
                "key": stored.key,
                "provider": stored.provider,
                "content_type": stored.content_type,
                "size": stored.size,
                "kind": output.kind,
                "node_id": output.node_id,
                "width": output.width,
                "height": output.height,
                "duration": output.duration,
                **({"storage": stored.extra} if stored.extra else {}),
            }
        )
    first = outputs[0]
    return {
        "url": first["url"],
        "urls": [item["url"] for item in outputs],
        "provider": first["provider"],
        "content_type": first["content_type"],
        "width": first["width"],
        "height": first["height"],
        "duration": first["duration"],
        "outputs": outputs,
        **({"metadata": result.metadata} if result.metadata else {}),
    }


async def complete_fenced(
    store: TaskStore,
    task_id: str,
    *,
    worker_id: str,
    output_data: dict[str, Any],
    timings: dict[str, float],
    discard: Discarder | None,
) -> Task:
    """COMPLETED, fenced by the lease; refused (cancelled or taken over while uploading),
    the uploaded objects are deleted: no task will point at them."""
    complete = functools.partial(
        store.complete, task_id, worker_id=worker_id, output_data=output_data, timings=timings
    )
    try:
        return await asyncio.to_thread(complete)
    except Conflict:
        await discard_results(discard, [item["key"] for item in output_data["outputs"]])
        raise
