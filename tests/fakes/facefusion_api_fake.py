"""A stand-in for the seed's FaceFusion HTTP service, served on 127.0.0.1 for tests.

The seed's ``FaceSwapService`` called a FaceFusion API co-located with it: ``GET
/health``, ``POST /process`` with ``{source_url, target_url, resolution, model}``
answering ``{status, output_path, processing_time, error, job_id, metadata}``, and
``GET /`` describing the service. ``output_path`` was a path under the service's folder
(``/outputs/<job>.jpg``), read by the caller from the shared file system. This server
does the same: it fetches both URLs itself (``data:`` URLs, or http(s) on loopback
only), pastes the source over the centre of a target image (a visible change) or copies
a target video, and writes the result under ``--shared-dir``.

Failure knobs, set with ``POST /_control`` (JSON; every field optional, a new call
replaces all of them) and cleared with ``POST /_control`` ``{}``:

* ``fail_times`` N: the next N ``/process`` calls answer 503;
* ``slow_times`` N and ``delay_s``: the next N calls wait ``delay_s`` before answering;
* ``result_status`` / ``result_error``: answer with this status (``failed``) and error;
* ``output_path``: report this path instead of the real one (path traversal tests);
* ``health_down``: ``/health`` answers 503.

``GET /_requests`` lists the ``/process`` calls received, each with its arrival time,
so tests can check what was sent and the spacing of retries.

Run: ``python tests/fakes/facefusion_api_fake.py --port PORT --shared-dir DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import ipaddress
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import httpx
import uvicorn
from PIL import Image, ImageDraw
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SEED_MODELS = ("inswapper_128_fp16", "inswapper_128", "simswap_256", "simswap_512")
VIDEO_MAGIC = (b"ftyp", b"\x1a\x45\xdf\xa3")


class State:
    def __init__(self, shared_dir: Path) -> None:
        self.shared_dir = shared_dir
        self.knobs: dict[str, Any] = {}
        self.requests: list[dict[str, Any]] = []


def read_url(url: str) -> bytes:
    """The service fetched its own inputs; here only data: URLs and loopback http(s)."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        return base64.b64decode(payload) if header.endswith(";base64") else unquote_to_bytes(payload)
    host = urlsplit(url).hostname or ""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"this test service fetches from loopback only, not {host!r}")
    response = httpx.get(url, timeout=10.0)
    response.raise_for_status()
    return response.content


def is_video(data: bytes) -> bool:
    return data[4:8] == VIDEO_MAGIC[0] or data[:4] == VIDEO_MAGIC[1]


def swap(source: bytes, target: bytes, outputs: Path, job_id: str) -> tuple[Path, str]:
    """Write the result into ``outputs``; returns (path, file_type)."""
    if is_video(target):
        path = outputs / f"{job_id}.mp4"
        path.write_bytes(target)
        return path, "video"
    with Image.open(io.BytesIO(target)) as opened:
        changed = opened.convert("RGB")
    side = max(16, min(changed.size) // 3)
    with Image.open(io.BytesIO(source)) as opened:
        patch = opened.convert("RGB").resize((side, side))
    left, top = (changed.width - side) // 2, (changed.height - side) // 2
    changed.paste(patch, (left, top))
    ImageDraw.Draw(changed).rectangle(
        (left, top, left + side - 1, top + side - 1), outline=(255, 0, 0), width=3
    )
    path = outputs / f"{job_id}.jpg"
    changed.save(path, quality=95)
    return path, "image"


def build_app(state: State) -> Starlette:
    async def info(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "service": "FaceFusion API (test stand-in)",
                "endpoints": ["/health", "/process"],
                "models": SEED_MODELS,
            }
        )

    async def health(request: Request) -> JSONResponse:
        if state.knobs.get("health_down"):
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "healthy", "service": "facefusion"})

    async def process(request: Request) -> JSONResponse:
        body = await request.json()
        state.requests.append({"at": time.monotonic(), "body": body})
        knobs = state.knobs
        if knobs.get("fail_times", 0) > 0:
            knobs["fail_times"] -= 1
            return JSONResponse({"detail": "service overloaded"}, status_code=503)
        if knobs.get("slow_times", 0) > 0:
            knobs["slow_times"] -= 1
            await asyncio.sleep(float(knobs.get("delay_s", 5.0)))
        missing = [field for field in ("source_url", "target_url") if not body.get(field)]
        if missing:
            return JSONResponse(
                {"detail": [{"loc": ["body", field], "msg": "field required"} for field in missing]},
                status_code=422,
            )
        started = time.monotonic()
        job_id = uuid.uuid4().hex
        if knobs.get("result_status", "success") != "success":
            return JSONResponse(
                {"status": knobs["result_status"], "error": knobs.get("result_error"), "job_id": job_id}
            )
        if body.get("model", "inswapper_128_fp16") not in SEED_MODELS:
            return JSONResponse(
                {"status": "failed", "error": f"Invalid model: {body['model']}", "job_id": job_id}
            )
        try:
            source, target = await asyncio.gather(
                asyncio.to_thread(read_url, body["source_url"]),
                asyncio.to_thread(read_url, body["target_url"]),
            )
            outputs = state.shared_dir / "outputs"
            outputs.mkdir(parents=True, exist_ok=True)
            path, file_type = await asyncio.to_thread(swap, source, target, outputs, job_id)
        except (ValueError, OSError, httpx.HTTPError) as exc:
            return JSONResponse(
                {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "job_id": job_id}
            )
        output_path = knobs.get("output_path") or "/" + path.relative_to(state.shared_dir).as_posix()
        return JSONResponse(
            {
                "status": "success",
                "output_path": output_path,
                "processing_time": round(time.monotonic() - started, 3),
                "error": None,
                "job_id": job_id,
                "metadata": {
                    "file_type": file_type,
                    "resolution": body.get("resolution", "1024x1024"),
                    "model": body.get("model", "inswapper_128_fp16"),
                },
            }
        )

    async def control(request: Request) -> JSONResponse:
        state.knobs = dict(await request.json())
        state.requests.clear()
        return JSONResponse({"knobs": state.knobs})

    async def requests(request: Request) -> JSONResponse:
        return JSONResponse(state.requests)

    return Starlette(
        routes=[
            Route("/", info),
            Route("/health", health),
            Route("/process", process, methods=["POST"]),
            Route("/_control", control, methods=["POST"]),
            Route("/_requests", requests),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--shared-dir", type=Path, required=True)
    arguments = parser.parse_args()
    arguments.shared_dir.mkdir(parents=True, exist_ok=True)
    uvicorn.run(
        build_app(State(arguments.shared_dir)), host="127.0.0.1", port=arguments.port, log_level="warning"
    )


if __name__ == "__main__":
    main()
