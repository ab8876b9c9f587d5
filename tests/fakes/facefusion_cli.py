#!/usr/bin/env python3
"""A stand-in for FaceFusion 3.8.1's command line (``facefusion.py headless-run``), for tests.

The fast unit tier runs against this script; the real-peer tier (tests/peers) runs the
real FaceFusion 3.8.1 with stand-in weights. This script behaves as 3.8.1's CLI does, as
read from its source (program.py, choices.py, ffmpeg.py, download.py):

* the same ``headless-run`` options with the same choices, parsed by argparse, so an
  unknown processor, model, pixel boost (per model), encoder or option is a usage error
  with exit code 2, as in FaceFusion;
* the face swapper's pre-process checks (a source image, a target image or video by
  extension, an output with the target's extension) fail the job with exit code 1, as
  ``headless-run`` reports a failed job;
* log lines ``[FACEFUSION.MODULE] message`` and tqdm bars (``processing:  40%|====  |
  4/10 [...]``, redrawn with carriage returns) on stderr; 3.8.1 draws ``analysing`` and
  ``processing`` for a video, no bar for an image;
* its audio defaults: the encoder is the first ffmpeg offers (``flac``), which MP4 and
  MOV cannot hold, so the audio is then dropped ("restoring audio skipped", exit 0);
* an output file: for an image, the target with the source pasted over its centre (a
  visible change, made with PIL); for a video, every frame so changed, re-encoded with
  PyAV at the requested fps and quality, with the target's audio copied.

Knobs (environment variables, inherited through the engine):

* ``FAKE_FACEFUSION_RECORD``: write ``{"argv", "cwd", "pid", "tmpdir", "child_pid"}`` as
  JSON there (tests assert the argument mapping and look for leftover processes);
* ``FAKE_FACEFUSION_FAIL``: ``precheck`` (exit 2: ffmpeg missing), ``midway`` (exit 1
  after half the frames), ``no_source_face`` (exit 1), ``no_output`` (exit 0, no file),
  ``hash`` (exit 1 after "validating hash for nsfw_1 failed", as with a missing model);
* ``FAKE_FACEFUSION_SLEEP_S``: once processing starts, start a child process (as
  FaceFusion starts ffmpeg), record its PID, and sleep this long (timeouts, cancel);
* ``FAKE_FACEFUSION_FRAME_DELAY_S``: seconds per frame.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

PROCESSORS = (
    "age_modifier",
    "background_remover",
    "deep_swapper",
    "expression_restorer",
    "face_debugger",
    "face_editor",
    "face_enhancer",
    "face_swapper",
    "frame_colorizer",
    "frame_enhancer",
    "lip_syncer",
)
PIXEL_BOOSTS = {
    "blendswap_256": ("256x256", "384x384", "512x512", "768x768", "1024x1024"),
    "ghost_1_256": ("256x256", "512x512", "768x768", "1024x1024"),
    "ghost_2_256": ("256x256", "512x512", "768x768", "1024x1024"),
    "ghost_3_256": ("256x256", "512x512", "768x768", "1024x1024"),
    "hififace_unofficial_256": ("256x256", "512x512", "768x768", "1024x1024"),
    "hyperswap_1a_256": ("256x256", "512x512", "768x768", "1024x1024"),
    "hyperswap_1b_256": ("256x256", "512x512", "768x768", "1024x1024"),
    "hyperswap_1c_256": ("256x256", "512x512", "768x768", "1024x1024"),
    "inswapper_128": ("128x128", "256x256", "384x384", "512x512", "768x768", "1024x1024"),
    "inswapper_128_fp16": ("128x128", "256x256", "384x384", "512x512", "768x768", "1024x1024"),
    "simswap_256": ("256x256", "512x512", "768x768", "1024x1024"),
    "simswap_unofficial_512": ("512x512", "768x768", "1024x1024"),
    "uniface_256": ("256x256", "512x512", "768x768", "1024x1024"),
}
# 3.8.1 offers only the providers onnxruntime has; the GPU image has these.
EXECUTION_PROVIDERS = ("cuda", "tensorrt", "cpu")
VIDEO_ENCODERS = (
    "libx264",
    "libx264rgb",
    "libx265",
    "libvpx-vp9",
    "h264_nvenc",
    "hevc_nvenc",
    "h264_amf",
    "hevc_amf",
    "h264_qsv",
    "hevc_qsv",
    "h264_videotoolbox",
    "hevc_videotoolbox",
    "rawvideo",
)
AUDIO_ENCODERS = ("flac", "aac", "libmp3lame", "libopus", "libvorbis", "pcm_s16le", "pcm_s32le")
# Containers that cannot hold FLAC: ffmpeg refuses, FaceFusion skips the audio.
NO_FLAC = {".mp4", ".m4v", ".mov"}
SCALES = tuple(step / 4 for step in range(1, 33))
IMAGE_FORMATS = {".bmp", ".jpeg", ".jpg", ".png", ".tiff", ".tif", ".webp"}
VIDEO_FORMATS = {".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".mxf", ".webm", ".wmv"}
QUALITY_RANGE = range(0, 101)


def log(module: str, message: str) -> None:
    """FaceFusion's logger: ``[FIRST.LAST] message`` on stderr."""
    sys.stderr.write(f"[FACEFUSION.{module.upper()}] {message}\n")
    sys.stderr.flush()


