"""FaceFusion 3.8.1's model files, and the check the runner makes of them before any job.

FaceFusion checks each model it may use against a ``.hash`` file beside it (CRC32 of the
file, ``facefusion/hash_helper.py``) and, when one is missing or does not match, tries to
download it: with a read-only models volume and internet that loop never ends, without
internet the job exits 1 after naming only the first bad file. On the runner a missing or
corrupt model is a deployment fault, not the user's, so the engine checks every file a
face-swap job needs at start (and cheaply again before each job: a file whose size and
mtime did not change keeps its verdict) and reports what is missing by name.

The table is read from FaceFusion 3.8.1's source: the ``create_static_model_set`` of
``face_swapper`` (per swapper model, plus its embedding converter) and of the modules a
``face_swapper`` job checks with FaceFusion's defaults (``content_analyser``,
``face_classifier``, ``face_detector`` yolo_face, ``face_landmarker`` 2dfan4 + fan_68_5,
``face_masker`` xseg_1 + bisenet_resnet_34, ``face_recognizer``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

__all__ = [
    "COMMON_MODEL_FILES",
    "SWAPPER_MODEL_FILES",
    "ModelCheck",
    "ModelChecker",
    "crc32_hex",
    "files_for",
]

# Checked by every face_swapper job, whichever swapper model it uses.
COMMON_MODEL_FILES: Final = (
    "nsfw_1",
    "nsfw_2",
    "nsfw_3",
    "fairface",
    "yoloface_8n",
    "2dfan4",
    "fan_68_5",
    "xseg_1",
    "bisenet_resnet_34",
    "arcface_w600k_r50",
)

# Swapper model -> its files (name without .onnx/.hash).
SWAPPER_MODEL_FILES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "blendswap_256": ("blendswap_256",),
        "ghost_1_256": ("ghost_1_256", "crossface_ghost"),
        "ghost_2_256": ("ghost_2_256", "crossface_ghost"),
        "ghost_3_256": ("ghost_3_256", "crossface_ghost"),
        "hififace_unofficial_256": ("hififace_unofficial_256", "crossface_hififace"),
        "hyperswap_1a_256": ("hyperswap_1a_256",),
        "hyperswap_1b_256": ("hyperswap_1b_256",),
        "hyperswap_1c_256": ("hyperswap_1c_256",),
        "inswapper_128": ("inswapper_128",),
        "inswapper_128_fp16": ("inswapper_128_fp16",),
        "simswap_256": ("simswap_256", "crossface_simswap"),
        "simswap_unofficial_512": ("simswap_unofficial_512", "crossface_simswap"),
        "uniface_256": ("uniface_256",),
    }
)
_CHUNK_BYTES: Final = 8 * 1024 * 1024


def files_for(swapper_model: str) -> tuple[str, ...]:
    """Every model file a job with ``swapper_model`` makes FaceFusion check."""
    return (*COMMON_MODEL_FILES, *SWAPPER_MODEL_FILES[swapper_model])


def crc32_hex(path: Path) -> str:
    """FaceFusion's ``create_hash`` of a file, read in chunks (real models are 0.1-0.5 GB)."""
    checksum = 0
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            checksum = zlib.crc32(chunk, checksum)
    return format(checksum, "08x")


@dataclasses.dataclass(frozen=True)
class ModelCheck:
    """The verdict on the files checked: which are absent, which do not match their hash."""

    missing: tuple[str, ...] = ()
    corrupt: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt

    @property
    def bad(self) -> tuple[str, ...]:
        return tuple(sorted({*self.missing, *self.corrupt}))

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing: {', '.join(self.missing)}")
        if self.corrupt:
            parts.append(f"not matching their .hash: {', '.join(self.corrupt)}")
        return "; ".join(parts)


class ModelChecker:
    """Checks model files as FaceFusion would, remembering each verdict by (size, mtime)
    of the model and its hash file, so a re-check of unchanged files costs a stat each."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._verdicts: dict[str, tuple[tuple[int, int, int, int], bool]] = {}
        self._lock = threading.Lock()

    def check(self, names: Iterable[str]) -> ModelCheck:
        missing: list[str] = []
        corrupt: list[str] = []
        for name in dict.fromkeys(names):
            model_path = self.models_dir / f"{name}.onnx"
            hash_path = self.models_dir / f"{name}.hash"
            try:
                model_stat, hash_stat = os.stat(model_path), os.stat(hash_path)
            except OSError:
                missing.append(name)
                continue
            key = (model_stat.st_size, model_stat.st_mtime_ns, hash_stat.st_size, hash_stat.st_mtime_ns)
            with self._lock:
                cached = self._verdicts.get(name)
            if cached is not None and cached[0] == key:
                valid = cached[1]
            else:
                valid = self._matches(model_path, hash_path)
                with self._lock:
                    self._verdicts[name] = (key, valid)
            if not valid:
                corrupt.append(name)
        return ModelCheck(missing=tuple(missing), corrupt=tuple(corrupt))

    @staticmethod
    def _matches(model_path: Path, hash_path: Path) -> bool:
        try:
            return crc32_hex(model_path) == hash_path.read_text(encoding="ascii", errors="replace")
        except OSError:
            return False
