"""Face swap over a video, streaming: decode a frame, swap, encode, forget it.

* Memory stays flat whatever the length: nothing keeps frames; only the codecs' own
  look-ahead buffers (x264 ``veryfast``: 10 frames) hold any.
* Timing is the input's: every output frame takes its input frame's pts in the input
  stream's time base, and the stream's average rate is kept, so the frame count, fps
  and any variable frame rate survive.
* Audio: AAC is copied packet for packet (no generation loss); any other codec is
  decoded and re-encoded to AAC, which every MP4 player can play.
* Output: H.264 (libx264, yuv420p, CRF 18), even dimensions, MP4 with ``+faststart``
  (index first, so browsers can start playing before the download ends). It is written
  to a ``.partial`` file and renamed when complete: a failed or cancelled swap never
  leaves a half file at ``output_path``.
* Landmarks are tracked (each face's crop comes from its landmarks in the last frame,
  which is steadier than a fresh detection box) and smoothed with an adaptive
  exponential moving average: strong when the face is still (kills jitter), weak when
  it moves (no lag), and reset on a scene cut or a jump.
* Colour: frames are decoded as I420 and only the face box is converted back from BGR
  (OpenCV, BT.601); the rest keeps its decoded YUV values exactly, so no colour drifts.
* Frames where the selector finds no face pass through unchanged; a video with no face
  in any frame is a NoFaceInTarget (an unchanged copy is not what the user asked for).
* Overlapped: the calling thread decodes, finds the faces and encodes, in frame order
  (tracking needs the previous frame; the muxer one writer); the swap itself (warp,
  colour, Poisson clone, write-back: most of a frame's CPU) runs on a small pool of
  threads, several frames at once. OpenCV, the LiteRT models and the codecs release the
  GIL, so this uses the cores the codecs leave idle. At most ``2 x workers`` frames are
  in flight, so memory stays flat.
* Detection runs every ``_DETECT_EVERY`` frames, and at once when a tracked face is lost
  (the landmark model rejects its crop), on a scene cut, or while no face is tracked;
  between detections each face's landmarks follow it from its own last points, so the
  face swapped stays the face that was detected (identity is kept by construction).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import av.audio.stream
import av.container
import av.video.stream
import cv2
import numpy as np
import numpy.typing as npt

from .errors import NoFaceInTarget, SwapCancelled, UnreadableMedia
from .resolution import OutputSize, fit_within
from .swapper import FaceSelector, FaceSwapper, SourceFace, select_faces
from .warp import FaceBox

__all__ = ["LandmarkSmoother", "VideoInfo", "swap_video"]

FloatArray = npt.NDArray[np.float32]
ByteImage = npt.NDArray[np.uint8]
ProgressCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]

# Mean absolute change of a 32x18 grey thumbnail (0-255) above which a frame is a new shot.
_SCENE_CUT_THRESHOLD = 40.0
# The thumbnail is taken from the luma plane (16-235): scaled to 0-255 like a grey image.
_LUMA_TO_GREY = 255.0 / 219.0
# Faces are detected afresh at least this often (frames); tracked in between. At 25 fps a
# face that enters the picture is picked up within a fifth of a second.
_DETECT_EVERY = 5


def _usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Threads that swap frames (the calling thread decodes, tracks and encodes meanwhile);
# each frame in flight holds its BGR image and YUV planes, so the pool stays small.
_SWAP_WORKERS = max(1, min(4, _usable_cores()))
_MAX_IN_FLIGHT = 2 * _SWAP_WORKERS
# Landmark motion (median point displacement / face width) above which a track restarts.
_JUMP_FRACTION = 0.25
# Adaptive EMA: weight of the new landmarks = clip(base + gain * motion, base, 1).
_EMA_BASE_WEIGHT = 0.45
_EMA_MOTION_GAIN = 12.0
_X264_OPTIONS = {"crf": "18", "preset": "veryfast"}


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What swap_video wrote: size, timing, how many frames had a face swapped, audio handling.

    ``fps`` is rounded for JSON and display; ``frame_rate`` is the exact rate of the stream.
    """

    width: int
    height: int
    frame_rate: Fraction
    frames: int
    frames_swapped: int
    duration: float  # seconds, first frame's start to last frame's end
    audio: Literal["copied", "reencoded", "none"]

    @property
    def fps(self) -> float:
        return round(float(self.frame_rate), 3)

    @property
    def has_audio(self) -> bool:
        return self.audio != "none"


@dataclasses.dataclass
class _Track:
    raw: FloatArray  # the landmark model's last points (the next crop is built from them)
    smoothed: FloatArray  # what is drawn

    @property
    def centre(self) -> FloatArray:
        centre: FloatArray = self.smoothed.mean(axis=0)
        return centre

    @property
    def width(self) -> float:
        return float(np.ptp(self.smoothed[:, 0])) + 1.0


