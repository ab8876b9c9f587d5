"""Workflow templates, their typed parameters, and the environments that serve them.

A client names a workflow (``face_swap``, ``basic_generation``, ...) and passes
``task_data``; this module validates that data against the template's parameter model
(with the template's defaults) and produces ``params.input_data`` in the seed's unified
format: the face-swap fields as given, or ``wf_json`` built from a ComfyUI template.
All of it runs at create time, so a bad request is a 400 naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import secrets
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.errors import ValidationFailed, validation_failed_from
from shared.request_guard import check_depth

__all__ = [
    "ENGINE_MODELS",
    "ENVIRONMENTS",
    "FACEFUSION_PIXEL_BOOSTS",
    "FACE_SWAP_MODELS",
    "TEMPLATES",
    "EnvironmentConfig",
    "FaceSwapInput",
    "WorkflowTemplate",
    "build_input_data",
    "get_template",
    "resolve_environment",
    "supported_models",
    "validate_for_engine",
    "validate_wf_json",
    "workflows_document",
]

RESOLUTION_PATTERN = re.compile(r"^(\d{3,4})x(\d{3,4})$")
PIXEL_BOOST_PATTERN = re.compile(r"^(\d{3,4})x\1$")

# The seed's whitelist, plus FaceFusion 3.x swapper models the GPU runner can load.
FACE_SWAP_MODELS: tuple[str, ...] = (
    "inswapper_128_fp16",
    "inswapper_128",
    "simswap_256",
    "simswap_512",
    "simswap_unofficial_512",
    "hyperswap_1a_256",
    "hyperswap_1b_256",
    "hyperswap_1c_256",
    "ghost_1_256",
    "ghost_2_256",
    "ghost_3_256",
    "blendswap_256",
    "uniface_256",
)


# FaceFusion 3.x ``face_swapper_set``: each swapper model and the pixel boosts it accepts
# (``--face-swapper-pixel-boost`` choices). hyperswap_* need 3.3+; hififace_unofficial_256
# (3.1+) is listed for completeness but is not in our API's whitelist (FACE_SWAP_MODELS).
FACEFUSION_PIXEL_BOOSTS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
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
)

# The seed's whitelist: what its FaceFusion HTTP service was deployed to accept.
_SEED_API_MODELS: Final = frozenset({"inswapper_128_fp16", "inswapper_128", "simswap_256", "simswap_512"})

# Per FACE_SWAP_ENGINE, the models of our API whitelist it can run. ``cpu`` takes every
# name: the embedded classical swap has no neural model and only records the name.
ENGINE_MODELS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "cpu": frozenset(FACE_SWAP_MODELS),
        "facefusion": frozenset(FACE_SWAP_MODELS) & frozenset(FACEFUSION_PIXEL_BOOSTS),
        "facefusion_api": frozenset(FACE_SWAP_MODELS) & _SEED_API_MODELS,
    }
)


def supported_models(engine_name: str) -> frozenset[str]:
    """The API whitelist's models that ``engine_name`` (a FACE_SWAP_ENGINE value) can run."""
    try:
        return ENGINE_MODELS[engine_name]
    except KeyError:
        raise ValueError(
            f"unknown face-swap engine {engine_name!r}; known: {', '.join(ENGINE_MODELS)}"
        ) from None


def validate_for_engine(request: FaceSwapInput, engine_name: str) -> None:
    """Refuse at create time what the configured engine cannot do, so the client gets a
    400 naming the field instead of a task that fails on the GPU minutes later: a model
    it cannot load, or (seed HTTP API, whose request has no such field) a face selector
    other than the default."""
    allowed = supported_models(engine_name)
    if request.model not in allowed:
        raise ValidationFailed(
            "task_data.model",
            f"model {request.model!r} is not available on this deployment's face-swap engine "
            f"({engine_name}); available: {', '.join(sorted(allowed))}",
            code="model_not_supported",
        )
    if request.pixel_boost is not None and engine_name == "facefusion":
        choices = FACEFUSION_PIXEL_BOOSTS[request.model]
        if request.pixel_boost not in choices:
            raise ValidationFailed(
                "task_data.pixel_boost",
                f"{request.model} takes a pixel boost of {', '.join(choices)}, not {request.pixel_boost}",
                code="option_not_supported",
            )
    if request.pixel_boost is not None and engine_name == "facefusion_api":
        raise ValidationFailed(
            "task_data.pixel_boost",
            "this deployment's face-swap engine (facefusion_api) has no pixel boost option",
            code="option_not_supported",
        )
    if engine_name == "facefusion_api" and request.face_selector != "largest":
        raise ValidationFailed(
            "task_data.face_selector",
            "this deployment's face-swap engine (facefusion_api) swaps the largest face only",
            code="option_not_supported",
        )


