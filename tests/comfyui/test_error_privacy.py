"""ComfyUI's "value not in list" answer names every choice of the input: for a file input
(checkpoints, the input folder's images) that is what the runner has installed and what other
tenants uploaded, so a client must not see it (issue 13, finding 11). Bodies shaped as
ComfyUI 0.3.64 answers them (execution.py, validate_inputs; docs/comfyui-protocol.md)."""

from __future__ import annotations

import json
from typing import Any

from gpu_runner.engines.comfyui_errors import validation_error

INSTALLED = ["tenant-a-private.safetensors", "sd_xl_base_1.0.safetensors"]


def not_in_list(class_type: str, name: str, value: str, choices: list[str]) -> dict[str, Any]:
    problem = {
        "type": "value_not_in_list",
        "message": "Value not in list",
        "details": f"{name}: '{value}' not in {choices}",
        "extra_info": {"input_name": name, "input_config": [choices, {}], "received_value": value},
    }
    return {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
            "extra_info": {},
        },
        "node_errors": {
            "4": {"errors": [problem], "dependent_outputs": ["9"], "class_type": class_type},
        },
    }


def test_a_checkpoint_not_installed_names_no_installed_file():
    body = not_in_list("CheckpointLoaderSimple", "ckpt_name", "missing.safetensors", INSTALLED)

    failed = validation_error(body, 400)

    shown = failed.message + json.dumps(failed.details)
    assert not any(name in shown for name in INSTALLED), shown
    assert "missing.safetensors" in failed.message
    assert "not one of the files installed on the runner" in failed.message
    assert failed.details["problems"][0]["input_name"] == "ckpt_name"


def test_an_uploaded_image_list_is_not_shown_either():
    body = not_in_list("LoadImage", "image", "nope.png", ["other-tenant-face.png", "upload_1.jpg"])

    failed = validation_error(body, 400)

    shown = failed.message + json.dumps(failed.details)
    assert "other-tenant-face.png" not in shown and "upload_1.jpg" not in shown, shown


def test_an_enumeration_keeps_its_choices_for_the_author():
    choices = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
    body = not_in_list("ImageScale", "upscale_method", "magic", choices)

    failed = validation_error(body, 400)

    assert "'bilinear'" in failed.message and "'magic'" in failed.message
