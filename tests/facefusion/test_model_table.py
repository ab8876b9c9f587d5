"""Which models each face-swap engine runs, the create-time check, and pixel boosts."""

from __future__ import annotations

import pytest

from gpu_runner.engines.facefusion import (
    ENGINE_MODELS,
    FACEFUSION_PIXEL_BOOSTS,
    FaceFusionEngine,
    face_selector_arguments,
    pixel_boost_for,
    supported_models,
    validate_request,
)
from gpu_runner.engines.facefusion_api import FaceFusionApiEngine
from shared.errors import ValidationFailed
from shared.workflows import FACE_SWAP_MODELS, FaceSwapInput
from tests.fakes.facefusion_cli import PIXEL_BOOSTS as STAND_IN_PIXEL_BOOSTS


def swap_input(**fields: object) -> FaceSwapInput:
    return FaceSwapInput.model_validate(
        {"source_url": "https://a.test/s.jpg", "target_url": "https://a.test/t.jpg", **fields}
    )


def test_every_engine_runs_only_whitelisted_models_and_the_default() -> None:
    for engine_name, models in ENGINE_MODELS.items():
        assert models <= set(FACE_SWAP_MODELS), engine_name
        assert "inswapper_128_fp16" in models, engine_name


def test_facefusion_runs_every_whitelisted_facefusion_model_but_not_the_seeds_simswap_512() -> None:
    assert supported_models("facefusion") == set(FACE_SWAP_MODELS) - {"simswap_512"}
    assert FaceFusionEngine.supported_models == supported_models("facefusion")


def test_the_seed_api_runs_the_seeds_whitelist() -> None:
    assert supported_models("facefusion_api") == {
        "inswapper_128_fp16",
        "inswapper_128",
        "simswap_256",
        "simswap_512",
    }
    assert FaceFusionApiEngine.supported_models == supported_models("facefusion_api")


def test_the_stand_in_knows_the_same_facefusion_models_and_boosts() -> None:
    assert dict(FACEFUSION_PIXEL_BOOSTS) == STAND_IN_PIXEL_BOOSTS


@pytest.mark.parametrize(
    ("engine_name", "model"),
    [
        ("facefusion", "simswap_512"),
        ("facefusion_api", "hyperswap_1a_256"),
        ("facefusion_api", "ghost_1_256"),
    ],
)
def test_validate_request_names_the_model_field(engine_name: str, model: str) -> None:
    with pytest.raises(ValidationFailed) as failure:
        validate_request(swap_input(model=model), engine_name)

    assert failure.value.field == "task_data.model"
    assert failure.value.code == "model_not_supported"
    assert engine_name in failure.value.reason


@pytest.mark.parametrize("model", FACE_SWAP_MODELS)
def test_the_cpu_engine_accepts_every_whitelisted_name(model: str) -> None:
    validate_request(swap_input(model=model), "cpu")


def test_the_seed_api_swaps_the_largest_face_only() -> None:
    validate_request(swap_input(face_selector="largest"), "facefusion_api")
    with pytest.raises(ValidationFailed) as failure:
        validate_request(swap_input(face_selector="all"), "facefusion_api")

    assert failure.value.field == "task_data.face_selector"
    validate_request(swap_input(face_selector=1), "facefusion")


def test_an_unknown_engine_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown face-swap engine"):
        validate_request(swap_input(), "gpu9000")


@pytest.mark.parametrize(
    ("model", "resolution", "boost"),
    [
        ("inswapper_128_fp16", "1024x1024", "1024x1024"),
        ("inswapper_128_fp16", "300x300", "256x256"),
        ("inswapper_128_fp16", "192x192", "128x128"),  # a tie goes to the cheaper boost
        ("inswapper_128_fp16", "1920x1080", "1024x1024"),
        ("inswapper_128", "640x480", "512x512"),  # the shorter side decides
        ("simswap_unofficial_512", "128x128", "512x512"),  # nothing smaller exists
        ("blendswap_256", "400x400", "384x384"),
    ],
)
def test_pixel_boost_is_the_nearest_the_model_accepts(model: str, resolution: str, boost: str) -> None:
    assert pixel_boost_for(model, resolution) == boost
    assert boost in FACEFUSION_PIXEL_BOOSTS[model]


def test_face_selector_mapping() -> None:
    assert face_selector_arguments("all") == ["--face-selector-mode", "many"]
    assert face_selector_arguments("largest") == [
        "--face-selector-mode",
        "one",
        "--face-selector-order",
        "large-small",
    ]
    assert face_selector_arguments(0)[-2:] == ["--reference-face-position", "0"]