class FaceSwapInput(BaseModel):
    """``task_data`` of a face swap (seed: source_url and target_url required)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    source_url: str = Field(..., min_length=1, description="Face to use: http(s) URL or data: URL.")
    target_url: str = Field(..., min_length=1, description="Image or video to put it in.")
    resolution: str = Field("1024x1024", description="Output size WxH, each 100-9999 px.")
    model: str = Field("inswapper_128_fp16", description="Face swapper model (whitelist).")
    face_selector: Literal["largest", "all"] | int = Field(
        "largest", description="Which target faces to swap: largest, all, or an index (0 = largest)."
    )
    pixel_boost: str | None = Field(
        None,
        description="FaceFusion only: the face crop size the swapper works at (WxH, one of the model's "
        "choices); larger is sharper and slower. Default: the model's own size, as FaceFusion.",
    )

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: str) -> str:
        match = RESOLUTION_PATTERN.match(value)
        if not match:
            raise ValueError("must look like 1024x1024 (WxH, 3-4 digits each)")
        width, height = int(match.group(1)), int(match.group(2))
        if not (100 <= width <= 4096 and 100 <= height <= 4096):
            raise ValueError("each side must be between 100 and 4096 px")
        return value

    @field_validator("pixel_boost")
    @classmethod
    def _pixel_boost(cls, value: str | None) -> str | None:
        if value is not None and not PIXEL_BOOST_PATTERN.match(value):
            raise ValueError("must look like 256x256 (WxH)")
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        if value not in FACE_SWAP_MODELS:
            raise ValueError(f"unknown model {value!r}; allowed: {', '.join(FACE_SWAP_MODELS)}")
        return value

    @field_validator("face_selector")
    @classmethod
    def _selector(cls, value: str | int) -> str | int:
        if isinstance(value, int) and not 0 <= value < 64:
            raise ValueError("an index must be between 0 and 63")
        return value

    @property
    def size(self) -> tuple[int, int]:
        width, _, height = self.resolution.partition("x")
        return int(width), int(height)


class GenerationParams(BaseModel):
    """Text-to-image with a Stable Diffusion checkpoint (seed: ``default``/``basic_generation``)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    prompt: str = Field("a beautiful landscape, highly detailed", max_length=4000)
    negative_prompt: str = Field("blurry, low quality", max_length=4000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Random when omitted.")
    steps: int = Field(20, ge=1, le=150)
    cfg: float = Field(7.0, ge=0.0, le=30.0)
    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)
    batch_size: int = Field(1, ge=1, le=8)
    checkpoint: str = Field("v1-5-pruned-emaonly.safetensors", min_length=1, max_length=255)
    sampler_name: str = Field("euler", max_length=64)
    scheduler: str = Field("normal", max_length=64)
    filename_prefix: str = Field("comfyswap", pattern=r"^[A-Za-z0-9_-]{1,64}$")