class LandmarkSmoother:
    """Per-face landmark tracks across frames with adaptive EMA smoothing."""

    def __init__(self) -> None:
        self._tracks: list[_Track] = []

    def reset(self) -> None:
        self._tracks = []

    def match(self, box: FloatArray) -> _Track | None:
        """The track whose face centre lies inside ``box`` and nearest its centre, if any."""
        box_centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], dtype=np.float32)
        best: _Track | None = None
        best_distance = math.inf
        for track in self._tracks:
            centre = track.centre
            inside = box[0] <= centre[0] <= box[2] and box[1] <= centre[1] <= box[3]
            distance = float(np.linalg.norm(centre - box_centre))
            if inside and distance < best_distance:
                best, best_distance = track, distance
        return best

    def update(self, track: _Track | None, points: FloatArray) -> _Track:
        """Fold new landmarks into ``track`` (or start one) and return it."""
        if track is None:
            track = _Track(points, points.copy())
            self._tracks.append(track)
            return track
        motion = float(np.median(np.linalg.norm(points - track.smoothed, axis=1))) / track.width
        jumped = motion > _JUMP_FRACTION
        weight = 1.0 if jumped else min(1.0, _EMA_BASE_WEIGHT + _EMA_MOTION_GAIN * motion)
        track.smoothed = (weight * points + (1.0 - weight) * track.smoothed).astype(np.float32)
        track.raw = points
        return track

    def keep_only(self, tracks: list[_Track]) -> None:
        """Drop the tracks not seen in this frame (a face that left must start afresh)."""
        self._tracks = [track for track in self._tracks if any(track is kept for kept in tracks)]

    @property
    def tracks(self) -> list[_Track]:
        return list(self._tracks)


def _thumbnail(luma: ByteImage) -> npt.NDArray[np.float32]:
    """A 32x18 grey thumbnail (0-255) of a frame's luma plane, for scene-cut detection."""
    small = cv2.resize(luma, (32, 18), interpolation=cv2.INTER_AREA)
    thumbnail: npt.NDArray[np.float32] = small.astype(np.float32) * np.float32(_LUMA_TO_GREY)
    return thumbnail


def _yuv420p_planes(frame: av.VideoFrame, size: OutputSize) -> ByteImage:
    """The frame as I420 planes stacked (H * 3/2, W), scaled to ``size`` if it differs."""
    if frame.format.name != "yuv420p" or (frame.width, frame.height) != (size.width, size.height):
        frame = frame.reformat(width=size.width, height=size.height, format="yuv420p", interpolation="AREA")
    return np.ascontiguousarray(frame.to_ndarray(), dtype=np.uint8)


