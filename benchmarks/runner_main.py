"""``python -m benchmarks.runner_main``: the runner as ``python -m gpu_runner`` serves it,
with the face_swap engine chosen by the benchmark (calibrated, or the real CPU engine).

Everything else is the product: ``RunnerState`` (pull loop over ``HttpTaskSource``, the
Worker pipeline, the storage chain), ``create_app`` and uvicorn with the same options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn

from benchmarks.calibrated import CalibratedEngine, load_output
from gpu_runner.app import RunnerState, create_app
from gpu_runner.engines.base import Engine
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
    app = create_app(settings, state=state)
    uvicorn.run(
        app,
        host=settings.runner_host,
        port=settings.runner_port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )


if __name__ == "__main__":
    main()
