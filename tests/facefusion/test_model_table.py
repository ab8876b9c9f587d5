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
    ("model", "boost"),
    [
        ("inswapper_128_fp16", "128x128"),
        ("hyperswap_1a_256", "256x256"),
        ("simswap_unofficial_512", "512x512"),
    ],
)
def test_the_default_pixel_boost_is_facefusions_the_models_own_size(model: str, boost: str) -> None:
    """Not the output resolution: 1024 on a 128 model was 64 model passes per face."""
    assert pixel_boost_for(model, None) == boost
    assert pixel_boost_for(model, "1024x1024") == "1024x1024"


def test_a_pixel_boost_the_model_does_not_take_is_refused_at_create_time() -> None:
    validate_request(swap_input(pixel_boost="512x512"), "facefusion")
    with pytest.raises(ValidationFailed) as refused:
        validate_request(swap_input(model="simswap_unofficial_512", pixel_boost="256x256"), "facefusion")
    assert refused.value.details["field"] == "task_data.pixel_boost"
    with pytest.raises(ValidationFailed):
        validate_request(swap_input(pixel_boost="256x256"), "facefusion_api")
    with pytest.raises(ValueError, match="pixel_boost"):
        swap_input(pixel_boost="256x128")


def test_face_selector_mapping() -> None:
    assert face_selector_arguments("all") == ["--face-selector-mode", "many"]
    assert face_selector_arguments("largest") == [
        "--face-selector-mode",
        "one",
        "--face-selector-order",
        "large-small",
    ]
    assert face_selector_arguments(0)[-2:] == ["--reference-face-position", "0"]