class Bar:
    """tqdm's default bar with ``ascii=' ='`` and 10 columns, as FaceFusion draws it off a tty."""

    def __init__(self, stage: str, total: int, providers: list[str]) -> None:
        self.stage, self.total, self.providers = stage, total, providers
        self.done = 0
        self.started = time.monotonic()
        self._draw()

    def update(self) -> None:
        self.done += 1
        self._draw()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()

    def _draw(self) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - self.done) / rate if rate else 0.0
        filled = self.done * 10 // max(self.total, 1)
        bar = "=" * filled + " " * (10 - filled)
        percent = 100 * self.done / max(self.total, 1)
        sys.stderr.write(
            f"\r{self.stage}: {percent:3.0f}%|{bar}| {self.done}/{self.total} "
            f"[{_clock(elapsed)}<{_clock(remaining)}, {rate:5.2f}frame/s, "
            f"execution_providers={self.providers!r}]"
        )
        sys.stderr.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


def record(path: str | None, **fields: Any) -> None:
    """Merge ``fields`` into the JSON record, atomically (tests poll it)."""
    if not path:
        return
    target = Path(path)
    data = json.loads(target.read_text()) if target.exists() else {}
    data.update(fields)
    partial = target.with_suffix(".part")
    partial.write_text(json.dumps(data))
    partial.replace(target)


def build_parser() -> argparse.ArgumentParser:
    program = argparse.ArgumentParser(prog="facefusion.py")
    commands = program.add_subparsers(dest="command", required=True)
    run = commands.add_parser("headless-run")
    run.add_argument("--config-path", default="facefusion.ini")
    run.add_argument("--temp-path")
    run.add_argument("-j", "--jobs-path", default=".jobs")
    run.add_argument("-s", "--source-paths", nargs="+")
    run.add_argument("-t", "--target-path")
    run.add_argument("-o", "--output-path")
    run.add_argument(
        "--processors", nargs="+", choices=PROCESSORS, default=["face_swapper"], metavar="PROCESSORS"
    )
    run.add_argument("--face-swapper-model", choices=tuple(PIXEL_BOOSTS), default="hyperswap_1a_256")
    run.add_argument("--face-swapper-pixel-boost")
    run.add_argument("--face-selector-mode", choices=("many", "one", "reference"), default="reference")
    run.add_argument(
        "--face-selector-order",
        choices=(
            "left-right",
            "right-left",
            "top-bottom",
            "bottom-top",
            "small-large",
            "large-small",
            "best-worst",
            "worst-best",
        ),
        default="large-small",
    )
    run.add_argument("--reference-face-position", type=int, default=0)
    run.add_argument("--reference-face-distance", type=float, default=0.3)
    run.add_argument("--reference-frame-number", type=int, default=0)
    run.add_argument("--trim-frame-start", type=int)
    run.add_argument("--trim-frame-end", type=int)
    run.add_argument(
        "--output-image-quality", type=int, choices=QUALITY_RANGE, default=80, metavar="[0..100]"
    )
    run.add_argument("--output-image-scale", type=float, choices=SCALES, default=1.0)
    run.add_argument("--output-audio-encoder", choices=AUDIO_ENCODERS, default="flac")
    run.add_argument("--output-video-encoder", choices=VIDEO_ENCODERS, default="libx264")
    run.add_argument("--output-video-scale", type=float, choices=SCALES, default=1.0)
    run.add_argument(
        "--output-video-quality", type=int, choices=QUALITY_RANGE, default=80, metavar="[0..100]"
    )
    run.add_argument("--output-video-fps", type=float)
    run.add_argument(
        "--execution-providers", nargs="+", choices=EXECUTION_PROVIDERS, default=["cpu"], metavar="PROVIDERS"
    )
    run.add_argument("--execution-thread-count", type=int, default=8)
    run.add_argument("--log-level", choices=("error", "warn", "info", "debug"), default="info")
    return program


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    program = build_parser()
    arguments = program.parse_args(argv)
    # FaceFusion offers only the chosen model's pixel boosts as choices.
    boosts = PIXEL_BOOSTS[arguments.face_swapper_model]
    if arguments.face_swapper_pixel_boost is None:
        arguments.face_swapper_pixel_boost = boosts[0]
    elif arguments.face_swapper_pixel_boost not in boosts:
        program.error(
            f"argument --face-swapper-pixel-boost: invalid choice: {arguments.face_swapper_pixel_boost!r} "
            f"(choose from {', '.join(boosts)})"
        )
    return arguments


