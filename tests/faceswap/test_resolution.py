"""What ``resolution`` means for a face swap: a box the output fits into, never upscaled."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_runner.engines.cpu_swap import OutputSize, fit_within, parse_resolution, resize_to
from shared.errors import ValidationFailed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024x1024", OutputSize(1024, 1024)),
        (" 1280X720 ", OutputSize(1280, 720)),
        ((640, 480), OutputSize(640, 480)),
    ],
)
def test_parse_resolution_accepts_width_x_height(text: str | tuple[int, int], expected: OutputSize) -> None:
    assert parse_resolution(text) == expected


def test_parse_resolution_keeps_none() -> None:
    assert parse_resolution(None) is None


@pytest.mark.parametrize("text", ["1024", "axb", "0x100", "100000x100", "1024*1024", "8x8"])
def test_parse_resolution_refuses_anything_else_naming_the_field(text: str) -> None:
    with pytest.raises(ValidationFailed) as raised:
        parse_resolution(text, field="task_data.resolution")

    assert raised.value.field == "task_data.resolution"


@pytest.mark.parametrize(
    ("size", "box", "even", "expected"),
    [
        ((1920, 1080), OutputSize(1024, 1024), False, OutputSize(1024, 576)),
        ((1080, 1920), OutputSize(1024, 1024), False, OutputSize(576, 1024)),
        ((512, 512), OutputSize(1024, 1024), False, OutputSize(512, 512)),
        ((640, 480), None, False, OutputSize(640, 480)),
        ((641, 481), None, True, OutputSize(640, 480)),
        ((1000, 750), OutputSize(333, 333), True, OutputSize(332, 250)),
    ],
)
def test_fit_within_keeps_the_aspect_ratio_and_never_upscales(
    size: tuple[int, int], box: OutputSize | None, even: bool, expected: OutputSize
) -> None:
    assert fit_within(*size, box, even=even) == expected


def test_resize_to_crops_an_odd_pixel_instead_of_resampling() -> None:
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)

    cropped = resize_to(image, OutputSize(6, 4))

    assert np.array_equal(cropped, image[:4, :6])
