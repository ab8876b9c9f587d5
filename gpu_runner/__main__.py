"""``python -m gpu_runner``: the runner's one entry point (gpu_runner.supervisor.main).

The container, ``comfyswap run`` / ``make run``, the tests and the benchmarks all start
the runner through it: the push endpoint, the ops routes, the pull loop, and the
co-located ComfyUI when COMFYUI_COMMAND is set.
"""

from __future__ import annotations

from gpu_runner.supervisor import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