def _write_back(image: ByteImage, box: FaceBox, planes: ByteImage) -> None:
    """Convert only ``box`` of the swapped image back into the I420 ``planes``.

    Pixels outside the face box keep their decoded YUV values exactly: a full
    YUV -> BGR -> YUV round trip would shift every pixel of every frame by a level or two.
    The box is widened to even coordinates because chroma is stored per 2x2 block.
    """
    height, width = image.shape[:2]
    x0, y0 = box.x0 // 2 * 2, box.y0 // 2 * 2
    x1, y1 = min(width, (box.x1 + 1) // 2 * 2), min(height, (box.y1 + 1) // 2 * 2)
    if x1 <= x0 or y1 <= y0:
        return
    box_height, box_width = y1 - y0, x1 - x0
    converted = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_BGR2YUV_I420).reshape(-1)
    luma_size, chroma_size = box_height * box_width, box_height * box_width // 4
    planes[y0:y1, x0:x1] = converted[:luma_size].reshape(box_height, box_width)
    chroma_shape = (box_height // 2, box_width // 2)
    frame_chroma_size = height * width // 4
    chroma_planes = planes[height:].reshape(-1)
    for plane_index in range(2):
        frame_plane = chroma_planes[plane_index * frame_chroma_size : (plane_index + 1) * frame_chroma_size]
        block = converted[luma_size + plane_index * chroma_size : luma_size + (plane_index + 1) * chroma_size]
        frame_plane.reshape(height // 2, width // 2)[y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = block.reshape(
            chroma_shape
        )


def _frame_rate(stream: av.video.stream.VideoStream) -> Fraction:
    for rate in (stream.average_rate, stream.base_rate, stream.guessed_rate):
        if rate:
            return Fraction(rate)
    return Fraction(25)


def _expected_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    if stream.frames:
        return int(stream.frames)
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return 0
    return max(0, round(seconds * float(_frame_rate(stream))))


class _FaceTracker:
    """Where to swap in each frame, frame after frame: the smoothed landmarks of each face
    the selector picks. Runs in frame order (each frame's tracks start from the last's)."""

    def __init__(self, swapper: FaceSwapper, face_selector: FaceSelector) -> None:
        self._swapper = swapper
        self._face_selector = face_selector
        self._smoother = LandmarkSmoother()
        self._previous_thumbnail: npt.NDArray[np.float32] | None = None
        self._since_detection = 0

    def faces(self, frame: ByteImage, luma: ByteImage) -> list[FloatArray]:
        """The landmarks to swap onto in ``frame`` (none: the selector found no face)."""
        thumbnail = _thumbnail(luma)
        previous = self._previous_thumbnail
        scene_cut = previous is not None and float(np.abs(thumbnail - previous).mean()) > _SCENE_CUT_THRESHOLD
        if scene_cut:
            self._smoother.reset()
        self._previous_thumbnail = thumbnail

        self._since_detection += 1
        tracks = self._smoother.tracks
        if tracks and self._since_detection < _DETECT_EVERY:
            followed = self._follow(frame, tracks)
            if followed is not None:
                return followed
        self._since_detection = 0
        return self._detect(frame)

    def _follow(self, frame: ByteImage, tracks: list[_Track]) -> list[FloatArray] | None:
        """Every tracked face, each from its own last landmarks; None when one is lost."""
        followed = []
        for track in tracks:
            points = self._swapper.track_landmarks(frame, track.raw)
            if points is None:
                return None  # the face left or turned away: detect afresh, this frame
            followed.append((track, points))
        return [self._smoother.update(track, points).smoothed for track, points in followed]

    def _detect(self, frame: ByteImage) -> list[FloatArray]:
        detections = self._swapper.detect_boxes(frame, thorough=self._face_selector != "largest")
        try:
            selected = select_faces(detections, self._face_selector)
        except NoFaceInTarget:
            self._smoother.reset()
            return []
        seen = []
        for detection in selected:
            track = self._smoother.match(detection.box)
            points = None if track is None else self._swapper.track_landmarks(frame, track.raw)
            if points is None:
                points = self._swapper.landmarks_for(frame, detection)
            if points is None:
                continue
            track = self._smoother.update(track, points)
            seen.append(track)
        self._smoother.keep_only(seen)
        return [track.smoothed for track in seen]


def _swap_frame(
    swapper: FaceSwapper, source: SourceFace, image: ByteImage, planes: ByteImage, faces: list[FloatArray]
) -> None:
    """Swap ``source`` onto each face of ``image`` and write the changed boxes into ``planes``
    (a pool thread's job: the arrays are this frame's own)."""
    boxes = [swapper.swap_onto(source, image, points) for points in faces]
    for box in boxes:
        _write_back(image, box, planes)


@dataclasses.dataclass
class _PendingFrame:
    """A frame on its way to the encoder: its planes, timestamp and swap (None: no face)."""

    planes: ByteImage
    pts: int
    swap: concurrent.futures.Future[None] | None


def swap_video(
    swapper: FaceSwapper,
    source: SourceFace,
    target_path: Path,
    output_path: Path,
    *,
    face_selector: FaceSelector = "largest",
    output_size: OutputSize | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> VideoInfo:
    """Swap ``source`` into every frame of ``target_path`` and write an H.264 MP4 to ``output_path``.

    ``progress(frames_done, frames_expected)`` is called about every 1 % of the frames
    and once at the end; ``should_stop()`` is checked before each frame and a True ends
    the swap with SwapCancelled. Raises UnreadableMedia when the target has no video and
    NoFaceInTarget when no frame has a face.
    """
    partial_path = output_path.with_name(output_path.name + ".partial")
    try:
        info = _swap_video_to(
            swapper, source, target_path, partial_path, face_selector, output_size, progress, should_stop
        )
        os.replace(partial_path, output_path)
    except BaseException:
        partial_path.unlink(missing_ok=True)
        raise
    return info


def _swap_video_to(
    swapper: FaceSwapper,
    source: SourceFace,
    target_path: Path,
    output_path: Path,
    face_selector: FaceSelector,
    output_size: OutputSize | None,
    progress: ProgressCallback | None,
    should_stop: StopCheck | None,
) -> VideoInfo:
    try:
        input_container = av.open(str(target_path), mode="r")
    except (av.FFmpegError, OSError) as exc:
        raise UnreadableMedia(f"the target video cannot be opened: {exc}") from exc
    with input_container:
        if not input_container.streams.video:
            raise UnreadableMedia("the target file has no video stream")
        input_video = input_container.streams.video[0]
        input_video.thread_type = "AUTO"
        input_audio = input_container.streams.audio[0] if input_container.streams.audio else None
        fps = _frame_rate(input_video)
        size = fit_within(input_video.width, input_video.height, output_size, even=True)
        expected_frames = _expected_frames(input_container, input_video)
        tracker = _FaceTracker(swapper, face_selector)

        with av.open(str(output_path), mode="w", format="mp4", options={"movflags": "+faststart"}) as output:
            output_video = output.add_stream("libx264", rate=fps, options=dict(_X264_OPTIONS))
            output_video.width, output_video.height = size.width, size.height
            output_video.pix_fmt = "yuv420p"
            video_time_base = input_video.time_base or Fraction(1, 90_000)
            output_video.codec_context.time_base = video_time_base
            output_video.time_base = video_time_base

            audio_mode: Literal["copied", "reencoded", "none"] = "none"
            output_audio: av.audio.stream.AudioStream | None = None
            if input_audio is not None:
                if input_audio.codec_context.name == "aac":
                    output_audio = output.add_stream_from_template(input_audio)
                    audio_mode = "copied"
                else:
                    output_audio = output.add_stream("aac", rate=input_audio.rate or 48_000)
                    # By channel count: a container may give an unordered layout ("1 channels") aac refuses.
                    output_audio.layout = "mono" if input_audio.channels == 1 else "stereo"
                    output_audio.format = "fltp"  # the only sample format of FFmpeg's aac encoder
                    audio_mode = "reencoded"

            streams = [input_video] if input_audio is None else [input_video, input_audio]
            frames_taken = frames_done = frames_swapped = 0
            last_reported = 0
            next_pts = first_pts = last_pts = 0
            in_flight: collections.deque[_PendingFrame] = collections.deque()

            def encode_oldest() -> None:
                """Encode the oldest frame in flight (waiting for its swap) and report progress."""
                nonlocal frames_done, frames_swapped, last_reported
                pending = in_flight.popleft()
                if pending.swap is not None:
                    pending.swap.result()  # a swap's error surfaces here, in the calling thread
                    frames_swapped += 1
                out_frame = av.VideoFrame.from_ndarray(pending.planes, format="yuv420p")
                out_frame.pts = pending.pts
                out_frame.time_base = video_time_base
                output.mux(output_video.encode(out_frame))
                frames_done += 1
                if progress is not None and frames_done - last_reported >= max(1, expected_frames // 100):
                    progress(frames_done, max(expected_frames, frames_done))
                    last_reported = frames_done

            pool = concurrent.futures.ThreadPoolExecutor(_SWAP_WORKERS, thread_name_prefix="cpu-swap-frame")
            try:
                for packet in input_container.demux(streams):
                    if packet.stream is input_audio and output_audio is not None:
                        if audio_mode == "copied":
                            if packet.dts is not None:
                                packet.stream = output_audio
                                output.mux(packet)
                        else:
                            for audio_frame in input_audio.decode(packet):
                                output.mux(output_audio.encode(audio_frame))
                        continue
                    for video_frame in input_video.decode(packet):
                        if should_stop is not None and should_stop():
                            raise SwapCancelled(details={"frames_done": frames_taken})
                        planes = _yuv420p_planes(video_frame, size)
                        image = np.asarray(cv2.cvtColor(planes, cv2.COLOR_YUV2BGR_I420), dtype=np.uint8)
                        faces = tracker.faces(image, planes[: size.height])
                        swap = (
                            pool.submit(_swap_frame, swapper, source, image, planes, faces) if faces else None
                        )
                        # Keep the input's timestamps; invent them only when the input has none.
                        pts = video_frame.pts if video_frame.pts is not None else next_pts
                        if frames_taken == 0:
                            first_pts = pts
                        else:
                            pts = max(pts, last_pts + 1)
                        in_flight.append(_PendingFrame(planes, pts, swap))
                        last_pts = pts
                        next_pts = pts + max(1, round(1 / (fps * video_time_base)))
                        frames_taken += 1
                        # Encode in order whatever is ready; wait only when too much is in flight.
                        while in_flight and (
                            len(in_flight) >= _MAX_IN_FLIGHT
                            or in_flight[0].swap is None
                            or in_flight[0].swap.done()
                        ):
                            encode_oldest()
                while in_flight:
                    encode_oldest()
            finally:
                # A cancel or an error: no pool thread may still be writing into a frame.
                pool.shutdown(wait=True, cancel_futures=True)
            output.mux(output_video.encode(None))
            if output_audio is not None and audio_mode == "reencoded":
                output.mux(output_audio.encode(None))

    if frames_done == 0:
        raise UnreadableMedia("the target video has no decodable frames")
    if frames_swapped == 0:
        raise NoFaceInTarget("no face was found in any frame of the target video")
    if progress is not None:
        progress(frames_done, frames_done)
    return VideoInfo(
        width=size.width,
        height=size.height,
        frame_rate=fps,
        frames=frames_done,
        frames_swapped=frames_swapped,
        duration=float((last_pts - first_pts) * video_time_base + 1 / fps),
        audio=audio_mode,
    )
