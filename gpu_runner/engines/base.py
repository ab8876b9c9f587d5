"""The engine interface: everything that turns a task's inputs into output files.

A job has two phases so the worker can pipeline them:

* ``prepare`` (I/O, outside the engine slot): download and check the inputs.
* ``run`` (inside an engine slot): do the GPU/CPU work, report progress, honour cancel.

Uploading the outputs is the worker's business, after the slot is released.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.tasks import Progress, Task

__all__ = ["Engine", "EngineOutput", "EngineResult", "PreparedJob", "ProgressCallback"]

ProgressCallback = Callable[[Progress], None]


@dataclasses.dataclass
class PreparedJob:
    task: Task
    workdir: Path
    inputs: dict[str, Path] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EngineOutput:
    path: Path
    content_type: str
    kind: str = "image"  # image | video | text | file
    node_id: str | None = None
    width: int | None = None
    height: int | None = None
    duration: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EngineResult:
    outputs: list[EngineOutput]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class Engine(abc.ABC):
    """One kind of work (ComfyUI workflows, face swaps). Raise shared.errors types:
    JobFailed for a job that cannot succeed, TransientError for one worth retrying."""

    name: str = "engine"

    @abc.abstractmethod
    async def prepare(self, task: Task, workdir: Path) -> PreparedJob:
        """Fetch and check the inputs into ``workdir``."""

    @abc.abstractmethod
    async def run(self, job: PreparedJob, progress: ProgressCallback, cancel: asyncio.Event) -> EngineResult:
        """Produce the outputs under ``job.workdir``; stop early when ``cancel`` is set."""

    async def health(self) -> dict[str, Any]:
        return {"status": "available"}

    @property
    def accepting_work(self) -> bool:
        """False while every job would fail for a deployment fault (its model files are
        missing, say): the worker claims none of this engine's work until it is True."""
        return True

    async def start(self) -> None:  # noqa: B027  # optional hook
        """Load models, connect: called once when the runner starts."""

    async def close(self) -> None:  # noqa: B027  # optional hook
        """Release resources at shutdown."""
