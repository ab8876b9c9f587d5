"""A runner whose FaceFusion models are missing claims no face swap until they are back.

The real worker's pull loop, the real SQLite task store and the FaceFusion engine (over
the stand-in CLI): while the model files fail their check the task stays PENDING and no
attempt is spent; once the files are in place the same loop claims it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gpu_runner.engines.facefusion import FaceFusionEngine
from gpu_runner.worker import StoreTaskSource, Worker
from shared.safe_fetch import SafeFetcher
from shared.settings import Settings
from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import TaskStatus

from .conftest import face_swap_task, write_model_files

pytestmark = pytest.mark.timeout(60)


def test_the_worker_claims_no_face_swap_while_models_are_missing(
    tmp_path: Path, fetcher: SafeFetcher, fake_cli_command: str, source_url: str, target_image_url: str
) -> None:
    models = write_model_files(tmp_path / "models")
    (models / "arcface_w600k_r50.onnx").unlink()
    settings = Settings(
        data_dir=tmp_path / "data",
        facefusion_command=fake_cli_command,
        facefusion_models_dir=str(models),
        facefusion_execution_providers="cuda",
        facefusion_warm=False,
    )
    store = SQLiteTaskStore(tmp_path / "tasks.db")
    task = store.create(face_swap_task(source_url=source_url, target_url=target_image_url))
    engine = FaceFusionEngine(settings, fetcher)
    worker = Worker(
        settings,
        store,
        {"face_swap": engine},
        lambda path, key, content_type: pytest.fail("nothing may be uploaded"),
        source=StoreTaskSource(store, settings),
    )

    async def scenario() -> tuple[TaskStatus, int, TaskStatus]:
        await engine.start()
        loop_task = asyncio.create_task(worker.run_pull_loop(wait_s=0.5))
        await asyncio.sleep(2.0)  # several turns of the loop: it must not claim meanwhile
        while_missing = store.get_or_raise(task.taskId)
        write_model_files(models, ["arcface_w600k_r50"])
        deadline = time.monotonic() + 30
        after = store.get_or_raise(task.taskId)
        while after.status == TaskStatus.PENDING and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            after = store.get_or_raise(task.taskId)
        await worker.drain(grace_s=0.1)
        loop_task.cancel()
        return while_missing.status, while_missing.attempts, after.status

    status_while_missing, attempts_while_missing, status_after = asyncio.run(scenario())

    assert status_while_missing == TaskStatus.PENDING
    assert attempts_while_missing == 0
    assert status_after != TaskStatus.PENDING
