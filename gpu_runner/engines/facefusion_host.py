"""A warm FaceFusion: this script runs inside FaceFusion's own venv and keeps FaceFusion
imported and its models loaded while the runner feeds it jobs over a pipe.

Started by the engine (facefusion_warm.py) as ``FACEFUSION_PYTHON facefusion_host.py --root
FACEFUSION_DIR``; it imports only the standard library and FaceFusion (3.8.1), never the
runner's packages, which FaceFusion's venv does not have.

Protocol: one JSON object per line. The host writes ``{"event": "ready"}`` on its original
stdout once FaceFusion is imported and the default models are loaded, then for each job
line ``{"argv": [...]}`` on stdin (``headless-run`` and its arguments, exactly as the
per-job command line gets them) it runs FaceFusion's own ``headless-run`` code
(``core.process_headless``) and answers ``{"exit_code": N, "face_error": ..., "rss_mb": M,
"seconds": S}``. FaceFusion's logs and tqdm bars go to stderr, as from ``headless-run``, and
the engine parses them the same way; anything FaceFusion prints to stdout is sent to
stderr too, so the protocol channel carries only the host's lines.

What the host adds to ``headless-run``:

* models stay loaded between jobs (the engine passes ``--video-memory-strategy
  tolerant``; FaceFusion's default ``strict`` drops every session after each job), and a
  model file's CRC32 check is remembered while its size and mtime do not change
  (FaceFusion re-reads every model file before every job);
* the target's faces are checked as the CPU engine checks them: a face index past the
  last face is refused before the swap, and a job in which no frame had a face to swap
  fails instead of returning the target unchanged (``face_error``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

# FaceFusion's ErrorCode for a failed conditional process (its pre-process uses 2).
_FACE_CHECK_FAILED = 3


_PATH_OPTIONS = frozenset(
    {"--source-paths", "-s", "--target-path", "-t", "--output-path", "-o", "--jobs-path", "--temp-path"}
)
_PROGRAMS: dict[tuple[str, ...], Any] = {}


def _is_path_value(argv: list[str], index: int) -> bool:
    """Whether ``argv[index]`` is the value of a path option (the same parser serves any)."""
    for back in range(index - 1, -1, -1):
        if argv[back].startswith("-"):
            return argv[back] in _PATH_OPTIONS
    return False


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return round(resident_pages * os.sysconf("SC_PAGE_SIZE") / 1024 / 1024, 1)


class Host:
    """FaceFusion in this process, with the face checks and the hash memo installed."""

    def __init__(self, protocol: TextIO) -> None:
        self.protocol = protocol
        self.face_error: dict[str, Any] | None = None
        self.frames_with_faces = 0
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        self.protocol.write(json.dumps(message) + "\n")
        self.protocol.flush()

    def install(self) -> None:
        from facefusion import core, download, hash_helper, program
        from facefusion.processors.modules.face_swapper import core as face_swapper

        # Building the parser asks ffmpeg for its encoders seven times (`ffmpeg -encoders`,
        # seconds in all): the answer cannot change while this process lives.
        program.get_available_encoder_set = functools.cache(program.get_available_encoder_set)

        validate_hash = hash_helper.validate_hash
        verdicts: dict[str, tuple[tuple[int, int], bool]] = {}

        def remembered_validate_hash(validate_path: str) -> bool:
            try:
                stat = os.stat(validate_path)
            except OSError:
                return False
            key = (stat.st_size, stat.st_mtime_ns)
            cached = verdicts.get(validate_path)
            if cached is None or cached[0] != key:
                cached = (key, bool(validate_hash(validate_path)))
                verdicts[validate_path] = cached
            return cached[1]

        download.validate_hash = remembered_validate_hash

        select_faces = face_swapper.select_faces

        def counting_select_faces(*args: Any, **kwargs: Any) -> Any:
            faces = select_faces(*args, **kwargs)
            if faces:
                with self._lock:
                    self.frames_with_faces += 1
            return faces

        face_swapper.select_faces = counting_select_faces

        conditional_process = core.conditional_process

        def checked_conditional_process() -> int:
            self.frames_with_faces = 0
            self.face_error = self._check_reference_face()
            if self.face_error is not None:
                return _FACE_CHECK_FAILED
            error_code = int(conditional_process())
            if error_code == 0 and self.frames_with_faces == 0:
                self.face_error = {"code": "no_face_in_target", "message": "no face was found in the target"}
                return _FACE_CHECK_FAILED
            return error_code

        core.conditional_process = checked_conditional_process

    @staticmethod
    def _check_reference_face() -> dict[str, Any] | None:
        """A face index (``reference`` mode) past the last face of the reference frame."""
        from facefusion import state_manager
        from facefusion.face_creator import get_static_faces
        from facefusion.face_selector import sort_faces_by_order
        from facefusion.filesystem import is_video
        from facefusion.vision import read_static_image, read_static_video_frame

        if state_manager.get_item("face_selector_mode") != "reference":
            return None
        target_path = state_manager.get_item("target_path")
        if is_video(target_path):
            frame = read_static_video_frame(target_path, state_manager.get_item("reference_frame_number"))
        else:
            frame = read_static_image(target_path)
        faces = sort_faces_by_order(get_static_faces([frame]), state_manager.get_item("face_selector_order"))
        position = int(state_manager.get_item("reference_face_position"))
        if position < len(faces or []):
            return None
        found = len(faces or [])
        return {
            "code": "no_face_in_target",
            "message": f"face {position} was requested but the target has {found} face(s) (0 is the largest)",
            "faces_found": found,
        }

    def warm_up(self, argv: list[str]) -> None:
        """Parse a job's arguments and load every model that job uses, without running it."""
        from facefusion import (
            content_analyser,
            face_classifier,
            face_detector,
            face_landmarker,
            face_recognizer,
        )
        from facefusion.processors.core import get_processors_modules

        if self._apply(argv)[0] != 0:
            raise RuntimeError("the warm-up arguments were refused")
        for module in (content_analyser, face_classifier, face_detector, face_landmarker, face_recognizer):
            module.get_inference_pool()
        from facefusion import state_manager

        for processor in get_processors_modules(state_manager.get_item("processors")):
            processor.get_inference_pool()

    @staticmethod
    def _apply(argv: list[str]) -> tuple[int, dict[str, Any]]:
        from facefusion import logger, state_manager
        from facefusion.args import apply_args
        from facefusion.program import create_program
        from facefusion.program_helper import validate_args

        # FaceFusion's processors read sys.argv while building the parser (the pixel boost
        # choices depend on --face-swapper-model), as in `facefusion.py headless-run`; a
        # parser is kept per set of options (paths aside), which fixes every choice list.
        sys.argv = ["facefusion.py", *argv]
        shape = tuple(part for index, part in enumerate(argv) if not _is_path_value(argv, index))
        program = _PROGRAMS.get(shape)
        if program is None:
            program = create_program()
            if not validate_args(program):
                return 2, {}
            _PROGRAMS[shape] = program
        try:
            arguments = vars(program.parse_args(argv))
        except SystemExit as exit_:  # argparse printed why to stderr, as headless-run does
            return int(exit_.code or 0), {}
        apply_args(arguments, state_manager.init_item)
        logger.init(state_manager.get_item("log_level"))
        return 0, arguments

    def run(self, argv: list[str]) -> dict[str, Any]:
        from facefusion import core, state_manager
        from facefusion.jobs import job_manager

        started = time.monotonic()
        self.face_error = None
        exit_code, arguments = self._apply(argv)
        if exit_code == 0:
            if job_manager.init_jobs(state_manager.get_item("jobs_path")):
                exit_code = int(core.process_headless(arguments))
            else:
                exit_code = 1
        return {
            "exit_code": exit_code,
            "face_error": self.face_error,
            "rss_mb": _rss_mb(),
            "seconds": round(time.monotonic() - started, 3),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description="A warm FaceFusion fed jobs over stdin.")
    parser.add_argument("--root", required=True, type=Path, help="FaceFusion's folder (facefusion.py)")
    parser.add_argument("--warm-up", default="", help="JSON list: a job's arguments whose models to load")
    options = parser.parse_args()
    # The protocol keeps the original stdout; FaceFusion's own prints go to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    os.chdir(options.root)
    # Python put this script's folder first on the path, and it holds the runner's own
    # facefusion.py: FaceFusion's folder must be the one `import facefusion` finds.
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(options.root), *(entry for entry in sys.path if Path(entry or ".").resolve() != here)]
    host = Host(protocol)
    from facefusion import core

    if not core.pre_check():  # python version, ffmpeg, ffprobe, curl: as headless-run
        host.send({"event": "failed", "reason": "FaceFusion's pre-check failed (ffmpeg, ffprobe or curl)"})
        return 2
    host.install()
    if options.warm_up:
        host.warm_up(json.loads(options.warm_up))
    host.send({"event": "ready", "rss_mb": _rss_mb()})
    for line in sys.stdin:
        if line.strip():
            host.send(host.run(json.loads(line)["argv"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
