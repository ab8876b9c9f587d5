"""A finished job's outputs: uploaded, described in the task's output data, written as
COMPLETED (fenced by the lease), and removed again when no task will point at them (the
lease was lost meanwhile).

The whole end of a job is one function run in one worker thread (``finish_job``): the
uploads, the COMPLETED write and the removal of the job's work folder are all blocking
I/O, and each thread hop costs the event loop a future, a wake-up and a hand-back, which
on a short ComfyUI job was a fair part of the runner's CPU. Lease loss is still checked
before and after each upload (the lease keeper sets ``held.lease_lost`` from the loop)."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
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

__all__ = ["Discarder", "Uploader", "discard_results", "finish_job", "rounded", "upload_outputs"]

logger = get_logger(__name__)

Uploader = Callable[[Path, str, str], StoredObject]
# Removes a result object from every store (the storage chain's delete).
Discarder = Callable[[str], object]


def discard_results(discard: Discarder | None, keys: list[str]) -> None:
    """Remove result objects no task will point to (best effort; the orphan sweep is the
    backstop for what cannot be removed now)."""
    if discard is None:
        return
    for key in keys:
        try:
            discard(key)
        except Exception as exc:
            log_event(logger, "result_discard_failed", key=key, error=repr(exc), level=logging.WARNING)
            continue
        log_event(logger, "result_discarded", key=key)


def upload_outputs(
    task: Task, result: EngineResult, held: HeldTask, upload: Uploader, discard: Discarder | None
) -> dict[str, Any]:
    """Upload each output and return the task's output data; a lease lost before or
    during an upload discards what was uploaded and stops with JobCancelled. Blocking:
    called in a worker thread."""
    outputs: list[dict[str, Any]] = []
    for index, output in enumerate(result.outputs):
        if held.lease_lost:
            discard_results(discard, [item["key"] for item in outputs])
            raise JobCancelled("lease lost before upload")
        key = result_key(task.taskId, index, output.content_type, suffix=output.path.suffix or None)
        stored = upload(output.path, key, output.content_type)
        if held.lease_lost:
            # Cancelled while the upload hung: the object must not outlive the task's claim.
            discard_results(discard, [*(item["key"] for item in outputs), stored.key])
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


def finish_job(
    store: TaskStore,
    task: Task,
    result: EngineResult,
    held: HeldTask,
    *,
    upload: Uploader,
    discard: Discarder | None,
    worker_id: str,
    timings: dict[str, float],
    started: float,
    engine_started_at: dt.datetime,
    workdir: Path,
) -> Task:
    """Upload the outputs, then write COMPLETED fenced by the lease (refused: cancelled or
    taken over while uploading, the uploaded objects are deleted, no task will point at
    them), then remove the job's work folder, whatever happened. Blocking: one thread hop.

    ``timings`` gets ``upload_s`` and ``runner_total_s`` (``started`` is the job's
    perf_counter start) before they are written with the task; ``engine_started_at``
    becomes its ``started_at`` when no PROCESSING write set it (a short job)."""
    try:
        phase = time.perf_counter()
        output_data = upload_outputs(task, result, held, upload, discard)
        timings["upload_s"] = time.perf_counter() - phase
        timings["runner_total_s"] = time.perf_counter() - started
        held.finishing = True
        try:
            return store.complete(
                task.taskId,
                worker_id=worker_id,
                output_data=output_data,
                timings=rounded(timings),
                started_at=engine_started_at,
            )
        except Conflict:
            discard_results(discard, [item["key"] for item in output_data["outputs"]])
            raise
    finally:
        # A video job leaves thousands of frames: removed here, off the event loop.
        shutil.rmtree(workdir, ignore_errors=True)


def rounded(timings: dict[str, float]) -> dict[str, float]:
    """Timings as a task stores them: seconds to the microsecond."""
    return {key: round(value, 6) for key, value in timings.items()}
