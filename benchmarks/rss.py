"""A process's own peak memory, for the probes that measure it (stdlib only: importing
this must not move the figure it reads)."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["peak_rss_mb"]


def peak_rss_mb() -> float:
    """This process's own RSS high-water mark (VmHWM). ``ru_maxrss`` would do, but Linux
    carries it over from the parent across fork+exec, so a child of a big process reports
    the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