class ImageInputParams(BaseModel):
    """Model-free image workflows: one input image by URL (fetched safely by the runner)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    image_url: str = Field(..., min_length=1, description="http(s) or data: URL of the input image.")
    width: int | None = Field(None, ge=1, le=4096, description="Rescale to this width (with height).")
    height: int | None = Field(None, ge=1, le=4096)
    filename_prefix: str = Field("comfyswap", pattern=r"^[A-Za-z0-9_-]{1,64}$")


class ImageToImageParams(GenerationParams):
    image_url: str = Field(..., min_length=1, description="http(s) or data: URL of the input image.")
    denoise: float = Field(0.6, ge=0.0, le=1.0)


def _generation_graph(params: GenerationParams) -> dict[str, Any]:
    seed = params.seed if params.seed is not None else secrets.randbelow(2**53)
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": params.steps,
                "cfg": params.cfg,
                "sampler_name": params.sampler_name,
                "scheduler": params.scheduler,
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": params.checkpoint}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": params.width, "height": params.height, "batch_size": params.batch_size},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": params.prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": params.negative_prompt, "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": params.filename_prefix, "images": ["8", 0]},
        },
    }


def _image_to_image_graph(params: ImageToImageParams) -> dict[str, Any]:
    graph = _generation_graph(params)
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": params.image_url}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"]["latent_image"] = ["11", 0]
    graph["3"]["inputs"]["denoise"] = params.denoise
    del graph["5"]
    return graph


def _invert_graph(params: ImageInputParams) -> dict[str, Any]:
    graph: dict[str, Any] = {
        "1": {"class_type": "LoadImage", "inputs": {"image": params.image_url}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "4": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": params.filename_prefix, "images": ["2", 0]},
        },
    }
    if params.width and params.height:
        graph["3"] = {
            "class_type": "ImageScale",
            "inputs": {
                "upscale_method": "nearest-exact",
                "width": params.width,
                "height": params.height,
                "crop": "disabled",
                "image": ["2", 0],
            },
        }
        graph["4"]["inputs"]["images"] = ["3", 0]
    return graph


@dataclasses.dataclass(frozen=True)
class WorkflowTemplate:
    name: str
    environment: str
    description: str
    params_model: type[BaseModel]
    build: Callable[[Any], dict[str, Any]] | None
    # Inputs that are images given by URL: (param name, node id, node input). The runner
    # fetches each safely, uploads it to ComfyUI and writes the returned name there.
    image_inputs: tuple[tuple[str, str, str], ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "environment": self.environment,
            "description": self.description,
            "parameters": self.params_model.model_json_schema(),
        }


TEMPLATES: dict[str, WorkflowTemplate] = {
    "face_swap": WorkflowTemplate(
        "face_swap", "face_swap", "Swap the source face into the target image or video.", FaceSwapInput, None
    ),
    "default": WorkflowTemplate(
        "default", "comm", "Text to image with default settings.", GenerationParams, _generation_graph
    ),
    "basic_generation": WorkflowTemplate(
        "basic_generation", "comm", "Text to image with a checkpoint.", GenerationParams, _generation_graph
    ),
    "image_to_image": WorkflowTemplate(
        "image_to_image",
        "comm",
        "Re-draw an input image with a prompt.",
        ImageToImageParams,
        _image_to_image_graph,
        image_inputs=(("image_url", "10", "image"),),
    ),
    "invert_image": WorkflowTemplate(
        "invert_image",
        "comm",
        "Invert (and optionally rescale) an image; needs no model weights.",
        ImageInputParams,
        _invert_graph,
        image_inputs=(("image_url", "1", "image"),),
    ),
}

# A raw ComfyUI graph sent by the client (only for keys allowed to send one).
RAW_WORKFLOW = "custom"


@dataclasses.dataclass(frozen=True)
class EnvironmentConfig:
    """Where a workflow runs. ``target_port`` is the seed's field, kept for old clients."""

    name: str
    target_port: int
    kind: Literal["face_swap", "comfyui"]


ENVIRONMENTS: dict[str, EnvironmentConfig] = {
    "face_swap": EnvironmentConfig("face_swap", 8000, "face_swap"),
    "comm": EnvironmentConfig("comm", 3001, "comfyui"),
}


def get_template(name: str) -> WorkflowTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join([*TEMPLATES, RAW_WORKFLOW])
        raise ValidationFailed("workflow", f"unknown workflow {name!r}; known: {known}") from None


def resolve_environment(workflow: str, requested: str | None) -> EnvironmentConfig:
    """``auto`` (or nothing) picks the template's environment; a named one must exist and fit."""
    default = TEMPLATES[workflow].environment if workflow in TEMPLATES else "comm"
    name = default if requested in (None, "", "auto") else str(requested)
    environment = ENVIRONMENTS.get(name)
    if environment is None:
        raise ValidationFailed(
            "environment", f"unknown environment {name!r}; known: auto, {', '.join(ENVIRONMENTS)}"
        )
    wants_face_swap = workflow == "face_swap"
    if wants_face_swap != (environment.kind == "face_swap"):
        raise ValidationFailed("environment", f"workflow {workflow!r} cannot run in environment {name!r}")
    return environment


# Deepest raw ComfyUI graph accepted (levels of objects and lists, the graph itself included).
MAX_WORKFLOW_DEPTH = 12


def validate_wf_json(wf_json: Any, field: str = "task_data.wf_json") -> dict[str, Any]:
    """Structure check of an API-format ComfyUI graph: node id -> {class_type, inputs}."""
    if not isinstance(wf_json, dict) or not wf_json:
        raise ValidationFailed(field, "must be a non-empty object of nodes (ComfyUI API format)")
    if len(wf_json) > 2000:
        raise ValidationFailed(field, "more than 2000 nodes")
    # A ComfyUI graph is 4-5 levels deep; the task document nests it 3 deeper, and Firestore
    # stores at most 20 levels of maps and arrays (a deeper one could not even record its error).
    check_depth(wf_json, field=field, max_depth=MAX_WORKFLOW_DEPTH)
    for node_id, node in wf_json.items():
        if not isinstance(node, dict):
            raise ValidationFailed(f"{field}.{node_id}", "a node must be an object")
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            raise ValidationFailed(f"{field}.{node_id}.class_type", "required, a node class name")
        if not isinstance(node.get("inputs", {}), dict):
            raise ValidationFailed(f"{field}.{node_id}.inputs", "must be an object")
    return copy.deepcopy(wf_json)


