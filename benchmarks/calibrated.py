"""A benchmark-only engine of fixed, known cost.

It downloads its inputs exactly as the face-swap engines do (``FaceSwapEngineBase.prepare``:
the SSRF-safe fetcher, sniffing, image checks), then ``run`` waits a fixed time (a GPU
busy on a job: the runner's process is idle meanwhile) or burns a fixed CPU time, and
writes an output of a fixed size. Anything the runner adds around it is overhead.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from gpu_runner.engines.base import EngineOutput, EngineResult, PreparedJob, ProgressCallback
from gpu_runner.engines.faceswap import FaceSwapEngineBase
from shared.settings import Settings
from shared.tasks import Progress

__all__ = ["CalibratedEngine"]


class CalibratedEngine(FaceSwapEngineBase):
    name = "calibrated"

    def __init__(self, settings: Settings, *, cost_s: float, output: bytes, burn_cpu: bool = False) -> None:
        super().__init__(settings)
        self.cost_s = cost_s
        self.output = output
        self.burn_cpu = burn_cpu

    async def run(self, job: PreparedJob, progress: ProgressCallback, cancel: asyncio.Event) -> EngineResult:
        return await asyncio.to_thread(self._work, job.workdir, progress)

    def _work(self, workdir: Path, progress: ProgressCallback) -> EngineResult:
        progress(Progress(value=0, max=1, stage="engine"))
        if self.burn_cpu:
            deadline = time.thread_time() + self.cost_s
            while time.thread_time() < deadline:
                pass
        elif self.cost_s > 0:
            time.sleep(self.cost_s)
        output_path = workdir / "result.png"
        output_path.write_bytes(self.output)
        return EngineResult(outputs=[EngineOutput(path=output_path, content_type="image/png", kind="image")])


def load_output(path: Path | None, size: int) -> bytes:
    """The engine's output: the file at ``path``, or ``size`` bytes of a PNG-like blob."""
    if path is not None:
        return path.read_bytes()
    header = b"\x89PNG\r\n\x1a\n"
    return header + bytes(max(0, size - len(header)))
