"""Issue 13, finding 9: any exception while recording a failure still records a failure.

A raw workflow nested 252 deep left its task PROCESSING until the lease expired: storing
the engine's error (which carried the graph) failed, and the real error was lost. Here the
engine fails with an error whose details the store cannot serialise (nested deeper than
json can write); the task must still end FAILED, now, with the engine's code and message.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from gpu_runner.engines.base import EngineResult, PreparedJob, ProgressCallback
from gpu_runner.worker import Worker
from shared.errors import JobFailed
from shared.tasks import TaskStatus
from tests.worker.conftest import SteeredEngine, face_swap_task


def nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


class UnstorableFailure(SteeredEngine):
    async def run(self, job: PreparedJob, progress: ProgressCallback, cancel: asyncio.Event) -> EngineResult:
        raise JobFailed(
            "prompt_outputs_failed_validation: node 7 has no input 'images'",
            code="comfyui_validation_failed",
            details={"node_errors": nested(5000)},
        )


def test_an_error_the_store_cannot_hold_still_ends_the_task_failed(settings, store, results, tmp_path: Path):
    worker = Worker(settings, store, {"face_swap": UnstorableFailure()}, results.upload_file)
    task = store.create(face_swap_task())

    code, body = asyncio.run(asyncio.wait_for(worker.run_pushed(task.taskId), timeout=30))

    final = store.get_or_raise(task.taskId)
    assert final.status == TaskStatus.FAILED, final
    assert final.error is not None
    assert final.error.code == "comfyui_validation_failed"
    assert "node 7 has no input 'images'" in final.error.message
    assert final.lease is None
    assert (code, body["status"]) == (200, "FAILED")