def pre_process(arguments: argparse.Namespace) -> bool:
    """The face swapper's pre-process checks, with FaceFusion's messages."""
    sources = [Path(path) for path in arguments.source_paths or []]
    if not any(path.is_file() and path.suffix.lower() in IMAGE_FORMATS for path in sources):
        log("face_swapper", "choose an image for the source!")
        return False
    target = Path(arguments.target_path or "")
    if not target.is_file() or target.suffix.lower() not in IMAGE_FORMATS | VIDEO_FORMATS:
        log("face_swapper", "choose an image or video for the target!")
        return False
    output = Path(arguments.output_path or "")
    if not arguments.output_path or not output.parent.is_dir():
        log("face_swapper", "specify the output image or video within a directory!")
        return False
    if output.suffix.lower() != target.suffix.lower():
        log("face_swapper", "match the target and output extension!")
        return False
    if os.environ.get("FAKE_FACEFUSION_FAIL") == "no_source_face":
        log("face_swapper", "no source face detected!")
        return False
    return True


def start_child(record_path: str | None) -> subprocess.Popen[bytes]:
    """A long-lived child in our process group, as FaceFusion's ffmpeg would be."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    record(record_path, child_pid=child.pid)
    return child


def swap_image(arguments: argparse.Namespace) -> int:
    from PIL import Image, ImageDraw

    source = Path(arguments.source_paths[0])
    with Image.open(arguments.target_path) as opened:
        target = opened.convert("RGB")
    log("to_image", f"copying image with a resolution of {target.width}x{target.height}")
    log("face_swapper", "processing")
    sleep_in_processing(arguments)
    if os.environ.get("FAKE_FACEFUSION_FAIL") == "midway":
        log("to_image", "processing to image failed")
        return 1
    changed = paste_source(target, source, ImageDraw)
    if os.environ.get("FAKE_FACEFUSION_FAIL") != "no_output":
        options: dict[str, Any] = {}
        if Path(arguments.output_path).suffix.lower() in {".jpg", ".jpeg", ".webp"}:
            options["quality"] = arguments.output_image_quality
        changed.save(arguments.output_path, **options)
    log("to_image", f"finalizing image with a resolution of {target.width}x{target.height}")
    log("to_image", "processing to image succeeded in 0.10 seconds")
    return 0


@functools.cache
def source_patch(source: Path, side: int) -> Any:
    from PIL import Image

    with Image.open(source) as opened:
        return opened.convert("RGB").resize((side, side))


def paste_source(target: Any, source: Path, draw_module: Any) -> Any:
    """The target with the source's face pasted over its centre and a red frame round it."""
    side = max(16, min(target.width, target.height) // 3)
    patch = source_patch(source, side)
    changed = target.copy()
    left, top = (target.width - side) // 2, (target.height - side) // 2
    changed.paste(patch, (left, top))
    draw_module.Draw(changed).rectangle(
        (left, top, left + side - 1, top + side - 1), outline=(255, 0, 0), width=3
    )
    return changed


def sleep_in_processing(arguments: argparse.Namespace) -> None:
    sleep_s = float(os.environ.get("FAKE_FACEFUSION_SLEEP_S", "0"))
    if sleep_s > 0:
        start_child(os.environ.get("FAKE_FACEFUSION_RECORD"))
        time.sleep(sleep_s)


def swap_video(arguments: argparse.Namespace) -> int:
    import av
    from PIL import ImageDraw

    frame_delay_s = float(os.environ.get("FAKE_FACEFUSION_FRAME_DELAY_S", "0"))
    source = Path(arguments.source_paths[0])
    with av.open(arguments.target_path) as probe:
        in_video = probe.streams.video[0]
        total = in_video.frames or sum(1 for _ in probe.decode(in_video))
        fps = (
            Fraction(arguments.output_video_fps).limit_denominator(1001)
            if arguments.output_video_fps
            else None
        )
        fps = fps or in_video.average_rate or Fraction(25)
    analysing = Bar("analysing", total, arguments.execution_providers)
    for _ in range(total):
        analysing.update()
    analysing.close()
    fail_at = total // 2 if os.environ.get("FAKE_FACEFUSION_FAIL") == "midway" else None
    crf = round(51 - arguments.output_video_quality * 0.51)
    processing = Bar("processing", total, arguments.execution_providers)
    with (
        av.open(arguments.target_path) as container,
        av.open(arguments.output_path, mode="w") as output,
    ):
        in_video = container.streams.video[0]
        in_audio = container.streams.audio[0] if container.streams.audio else None
        scale = arguments.output_video_scale
        width = int(in_video.codec_context.width * scale) // 2 * 2
        height = int(in_video.codec_context.height * scale) // 2 * 2
        out_video = output.add_stream(arguments.output_video_encoder, rate=fps, options={"crf": str(crf)})
        out_video.width, out_video.height, out_video.pix_fmt = width, height, "yuv420p"
        keep_audio = not (
            arguments.output_audio_encoder == "flac" and Path(arguments.output_path).suffix in NO_FLAC
        )
        out_audio = output.add_stream_from_template(in_audio) if in_audio is not None and keep_audio else None
        streams = [in_video] + ([in_audio] if in_audio is not None else [])
        index = 0
        for packet in container.demux(*streams):
            if packet.stream is in_audio:
                if packet.dts is not None and out_audio is not None:
                    packet.stream = out_audio
                    output.mux(packet)
                continue
            for frame in packet.decode():
                if index == fail_at:
                    processing.close()
                    log("to_video", "processing to video failed")
                    return 1
                if index == 0:
                    sleep_in_processing(arguments)
                image = paste_source(frame.to_image().resize((width, height)), source, ImageDraw)
                new_frame = av.VideoFrame.from_image(image)
                new_frame.pts = index
                new_frame.time_base = 1 / Fraction(fps)
                output.mux(out_video.encode(new_frame))
                index += 1
                processing.update()
                if frame_delay_s:
                    time.sleep(frame_delay_s)
        output.mux(out_video.encode(None))
    processing.close()
    if in_audio is not None and out_audio is None:
        log("to_video", "restoring audio skipped")
    if os.environ.get("FAKE_FACEFUSION_FAIL") == "no_output":
        Path(arguments.output_path).unlink()
    log("to_video", "processing to video succeeded in 0.50 seconds")
    return 0


def main(argv: list[str]) -> int:
    record_path = os.environ.get("FAKE_FACEFUSION_RECORD")
    record(
        record_path,
        argv=argv,
        cwd=os.getcwd(),
        pid=os.getpid(),
        tmpdir=os.environ.get("TMPDIR"),
    )
    arguments = parse_arguments(argv)
    if os.environ.get("FAKE_FACEFUSION_FAIL") == "precheck":
        log("core", "ffmpeg is not installed")
        return 2
    log("core", "processing step 1 of 1")
    if os.environ.get("FAKE_FACEFUSION_FAIL") == "hash":
        log("download", "validating hash for nsfw_1 failed")
        return 1
    if not pre_process(arguments):
        return 1
    if Path(arguments.target_path).suffix.lower() in VIDEO_FORMATS:
        return swap_video(arguments)
    return swap_image(arguments)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