MAX_RAW_IMAGE_INPUTS = 16


def _raw_image_inputs(value: Any, wf_json: dict[str, Any]) -> list[dict[str, str]]:
    """``task_data.image_inputs`` of a raw graph: ``[{node, input, url}]``, each URL fetched by
    the runner (SSRF-safe), uploaded to ComfyUI and written into that node's input."""
    field = "task_data.image_inputs"
    if not isinstance(value, list) or not value:
        raise ValidationFailed(field, "must be a non-empty list of {node, input, url}")
    if len(value) > MAX_RAW_IMAGE_INPUTS:
        raise ValidationFailed(field, f"at most {MAX_RAW_IMAGE_INPUTS} image inputs")
    entries: list[dict[str, str]] = []
    for index, entry in enumerate(value):
        where = f"{field}.{index}"
        if not isinstance(entry, dict):
            raise ValidationFailed(where, "must be an object {node, input, url}")
        unknown = sorted(set(entry) - {"node", "input", "url"})
        if unknown:
            raise ValidationFailed(f"{where}.{unknown[0]}", "unknown field")
        for name in ("node", "input", "url"):
            if not isinstance(entry.get(name), str) or not entry[name]:
                raise ValidationFailed(f"{where}.{name}", "required, a non-empty string")
        if entry["node"] not in wf_json:
            raise ValidationFailed(f"{where}.node", f"node {entry['node']!r} is not in wf_json")
        if len(entry["input"]) > 128:
            raise ValidationFailed(f"{where}.input", "longer than 128 characters")
        entries.append(
            {
                "param": f"image_inputs.{index}.url",
                "node": entry["node"],
                "input": entry["input"],
                "url": entry["url"],
            }
        )
    return entries


def build_input_data(
    workflow: str, task_data: dict[str, Any], *, allow_raw: bool, face_swap_engine: str | None = None
) -> dict[str, Any]:
    """Validate ``task_data`` and return ``params.input_data`` in the unified format; with
    ``face_swap_engine``, a face swap is also checked against that engine
    (``validate_for_engine``) on the model already validated, not on a second validation."""
    if workflow == RAW_WORKFLOW or "wf_json" in task_data:
        if not allow_raw:
            raise ValidationFailed("task_data.wf_json", "this API key may not send raw ComfyUI workflows")
        extra = sorted(set(task_data) - {"wf_json", "image_inputs"})
        if extra:
            raise ValidationFailed(f"task_data.{extra[0]}", "unknown field next to wf_json")
        wf_json = validate_wf_json(task_data.get("wf_json"))
        raw: dict[str, Any] = {"wf_json": wf_json}
        if "image_inputs" in task_data:
            raw["image_inputs"] = _raw_image_inputs(task_data["image_inputs"], wf_json)
        return raw
    template = get_template(workflow)
    try:
        params = template.params_model.model_validate(task_data)
    except ValidationError as exc:
        raise validation_failed_from(exc, "task_data") from None
    if face_swap_engine is not None and isinstance(params, FaceSwapInput):
        validate_for_engine(params, face_swap_engine)
    if template.build is None:
        # Optional options left unset (pixel_boost) stay out: the engine applies its default.
        return params.model_dump(exclude_none=True)
    input_data: dict[str, Any] = {"wf_json": template.build(params), "template_params": params.model_dump()}
    if template.image_inputs:
        input_data["image_inputs"] = [
            {"param": param, "node": node, "input": node_input, "url": getattr(params, param)}
            for param, node, node_input in template.image_inputs
        ]
    return input_data


def workflows_document(face_swap_engine: str) -> dict[str, Any]:
    """GET /api/face-swap/workflows: each template with its parameters' JSON Schema, the face
    swap's schema, and the whitelist's models this deployment's engine can run, default
    first (the console builds its forms and model choices from it)."""
    runnable = supported_models(face_swap_engine)
    return {
        "workflows": {name: template.describe() for name, template in TEMPLATES.items()},
        "face_swap": FaceSwapInput.model_json_schema(),
        "face_swap_models": [model for model in FACE_SWAP_MODELS if model in runnable],
    }
