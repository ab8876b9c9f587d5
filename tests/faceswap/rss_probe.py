"""Run one video swap in a fresh process and report its memory as JSON on stdout.

Used by test_memory.py: peak RSS (``ru_maxrss``) is a per-process high-water mark, so each
measurement needs its own process.
Usage: python -m tests.faceswap.rss_probe TARGET.mp4 OUTPUT.mp4
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import psutil

from gpu_runner.engines.cpu_swap import FaceSwapper

from .media import grace_hopper_bgr


def main(target_path: Path, output_path: Path) -> None:
    swapper = FaceSwapper()
    source = swapper.prepare_source(grace_hopper_bgr())
    baseline_bytes = psutil.Process().memory_info().rss
    info = swapper.swap_video(source, target_path, output_path)
    peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    report = {"frames": info.frames, "baseline_mib": baseline_bytes / 2**20, "peak_mib": peak_bytes / 2**20}
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
