"""Swapping a real face (Grace Hopper) into a real photo (the astronaut)."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from skimage import data as skimage_data

from gpu_runner.engines.cpu_swap import (
    FaceSwapper,
    NoFaceInSource,
    NoFaceInTarget,
    OutputSize,
    SourceFace,
)
from shared.errors import JobFailed, ValidationFailed

from .conftest import IdentityOracle

ByteImage = npt.NDArray[np.uint8]


def _rgb_to_bgr(image: ByteImage) -> ByteImage:
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def test_detect_faces_finds_the_astronaut_with_468_landmarks_inside_her_box(
    swapper: FaceSwapper, target_image: ByteImage
) -> None:
    faces = swapper.detect_faces(target_image)

    assert len(faces) == 1
    face = faces[0]
    assert face.landmarks.shape == (468, 2)
    assert face.score > 0.8
    x0, y0, x1, y1 = face.bbox
    # Her face is about (180..270, 80..175) in the 512 px photo.
    assert 160 < x0 < 200
    assert 250 < x1 < 290
    assert 60 < y0 < 100
    assert 160 < y1 < 200
    centre = face.landmarks.mean(axis=0)
    assert x0 < centre[0] < x1
    assert y0 < centre[1] < y1


def test_swap_keeps_the_target_size_changes_the_face_and_nothing_far_from_it(
    swapper: FaceSwapper, source_face: SourceFace, target_image: ByteImage
) -> None:
    result = swapper.swap_image(source_face, target_image)

    assert result.shape == target_image.shape
    assert result.dtype == np.uint8
    face = swapper.detect_faces(target_image)[0]
    x0, y0 = np.floor(face.landmarks.min(axis=0)).astype(int)
    x1, y1 = np.ceil(face.landmarks.max(axis=0)).astype(int)
    difference = np.abs(result.astype(np.int16) - target_image.astype(np.int16)).sum(axis=2)
    assert difference[y0:y1, x0:x1].mean() > 20, "the face region should change visibly"
    margin = 4
    far = np.ones_like(difference, dtype=bool)
    far[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = False
    assert difference[far].max() == 0, "pixels away from the face must be untouched"


def test_swapped_face_reads_as_the_source_person(
    swapper: FaceSwapper,
    source_face: SourceFace,
    source_image: ByteImage,
    target_image: ByteImage,
    identity: IdentityOracle,
) -> None:
    result = swapper.swap_image(source_face, target_image)

    to_source = identity.distance(result, source_image)
    to_target = identity.distance(result, target_image)
    assert to_source < to_target, (
        f"swap is nearer the target ({to_target:.3f}) than the source ({to_source:.3f})"
    )
    assert to_source < 0.6, f"dlib would not call the swap the source person ({to_source:.3f} >= 0.6)"


@pytest.mark.parametrize(
    "image_name",
    ["flat_grey", "coffee"],
)
def test_a_source_without_a_face_raises_no_face_in_source(swapper: FaceSwapper, image_name: str) -> None:
    image = (
        np.full((300, 400, 3), 128, np.uint8)
        if image_name == "flat_grey"
        else _rgb_to_bgr(skimage_data.coffee())
    )

    with pytest.raises(NoFaceInSource) as raised:
        swapper.prepare_source(image)

    assert isinstance(raised.value, JobFailed)
    assert raised.value.code == "no_face_in_source"
    assert raised.value.http_status == 422
    assert not raised.value.retryable


def test_a_target_without_a_face_raises_no_face_in_target(
    swapper: FaceSwapper, source_face: SourceFace
) -> None:
    rocket = _rgb_to_bgr(skimage_data.rocket())

    with pytest.raises(NoFaceInTarget) as raised:
        swapper.swap_image(source_face, rocket)

    assert isinstance(raised.value, JobFailed)
    assert raised.value.code == "no_face_in_target"


def test_a_face_index_beyond_the_faces_found_raises_no_face_in_target(
    swapper: FaceSwapper, source_face: SourceFace, target_image: ByteImage
) -> None:
    with pytest.raises(NoFaceInTarget) as raised:
        swapper.swap_image(source_face, target_image, face_selector=3)

    assert raised.value.details == {"face_selector": 3, "faces_found": 1}


def test_an_unknown_face_selector_is_a_validation_error(
    swapper: FaceSwapper, source_face: SourceFace, target_image: ByteImage
) -> None:
    with pytest.raises(ValidationFailed) as raised:
        swapper.swap_image(source_face, target_image, face_selector="biggest")  # type: ignore[arg-type]

    assert raised.value.field == "face_selector"


def test_selector_all_swaps_every_face_and_an_index_swaps_only_that_one(
    swapper: FaceSwapper, source_face: SourceFace, target_image: ByteImage
) -> None:
    # Two real faces side by side: the astronaut, and her photo at 70 % (the smaller face).
    small = cv2.resize(target_image, (358, 358), interpolation=cv2.INTER_AREA)
    group = np.zeros((512, 512 + 358, 3), np.uint8)
    group[:, :512] = target_image
    group[154:, 512:] = small

    everyone = swapper.swap_image(source_face, group, face_selector="all")
    second = swapper.swap_image(source_face, group, face_selector=1)

    def changed(result: ByteImage, columns: slice) -> bool:
        return bool(np.abs(result[:, columns].astype(np.int16) - group[:, columns]).sum() > 0)

    assert changed(everyone, slice(0, 512))
    assert changed(everyone, slice(512, None))
    assert not changed(second, slice(0, 512))
    assert changed(second, slice(512, None))


def test_resolution_fits_the_output_in_the_box_without_distortion_or_upscaling(
    swapper: FaceSwapper, source_face: SourceFace, source_image: ByteImage, target_image: ByteImage
) -> None:
    # grace_hopper is 512x600 (portrait): fitted into 256x256 it becomes 218x256.
    target = source_image
    fitted = swapper.swap_image(source_face, target, output_size=OutputSize(256, 256))
    not_upscaled = swapper.swap_image(source_face, target_image, output_size=OutputSize(2048, 2048))

    assert fitted.shape == (256, 218, 3)
    assert not_upscaled.shape == target_image.shape


def test_one_swapper_shared_by_threads_gives_the_same_results_as_one_thread(
    swapper: FaceSwapper, source_face: SourceFace, target_image: ByteImage, source_image: ByteImage
) -> None:
    targets = [target_image, source_image, target_image, source_image]
    expected = [swapper.swap_image(source_face, target) for target in targets]
    results: list[ByteImage | None] = [None] * len(targets)

    def swap(index: int) -> None:
        results[index] = swapper.swap_image(source_face, targets[index])

    threads = [threading.Thread(target=swap, args=(index,)) for index in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    for index, result in enumerate(results):
        assert result is not None, f"thread {index} did not finish"
        assert np.array_equal(result, expected[index]), f"thread {index} differs"


def test_the_poisson_clone_solves_what_opencv_solves_on_a_real_face(
    swapper: FaceSwapper, source_face: SourceFace, target_image: ByteImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """issue 15: cv2.seamlessClone was the largest cost of a video frame; blend.poisson_clone
    solves its equations (NORMAL_CLONE) with a sine transform. On OpenCV's own rectangle (the
    mask's box) the result is OpenCV's; on the rectangle grown to a fast size, the boundary
    moves a few pixels out and the result stays within a few levels of it."""
    from gpu_runner.engines.cpu_swap import blend
    from gpu_runner.engines.cpu_swap.warp import warp_face

    points = swapper.detect_faces(target_image)[0].landmarks
    warped = warp_face(
        source_face.image, source_face.landmarks, source_face.triangles, points, target_image.shape
    )
    box = warped.box
    patch = np.ascontiguousarray(target_image[box.y0 : box.y1, box.x0 : box.x1])
    mask = blend.face_mask(points, warped)
    recoloured = blend.reinhard_colour_transfer(warped.pixels, patch, mask)
    ys, xs = np.nonzero(mask)
    centre = ((int(xs.min()) + int(xs.max()) + 1) // 2, (int(ys.min()) + int(ys.max()) + 1) // 2)
    # seamlessClone erodes the mask it is given in place: it gets a copy.
    opencv = cv2.seamlessClone(recoloured, patch, mask.copy(), centre, cv2.NORMAL_CLONE).astype(np.int16)

    grown = blend.poisson_clone(recoloured, patch, mask)
    monkeypatch.setattr(blend, "_fast_side", lambda low, high, room: (low, high))
    same_rectangle = blend.poisson_clone(recoloured, patch, mask)

    assert int(np.abs(same_rectangle - opencv).max()) <= 1
    assert float(np.abs(same_rectangle - opencv).mean()) < 0.05
    assert float(np.abs(grown - opencv).mean()) < 1.5
    assert float(np.percentile(np.abs(grown - opencv), 99)) <= 6
    assert float(np.abs(grown.astype(np.int16) - patch).mean()) > 5  # the face did change
