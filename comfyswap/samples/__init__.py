"""Two public-domain face photos shipped with the project (see NOTICE beside them).

The demo (``comfyswap demo``), the benchmarks and the tests read them from here, so none
of them needs a plotting or image-processing library at run time just for a picture.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASTRONAUT_PNG", "GRACE_HOPPER_JPG", "SAMPLES_DIR"]

SAMPLES_DIR = Path(__file__).resolve().parent
GRACE_HOPPER_JPG = SAMPLES_DIR / "grace_hopper.jpg"
"""Rear Admiral Grace Hopper, 512x600 JPEG: the face to paste (the source)."""
ASTRONAUT_PNG = SAMPLES_DIR / "astronaut.png"
"""Astronaut Eileen Collins, 512x512 PNG: the photo to paste into (the target)."""
