"""``python -m benchmarks.runner_main``: the runner as ``python -m gpu_runner`` serves it,
with the face_swap engine chosen by the benchmark (calibrated, or the real CPU engine).

Everything else is the product: ``RunnerState`` (pull loop over ``HttpTaskSource``, the
Worker pipeline, the storage chain) served by the runner's entry point
(``gpu_runner.supervisor.serve``, the code ``python -m gpu_runner`` runs).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from benchmarks.calibrated import CalibratedEngine, load_output
from gpu_runner.app import RunnerState
from gpu_runner.engines.base import Engine
from gpu_runner.supervisor import serve
from shared.settings import get_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=["calibrated", "cpu"], default="calibrated")
    parser.add_argument("--cost-ms", type=float, default=300.0)
    parser.add_argument("--burn-cpu", action="store_true")
    parser.add_argument("--output-bytes", type=int, default=2_000_000)
    parser.add_argument("--output-file", type=Path, default=None)
    args = parser.parse_args()

    settings = get_settings()
    engine: Engine
    if args.engine == "cpu":
        from gpu_runner.engines.faceswap import CpuFaceSwapEngine

        engine = CpuFaceSwapEngine(settings)
    else:
        engine = CalibratedEngine(
            settings,
            cost_s=args.cost_ms / 1000,
            output=load_output(args.output_file, args.output_bytes),
            burn_cpu=args.burn_cpu,
        )
    state = RunnerState(settings, engines={"face_swap": engine})
    asyncio.run(serve(settings, state=state))


if __name__ == "__main__":
    main()
