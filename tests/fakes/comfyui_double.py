"""A ComfyUI test double: a real HTTP + websocket server that behaves like ComfyUI 0.3.64.

Built from the recorded protocol in docs/comfyui-protocol.md (and the recorded invalid
requests in tests/fakes/comfyui_data/workflows/invalid/). It is a hand-written fake for the
fast tiers (fault injection, socket drops, millisecond restarts); the real ComfyUI runs in
the real-peer tier (tests/peers/). It copies the real server's quirks rather than an
idealised API:

* ``/ws?clientId=X``: an initial ``status`` carrying ``sid``; ``feature_flags`` answered when
  the client sends them; execution messages only to the socket of the prompt's
  ``client_id`` (none at all for a prompt posted without one, except ``progress_state`` and
  ``execution_interrupted``, which are broadcast); ``status`` broadcast to every socket,
  twice per POST on an idle queue; nothing buffered for a socket that connects late; a
  socket reconnecting mid-run gets ``executing{node}`` without ``prompt_id``.
* ``POST /prompt``: client-chosen ``prompt_id`` (ints stringified, duplicates accepted), the
  validation rules of ComfyUI's ``validate_prompt`` producing the recorded 400 bodies
  (unknown class, missing class_type, conversion/min/max/combo errors, missing inputs, bad
  links with their KeyError/IndexError tracebacks, LoadImage's file check), a 200 with
  ``node_errors`` when one output node is valid, a text/plain 500 for a malformed body.
* Execution on real pixels (numpy, PIL) of EmptyImage, LoadImage, ImageInvert, ImageScale,
  ImageAddNoise, ImageBlur (slow: a configurable delay per node, 1 s by default),
  SaveImage, PreviewImage, SaveAnimatedPNG, GetImageSize (binary text frame type 3),
  PreviewAny and SaveImageWebsocket (binary frames type 1, or type 4 after feature flags).
* STAND-IN model nodes (no weights, no diffusion): CheckpointLoaderSimple, CLIPTextEncode,
  EmptyLatentImage, KSampler, VAEDecode, VAEEncode. They only exist so the workflow
  templates can run end to end: KSampler emits ``progress`` per step and produces a
  deterministic picture from the seed and the prompt text. Nothing about their pixels is
  meant to resemble Stable Diffusion.
* The cache as recorded: only the previous prompt's results; a fully cached re-run sends
  ``execution_cached`` with every node, no ``executing{node}``, and replays ``executed``
  with the OLD file names (no new file).
* ``execution_error`` for a corrupt input image, interrupts at the next node boundary
  (globally or by running prompt_id; a pending id is a no-op), ``/history``, ``/queue``,
  ``/interrupt``, ``/upload/image``, ``/view``, ``/system_stats``, ``/object_info``,
  ``/features``, ``/free``.

Test hooks (not in ComfyUI) live under ``/__double__/``:

* ``POST /__double__/reset``: forget queue, history, cache and hooks (files stay).
* ``POST /__double__/node_delay`` ``{"class_type": "ImageBlur", "seconds": 0.5}``.
* ``POST /__double__/drop_sockets`` ``{"at_node": "3"?, "refuse_s": 2.0?}``: close every
  websocket now, or when node "3" (an id or a class_type) starts; refuse new sockets for
  ``refuse_s`` seconds afterwards (so a client cannot reconnect in time).
* ``POST /__double__/stall_history`` ``{"seconds": 5}``: every ``/history`` answer waits.
* ``POST /__double__/crash`` ``{"at_node": "4"?}``: exit the process (``os._exit``) now or
  when that node starts; in a thread it stops the server instead.
* ``POST /__double__/fail_queue`` ``{"status": 500}``: ``GET /queue`` answers that status.
* ``POST /__double__/start_delay`` ``{"seconds": 1.0}``: a prompt taken off the queue (it
  shows as running) waits this long before it starts, the window in which ComfyUI loses an
  interrupt (``PromptExecutor.execute_async`` clears the flag when it starts).
* ``GET /__double__/state``: connected client ids, running prompt, queue length.

Run it: ``python -m tests.fakes.comfyui_double --port 8188 [--root DIR]``, or in-process
with :class:`DoubleServer` (a uvicorn server in a thread).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import mimetypes
import os
import random
import re
import string
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import uvicorn
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

__all__ = ["ComfyUIDouble", "DoubleServer", "main"]

DATA_DIR = Path(__file__).with_name("comfyui_data")
OBJECT_INFO: dict[str, Any] = json.loads((DATA_DIR / "object_info.json").read_text())
RECORDED: dict[str, Any] = json.loads((DATA_DIR / "recorded.json").read_text())
MAX_UPLOAD_SIZE = 104857600
FEATURES = {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE}
JSON_TYPE = "application/json; charset=utf-8"
SERVER_ERROR_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"
DEFAULT_NODE_DELAYS = {"ImageBlur": 1.0, "KSampler": 0.01}  # KSampler: per step
DEFAULT_CHECKPOINTS = ["v1-5-pruned-emaonly.safetensors"]
# SaveImageWebsocket declares IS_CHANGED = time: it is never taken from the cache.
NEVER_CACHED = {"SaveImageWebsocket"}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type=JSON_TYPE)


def _empty(status: int = 200) -> Response:
    return Response(b"", status_code=status)


class ProcessingInterrupted(Exception):  # named after ComfyUI's own
    """ComfyUI's InterruptProcessingException: raised at a node boundary."""


@dataclasses.dataclass
class QueueItem:
    number: int
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]

    @property
    def client_id(self) -> str | None:
        value = self.extra_data.get("client_id")
        return str(value) if value is not None else None

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]


@dataclasses.dataclass
class CacheEntry:
    values: tuple[Any, ...]
    ui: dict[str, Any] | None


@dataclasses.dataclass
class SocketConn:
    ws: WebSocket
    sid: str
    supports_preview_metadata: bool = False
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    async def send_json(self, message: dict[str, Any]) -> None:
        async with self.lock:
            with contextlib.suppress(Exception):
                await self.ws.send_text(json.dumps(message))

    async def send_bytes(self, payload: bytes) -> None:
        async with self.lock:
            with contextlib.suppress(Exception):
                await self.ws.send_bytes(payload)


@dataclasses.dataclass
class Hooks:
    drop_at_node: str | None = None
    refuse_sockets_s: float = 0.0
    refuse_sockets_until: float = 0.0
    stall_history_s: float = 0.0
    crash_at_node: str | None = None
    queue_status: int = 0  # GET /queue answers this status (a broken ComfyUI) when set
    start_delay_s: float = 0.0  # between taking a prompt off the queue and starting it


class NodeContext:
    """What a node function may use: its id, the prompt, and the socket of the prompt's client."""

    def __init__(
        self, double: ComfyUIDouble, item: QueueItem, node_id: str, progress_nodes: dict[str, Any]
    ) -> None:
        self.double = double
        self.item = item
        self.node_id = node_id
        self.progress_nodes = progress_nodes

    async def progress(self, value: int, maximum: int) -> None:
        """A progress-bar update: ``progress_state`` then ``progress`` (legacy order)."""
        self.double.check_interrupt()
        entry = self.progress_nodes[self.node_id]
        entry.update(value=value, max=maximum)
        await self.double.send_progress_state(self.item, self.progress_nodes)
        await self.double.send_to_client(
            self.item,
            "progress",
            {"value": value, "max": maximum, "prompt_id": self.item.prompt_id, "node": self.node_id},
        )


# --------------------------------------------------------------------------------------
# Pixels: IMAGE is float32 [batch, height, width, 3] in 0..1, MASK is [batch, height, width]
# --------------------------------------------------------------------------------------


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _from_pil(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _png_bytes(
    image: Image.Image, pnginfo: PngImagePlugin.PngInfo | None = None, compress_level: int = 4
) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo, compress_level=compress_level)
    return buffer.getvalue()


RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _scale(images: np.ndarray, method: str, width: int, height: int, crop: str) -> np.ndarray:
    batch, old_h, old_w, _ = images.shape
    if width == 0 and height == 0:
        return images
    if width == 0:
        width = max(1, round(old_w * height / old_h))
    if height == 0:
        height = max(1, round(old_h * width / old_w))
    result = []
    for index in range(batch):
        picture = _to_pil(images[index])
        if crop == "center":
            picture = ImageOps.fit(picture, (width, height), method=RESAMPLE[method])
        else:
            picture = picture.resize((width, height), RESAMPLE[method])
        result.append(_from_pil(picture))
    return np.stack(result)


def _prompt_colour(text: str) -> np.ndarray:
    digest = hashlib.sha256(text.encode()).digest()
    return np.array([digest[0], digest[1], digest[2]], dtype=np.float32) / 255.0


class ComfyUIDouble:
    """State and behaviour of one fake ComfyUI; ``app`` is its Starlette application."""

    def __init__(
        self,
        root: Path,
        *,
        node_delays: dict[str, float] | None = None,
        checkpoints: list[str] | None = None,
        exit_on_crash: bool = True,
    ) -> None:
        self.root = root
        self.dirs = {name: root / name for name in ("input", "output", "temp")}
        for directory in self.dirs.values():
            directory.mkdir(parents=True, exist_ok=True)
        self.default_node_delays = {**DEFAULT_NODE_DELAYS, **(node_delays or {})}
        self.node_delays = dict(self.default_node_delays)
        self.checkpoints = list(checkpoints or DEFAULT_CHECKPOINTS)
        self.exit_on_crash = exit_on_crash
        self.on_crash: Callable[[], None] | None = None
        self.sockets: dict[str, SocketConn] = {}
        self.pending: list[QueueItem] = []
        self.running: QueueItem | None = None
        self.current_node: str | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.cache: dict[str, CacheEntry] = {}
        self.number = 0
        self.interrupt_requested = False
        self.hooks = Hooks()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self.app = Starlette(routes=self._routes(), lifespan=self._lifespan)

    # --- plumbing ---------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> Any:
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._work())
        try:
            yield
        finally:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    def _routes(self) -> list[Route | WebSocketRoute]:
        return [
            WebSocketRoute("/ws", self.websocket),
            Route("/", self.index),
            Route("/prompt", self.post_prompt, methods=["POST"]),
            Route("/prompt", self.get_prompt, methods=["GET"]),
            Route("/history", self.get_history_all, methods=["GET"]),
            Route("/history", self.post_history, methods=["POST"]),
            Route("/history/{prompt_id:path}", self.get_history_one, methods=["GET"]),
            Route("/queue", self.get_queue, methods=["GET"]),
            Route("/queue", self.post_queue, methods=["POST"]),
            Route("/interrupt", self.post_interrupt, methods=["POST"]),
            Route("/free", self.post_free, methods=["POST"]),
            Route("/upload/image", self.upload_image, methods=["POST"]),
            Route("/view", self.view, methods=["GET"]),
            Route("/system_stats", self.system_stats, methods=["GET"]),
            Route("/features", self.features, methods=["GET"]),
            Route("/object_info", self.object_info_all, methods=["GET"]),
            Route("/object_info/{node_class}", self.object_info_one, methods=["GET"]),
            Route("/models", self.models, methods=["GET"]),
            Route("/embeddings", self.embeddings, methods=["GET"]),
            Route("/__double__/reset", self.hook_reset, methods=["POST"]),
            Route("/__double__/node_delay", self.hook_node_delay, methods=["POST"]),
            Route("/__double__/drop_sockets", self.hook_drop_sockets, methods=["POST"]),
            Route("/__double__/stall_history", self.hook_stall_history, methods=["POST"]),
            Route("/__double__/crash", self.hook_crash, methods=["POST"]),
            Route("/__double__/fail_queue", self.hook_fail_queue, methods=["POST"]),
            Route("/__double__/start_delay", self.hook_start_delay, methods=["POST"]),
            Route("/__double__/state", self.hook_state, methods=["GET"]),
        ]

    @property
    def queue_remaining(self) -> int:
        return len(self.pending) + (1 if self.running is not None else 0)

    async def broadcast(self, event: str, data: dict[str, Any]) -> None:
        for conn in list(self.sockets.values()):
            await conn.send_json({"type": event, "data": data})

    async def broadcast_status(self) -> None:
        await self.broadcast("status", {"status": {"exec_info": {"queue_remaining": self.queue_remaining}}})

    async def send_to_client(
        self, item: QueueItem, event: str, data: dict[str, Any], *, broadcast: bool = False
    ) -> None:
        """ComfyUI's ``send_sync(event, data, client_id)``: to that socket, or to all if no client id."""
        client_id = item.client_id
        if client_id is None:
            if broadcast:
                await self.broadcast(event, data)
            return
        conn = self.sockets.get(client_id)
        if conn is not None:
            await conn.send_json({"type": event, "data": data})

    async def send_progress_state(self, item: QueueItem, nodes: dict[str, Any]) -> None:
        # progress_state is sent with the prompt's client id, which broadcasts when there is none (s10).
        await self.send_to_client(
            item,
            "progress_state",
            {"prompt_id": item.prompt_id, "nodes": json.loads(json.dumps(nodes))},
            broadcast=True,
        )

    def check_interrupt(self) -> None:
        if self.interrupt_requested:
            self.interrupt_requested = False
            raise ProcessingInterrupted

    async def drop_all_sockets(self) -> None:
        for conn in list(self.sockets.values()):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1011)
        self.sockets.clear()
        if self.hooks.refuse_sockets_s > 0:
            self.hooks.refuse_sockets_until = time.monotonic() + self.hooks.refuse_sockets_s

    def crash(self) -> None:
        if self.exit_on_crash:
            os._exit(3)
        if self.on_crash is not None:
            self.on_crash()

    # --- websocket ---------------------------------------------------------------------
    async def websocket(self, ws: WebSocket) -> None:
        if time.monotonic() < self.hooks.refuse_sockets_until:
            await ws.close(code=1013)
            return
        await ws.accept()
        sid = ws.query_params.get("clientId") or uuid.uuid4().hex
        conn = SocketConn(ws, sid)
        self.sockets[sid] = conn
        await conn.send_json(
            {
                "type": "status",
                "data": {"status": {"exec_info": {"queue_remaining": self.queue_remaining}}, "sid": sid},
            }
        )
        if self.running is not None and self.running.client_id == sid and self.current_node is not None:
            await conn.send_json({"type": "executing", "data": {"node": self.current_node}})
        try:
            while True:
                text = await ws.receive_text()
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    message = json.loads(text)
                    if message.get("type") == "feature_flags":
                        conn.supports_preview_metadata = bool(
                            message["data"].get("supports_preview_metadata")
                        )
                        await conn.send_json({"type": "feature_flags", "data": dict(FEATURES)})
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if self.sockets.get(sid) is conn:
                del self.sockets[sid]

    # --- /prompt -------------------------------------------------------------------------
    async def post_prompt(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return PlainTextResponse(SERVER_ERROR_TEXT, status_code=500)
        if not isinstance(body, dict):
            return PlainTextResponse(SERVER_ERROR_TEXT, status_code=500)
        if "prompt" not in body:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return _json({"error": error, "node_errors": {}}, 400)
        prompt = body["prompt"]
        if not isinstance(prompt, dict):
            return PlainTextResponse(SERVER_ERROR_TEXT, status_code=500)
        number = -self.number if body.get("front") else self.number
        self.number += 1
        prompt_id = str(body["prompt_id"]) if "prompt_id" in body else str(uuid.uuid4())
        ok, error, outputs, node_errors = Validator(self, prompt).validate_prompt()
        extra_data = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not ok:
            return _json({"error": error, "node_errors": node_errors}, 400)
        self.pending.append(QueueItem(number, prompt_id, prompt, extra_data, outputs))
        self.pending.sort(key=lambda queued: queued.number)
        await self.broadcast_status()
        assert self._wakeup is not None
        self._wakeup.set()
        return _json({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def get_prompt(self, request: Request) -> Response:
        return _json({"exec_info": {"queue_remaining": self.queue_remaining}})

    # --- history / queue / interrupt ------------------------------------------------------
    async def _stall(self) -> None:
        if self.hooks.stall_history_s > 0:
            await asyncio.sleep(self.hooks.stall_history_s)

    async def get_history_all(self, request: Request) -> Response:
        await self._stall()
        items = list(self.history.items())
        max_items = request.query_params.get("max_items")
        if max_items is not None and max_items.isdigit():
            items = items[-int(max_items) :] if int(max_items) > 0 else []
        return _json(dict(items))

    async def get_history_one(self, request: Request) -> Response:
        await self._stall()
        prompt_id = request.path_params["prompt_id"]
        entry = self.history.get(prompt_id)
        return _json({prompt_id: entry} if entry is not None else {})

    async def post_history(self, request: Request) -> Response:
        body = await _json_body(request)
        if body.get("clear"):
            self.history.clear()
        for prompt_id in body.get("delete", []) or []:
            self.history.pop(str(prompt_id), None)
        return _empty()

    async def get_queue(self, request: Request) -> Response:
        if self.hooks.queue_status:
            return PlainTextResponse("500 Internal Server Error", status_code=self.hooks.queue_status)
        running = [self.running.as_list()] if self.running is not None else []
        return _json({"queue_running": running, "queue_pending": [item.as_list() for item in self.pending]})

    async def post_queue(self, request: Request) -> Response:
        body = await _json_body(request)
        if body.get("clear"):
            self.pending.clear()
        delete = {str(prompt_id) for prompt_id in body.get("delete", []) or []}
        if delete:
            self.pending = [item for item in self.pending if item.prompt_id not in delete]
        await self.broadcast_status()
        return _empty()

    async def post_interrupt(self, request: Request) -> Response:
        body = await _json_body(request)
        prompt_id = body.get("prompt_id")
        if prompt_id is None or (self.running is not None and self.running.prompt_id == str(prompt_id)):
            self.interrupt_requested = True
        # else: "not currently running, skipping interrupt" (a no-op, still 200)
        return _empty()

    async def post_free(self, request: Request) -> Response:
        return _empty()

    # --- upload / view ---------------------------------------------------------------------
    async def upload_image(self, request: Request) -> Response:
        fields = _parse_multipart(request.headers.get("content-type", ""), await request.body())
        image = fields.get("image")
        if image is None or image[0] is None:
            return _empty(400)
        filename, payload = image
        upload_type = _field_text(fields.get("type")) or "input"
        if upload_type not in self.dirs:
            return _empty(400)
        overwrite = _field_text(fields.get("overwrite")) in ("true", "1")
        subfolder = _field_text(fields.get("subfolder")) or ""
        base = self.dirs[upload_type].resolve()
        folder = (base / subfolder).resolve()
        if os.path.commonpath((str(base), str(folder))) != str(base):
            return _empty(400)
        filename = os.path.basename(filename)
        if not filename:
            return _empty(400)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / filename
        stem, suffix = os.path.splitext(filename)
        counter = 1
        duplicate = False
        if not overwrite:
            while target.exists():
                if target.read_bytes() == payload:
                    duplicate = True
                    break
                filename = f"{stem} ({counter}){suffix}"
                target = folder / filename
                counter += 1
        if not duplicate:
            target.write_bytes(payload)
        return _json({"name": filename, "subfolder": subfolder, "type": upload_type})

    async def view(self, request: Request) -> Response:
        params = request.query_params
        filename = params.get("filename", "")
        for annotation in (" [input]", " [output]", " [temp]"):
            filename = filename.removesuffix(annotation)
        if not filename or filename.startswith("/") or ".." in filename:
            return _empty(400)
        base_dir = self.dirs.get(params.get("type", "output"))
        if base_dir is None:
            return _empty(400)
        base = base_dir.resolve()
        folder = (base / params.get("subfolder", "")).resolve()
        if os.path.commonpath((str(base), str(folder))) != str(base):
            return _empty(403)
        path = folder / filename
        if not path.is_file():
            return _empty(404)
        headers = {"Content-Disposition": f'filename="{filename}"'}
        preview = params.get("preview")
        if preview:
            image_format, _, quality = preview.partition(";")
            image_format = "jpeg" if image_format not in ("webp", "jpeg") else image_format
            buffer = io.BytesIO()
            with Image.open(path) as picture:
                picture.convert("RGB").save(buffer, format=image_format.upper(), quality=int(quality or 90))
            return Response(buffer.getvalue(), media_type=f"image/{image_format}", headers=headers)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return Response(path.read_bytes(), media_type=content_type, headers=headers)

    # --- static-ish endpoints ----------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        return Response("<!doctype html><title>ComfyUI test double</title>", media_type="text/html")

    async def system_stats(self, request: Request) -> Response:
        stats = json.loads(json.dumps(RECORDED["system_stats"]))
        stats["system"]["argv"] = ["tests/fakes/comfyui_double.py", *sys.argv[1:]]
        stats["system"]["python_version"] = sys.version
        return _json(stats)

    async def features(self, request: Request) -> Response:
        return _json(dict(FEATURES))

    def node_info(self, node_class: str) -> dict[str, Any] | None:
        info = OBJECT_INFO.get(node_class)
        if info is None:
            return None
        info = json.loads(json.dumps(info))
        if node_class == "LoadImage":
            files = sorted(path.name for path in self.dirs["input"].iterdir() if path.is_file())
            info["input"]["required"]["image"] = [files, {"image_upload": True}]
        elif node_class == "CheckpointLoaderSimple":
            info["input"]["required"]["ckpt_name"][0] = list(self.checkpoints)
        return dict(info)

    async def object_info_all(self, request: Request) -> Response:
        return _json({name: self.node_info(name) for name in OBJECT_INFO})

    async def object_info_one(self, request: Request) -> Response:
        node_class = request.path_params["node_class"]
        info = self.node_info(node_class)
        return _json({node_class: info} if info is not None else {})

    async def models(self, request: Request) -> Response:
        return _json(["checkpoints", "loras", "vae", "upscale_models", "embeddings"])

    async def embeddings(self, request: Request) -> Response:
        return _json([])

    # --- test hooks -----------------------------------------------------------------------
    async def hook_reset(self, request: Request) -> Response:
        self.pending.clear()
        self.history.clear()
        self.cache.clear()
        self.hooks = Hooks()
        self.node_delays = dict(self.default_node_delays)
        self.interrupt_requested = self.running is not None
        return _json({"ok": True})

    async def hook_start_delay(self, request: Request) -> Response:
        self.hooks.start_delay_s = float((await _json_body(request))["seconds"])
        return _json({"ok": True})

    async def hook_node_delay(self, request: Request) -> Response:
        body = await _json_body(request)
        self.node_delays[str(body["class_type"])] = float(body["seconds"])
        return _json({"node_delays": self.node_delays})

    async def hook_drop_sockets(self, request: Request) -> Response:
        body = await _json_body(request)
        self.hooks.refuse_sockets_s = float(body.get("refuse_s", 0.0))
        if body.get("at_node"):
            self.hooks.drop_at_node = str(body["at_node"])
        else:
            await self.drop_all_sockets()
        return _json({"ok": True})

    async def hook_stall_history(self, request: Request) -> Response:
        body = await _json_body(request)
        self.hooks.stall_history_s = float(body.get("seconds", 0.0))
        return _json({"ok": True})

    async def hook_fail_queue(self, request: Request) -> Response:
        body = await _json_body(request)
        self.hooks.queue_status = int(body.get("status", 500))
        return _json({"ok": True})

    async def hook_crash(self, request: Request) -> Response:
        body = await _json_body(request)
        if body.get("at_node"):
            self.hooks.crash_at_node = str(body["at_node"])
            return _json({"ok": True})
        asyncio.get_running_loop().call_later(0.05, self.crash)
        return _json({"ok": True, "crashing": True})

    async def hook_state(self, request: Request) -> Response:
        return _json(
            {
                "sockets": sorted(self.sockets),
                "running": self.running.prompt_id if self.running else None,
                "current_node": self.current_node,
                "pending": [item.prompt_id for item in self.pending],
                "pid": os.getpid(),
            }
        )

    # --- execution --------------------------------------------------------------------------
    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            if not self.pending:
                self._wakeup.clear()
                continue
            item = self.pending.pop(0)
            self.running = item
            await self.broadcast_status()
            if self.hooks.start_delay_s:
                # ComfyUI's prompt_worker between PromptQueue.get() and execute(): running
                # already, and an interrupt sent now is cleared when execution starts.
                await asyncio.sleep(self.hooks.start_delay_s)
            try:
                entry = await self.execute(item)
            except Exception as exc:  # a bug in the double must not kill its worker
                entry = self._history_entry(item, {}, "error", [("double_bug", {"message": repr(exc)})])
            self.history.pop(item.prompt_id, None)
            self.history[item.prompt_id] = entry
            self.running = None
            self.current_node = None
            await self.broadcast_status()
            await self.send_to_client(item, "executing", {"node": None, "prompt_id": item.prompt_id})

    def _history_entry(
        self,
        item: QueueItem,
        outputs: dict[str, Any],
        status: str,
        messages: list[tuple[str, dict[str, Any]]],
    ) -> dict[str, Any]:
        return {
            "prompt": item.as_list(),
            "outputs": outputs,
            "status": {
                "status_str": status,
                "completed": status == "success",
                "messages": [[event, data] for event, data in messages],
            },
            "meta": {
                node_id: {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                }
                for node_id in outputs
            },
        }

    def _signatures(self, prompt: dict[str, Any]) -> dict[str, str]:
        signatures: dict[str, str] = {}

        def signature(node_id: str, depth: int = 0) -> str:
            if node_id in signatures:
                return signatures[node_id]
            node = prompt[node_id]
            parts: dict[str, Any] = {}
            for name, value in sorted(node.get("inputs", {}).items()):
                if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt and depth < 500:
                    parts[name] = [signature(str(value[0]), depth + 1), value[1]]
                else:
                    parts[name] = value
            text = json.dumps([node["class_type"], parts], sort_keys=True, default=str)
            signatures[node_id] = hashlib.sha256(text.encode()).hexdigest()
            return signatures[node_id]

        for node_id in prompt:
            signature(node_id)
        return signatures

    @staticmethod
    def _execution_order(prompt: dict[str, Any], outputs: list[str]) -> list[str]:
        needed: set[str] = set()
        stack = list(outputs)
        while stack:
            node_id = stack.pop()
            if node_id in needed:
                continue
            needed.add(node_id)
            for value in prompt[node_id].get("inputs", {}).values():
                if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                    stack.append(str(value[0]))

        def deps(node_id: str) -> set[str]:
            return {
                str(value[0])
                for value in prompt[node_id].get("inputs", {}).values()
                if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt
            }

        order: list[str] = []
        done: set[str] = set()
        remaining = sorted(needed, key=_node_sort_key)
        while remaining:
            ready = next(node_id for node_id in remaining if deps(node_id) <= done)
            order.append(ready)
            done.add(ready)
            remaining.remove(ready)
        return order

    async def execute(self, item: QueueItem) -> dict[str, Any]:
        self.interrupt_requested = False  # PromptExecutor.execute resets the flag at the start
        prompt = item.prompt
        messages: list[tuple[str, dict[str, Any]]] = []

        async def add_message(event: str, data: dict[str, Any], *, broadcast: bool) -> None:
            data = {**data, "timestamp": _now_ms()}
            messages.append((event, data))
            await self.send_to_client(item, event, data, broadcast=broadcast)

        await add_message("execution_start", {"prompt_id": item.prompt_id}, broadcast=False)
        signatures = self._signatures(prompt)
        cached = [
            node_id
            for node_id in prompt
            if signatures[node_id] in self.cache and prompt[node_id]["class_type"] not in NEVER_CACHED
        ]
        await add_message("execution_cached", {"nodes": cached, "prompt_id": item.prompt_id}, broadcast=False)
        order = self._execution_order(prompt, item.outputs_to_execute)
        if all(node_id in cached for node_id in order):
            # A fully cached run replays the output nodes in outputs_to_execute order (s04).
            order = list(item.outputs_to_execute)
        values: dict[str, tuple[Any, ...]] = {}
        ui_outputs: dict[str, Any] = {}
        progress_nodes: dict[str, dict[str, Any]] = {}
        executed: list[str] = []
        # Everything this prompt found in the cache stays cached, visited or not.
        new_cache = {signatures[node_id]: self.cache[signatures[node_id]] for node_id in cached}
        node_id = ""
        try:
            for node_id in order:
                class_type = prompt[node_id]["class_type"]
                if node_id in cached:
                    entry = self.cache[signatures[node_id]]
                    new_cache[signatures[node_id]] = entry
                    values[node_id] = entry.values
                    if entry.ui is not None:
                        ui_outputs[node_id] = entry.ui
                        await self._send_executed(item, node_id, entry.ui)
                        progress_nodes[node_id] = _progress_entry(item, node_id, 1, 1, "finished")
                        await self.send_progress_state(item, progress_nodes)
                    continue
                self.check_interrupt()
                progress_nodes[node_id] = _progress_entry(item, node_id, 0.0, 1.0, "running")
                await self.send_progress_state(item, progress_nodes)
                self.current_node = node_id
                await self.send_to_client(
                    item, "executing", {"node": node_id, "display_node": node_id, "prompt_id": item.prompt_id}
                )
                await self._run_hooks(node_id, class_type)
                if class_type != "KSampler" and self.node_delays.get(class_type, 0) > 0:
                    await asyncio.sleep(self.node_delays[class_type])
                inputs = self._gather_inputs(prompt, node_id, values)
                context = NodeContext(self, item, node_id, progress_nodes)
                result, ui = await NODES[class_type](context, **inputs)
                values[node_id] = result
                executed.append(node_id)
                if ui is not None:
                    ui_outputs[node_id] = ui
                    await self._send_executed(item, node_id, ui)
                progress_nodes[node_id].update(value=progress_nodes[node_id]["max"], state="finished")
                if progress_nodes[node_id]["max"] == 1.0:
                    progress_nodes[node_id]["value"] = 1.0
                await self.send_progress_state(item, progress_nodes)
                if class_type not in NEVER_CACHED:
                    new_cache[signatures[node_id]] = CacheEntry(result, ui)
            await add_message("execution_success", {"prompt_id": item.prompt_id}, broadcast=False)
            status = "success"
        except ProcessingInterrupted:
            data = {
                "prompt_id": item.prompt_id,
                "node_id": node_id,
                "node_type": prompt[node_id]["class_type"],
                "executed": executed,
            }
            await add_message("execution_interrupted", data, broadcast=True)
            status = "error"
        except Exception as exc:
            data = {
                "prompt_id": item.prompt_id,
                "node_id": node_id,
                "node_type": prompt[node_id]["class_type"],
                "executed": executed,
                "exception_message": f"{exc}\n",
                "exception_type": _full_type_name(type(exc)),
                "traceback": _traceback_for(exc),
                "current_inputs": {
                    name: [
                        value if isinstance(value, int | float | str | bool) or value is None else str(value)
                    ]
                    for name, value in prompt[node_id].get("inputs", {}).items()
                    if not isinstance(value, list)
                },
                "current_outputs": list(prompt),
            }
            await add_message("execution_error", data, broadcast=False)
            status = "error"
        finally:
            self.cache = new_cache
        return self._history_entry(item, ui_outputs, status, messages)

    async def _send_executed(self, item: QueueItem, node_id: str, ui: dict[str, Any]) -> None:
        await self.send_to_client(
            item,
            "executed",
            {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": item.prompt_id},
        )

    async def _run_hooks(self, node_id: str, class_type: str) -> None:
        if self.hooks.crash_at_node in (node_id, class_type):
            self.hooks.crash_at_node = None
            self.crash()
            await asyncio.sleep(3600)  # in-thread mode: the server is going away
        if self.hooks.drop_at_node in (node_id, class_type):
            self.hooks.drop_at_node = None
            await self.drop_all_sockets()

    def _gather_inputs(
        self, prompt: dict[str, Any], node_id: str, values: dict[str, tuple[Any, ...]]
    ) -> dict[str, Any]:
        node = prompt[node_id]
        class_type = node["class_type"]
        config = {
            **OBJECT_INFO[class_type]["input"].get("required", {}),
            **OBJECT_INFO[class_type]["input"].get("optional", {}),
        }
        inputs: dict[str, Any] = {}
        for name, value in node.get("inputs", {}).items():
            if name not in config:
                continue
            if isinstance(value, list) and len(value) == 2:
                inputs[name] = values[str(value[0])][int(value[1])]
            else:
                inputs[name] = _convert(config[name][0], value)
        hidden = OBJECT_INFO[class_type]["input"].get("hidden", {})
        if "prompt" in hidden:
            inputs["prompt"] = prompt
        if "extra_pnginfo" in hidden:
            inputs["extra_pnginfo"] = self.running.extra_data.get("extra_pnginfo") if self.running else None
        return inputs

    # --- files -----------------------------------------------------------------------------
    def resolve_input(self, name: str) -> Path | None:
        kind = "input"
        for annotation in ("input", "output", "temp"):
            if name.endswith(f" [{annotation}]"):
                name, kind = name.removesuffix(f" [{annotation}]"), annotation
        base = self.dirs[kind].resolve()
        path = (base / name).resolve()
        if os.path.commonpath((str(base), str(path))) != str(base) or not path.is_file():
            return None
        return path

    def save_images(
        self,
        images: np.ndarray,
        filename_prefix: str,
        kind: str,
        prompt: dict[str, Any] | None,
        extra_pnginfo: dict[str, Any] | None,
    ) -> list[dict[str, str]]:
        subfolder, _, prefix = filename_prefix.rpartition("/")
        folder = self.dirs[kind] / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(re.escape(prefix) + r"_(\d{5})_\.png$")
        existing = [int(match.group(1)) for path in folder.iterdir() if (match := pattern.match(path.name))]
        counter = max(existing, default=0) + 1
        results = []
        for index in range(images.shape[0]):
            info = PngImagePlugin.PngInfo()
            if prompt is not None:
                info.add_text("prompt", json.dumps(prompt))
            for key, value in (extra_pnginfo or {}).items():
                info.add_text(key, json.dumps(value))
            filename = f"{prefix}_{counter:05}_.png"
            (folder / filename).write_bytes(_png_bytes(_to_pil(images[index]), info))
            results.append({"filename": filename, "subfolder": subfolder, "type": kind})
            counter += 1
        return results


def _node_sort_key(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (sys.maxsize, node_id)


def _progress_entry(
    item: QueueItem, node_id: str, value: float, maximum: float, state: str
) -> dict[str, Any]:
    return {
        "value": value,
        "max": maximum,
        "state": state,
        "node_id": node_id,
        "prompt_id": item.prompt_id,
        "display_node_id": node_id,
        "parent_node_id": None,
        "real_node_id": node_id,
    }


def _validation_exception(kind: str, message: str, exc: Exception, **extra_info: Any) -> dict[str, Any]:
    """A validation reason for a validator that raised (execution.py's two shapes: the
    output node's own, and a linked input's, which carries more extra_info)."""
    return {"type": kind, "message": message, "details": str(exc), "extra_info": extra_info}


def _full_type_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _traceback_for(exc: BaseException) -> list[str]:
    import traceback

    if type(exc).__name__ == "UnidentifiedImageError":
        return list(RECORDED["execution_error_load_image"])
    return traceback.format_tb(exc.__traceback__)


def _convert(input_type: Any, value: Any) -> Any:
    if input_type == "INT":
        return int(value)
    if input_type == "FLOAT":
        return float(value)
    if input_type == "STRING":
        return str(value)
    if input_type == "BOOLEAN":
        return bool(value)
    return value


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    with contextlib.suppress(ValueError):
        body = json.loads(raw)
        if isinstance(body, dict):
            return body
    return {}


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``name -> (filename, bytes)``; the stdlib's MIME parser, since python-multipart is absent."""
    if not content_type.startswith("multipart/form-data"):
        return {}
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


def _field_text(field: tuple[str | None, bytes] | None) -> str | None:
    return field[1].decode(errors="replace") if field is not None else None


# --------------------------------------------------------------------------------------
# Validation: ComfyUI's validate_prompt / validate_inputs, rule for rule
# --------------------------------------------------------------------------------------


def _input_config(spec: list[Any]) -> list[Any]:
    return [spec[0], spec[1] if len(spec) > 1 else {}]


def _types_match(received: Any, expected: Any) -> bool:
    if isinstance(expected, list) or expected == "COMBO":
        return received in ("COMBO", "STRING", "*") or isinstance(received, list)
    if received == expected or "*" in (received, expected):
        return True
    received_set = {part.strip() for part in str(received).split(",")}
    expected_set = {part.strip() for part in str(expected).split(",")}
    return expected_set.issuperset(received_set)


class Validator:
    def __init__(self, double: ComfyUIDouble, prompt: dict[str, Any]) -> None:
        self.double = double
        self.prompt = prompt
        self.validated: dict[str, tuple[bool, list[dict[str, Any]], str]] = {}

    def validate_prompt(self) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
        outputs: list[str] = []
        for node_id, node in self.prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return (
                    False,
                    _invalid("Cannot execute because a node is missing the class_type property.", node_id),
                    [],
                    {},
                )
            info = self.double.node_info(str(node["class_type"]))
            if info is None:
                return (
                    False,
                    _invalid(f"Cannot execute because node {node['class_type']} does not exist.", node_id),
                    [],
                    {},
                )
            if info.get("output_node"):
                outputs.append(node_id)
        if not outputs:
            return (
                False,
                {
                    "type": "prompt_no_outputs",
                    "message": "Prompt has no outputs",
                    "details": "",
                    "extra_info": {},
                },
                [],
                {},
            )
        good_outputs: list[str] = []
        failed: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        for output in outputs:
            try:
                valid, reasons, _ = self.validate_inputs(output)
            except Exception as exc:
                valid = False
                reasons = [
                    _validation_exception(
                        "exception_during_validation",
                        "Exception when validating node",
                        exc,
                        exception_type=_full_type_name(type(exc)),
                        traceback=_outer_traceback(exc),
                    )
                ]
                self.validated[output] = (False, reasons, output)
            if valid:
                good_outputs.append(output)
                continue
            if reasons:
                failed.append((output, reasons))
            for node_id, (node_valid, node_reasons, _) in self.validated.items():
                if not node_valid and node_reasons:
                    if node_id not in node_errors:
                        node_errors[node_id] = {
                            "errors": node_reasons,
                            "dependent_outputs": [],
                            "class_type": self.prompt[node_id]["class_type"],
                        }
                    node_errors[node_id]["dependent_outputs"].append(output)
        if not good_outputs:
            details = "\n".join(
                f"{error['message']}: {error['details']}" for _, errors in failed for error in errors
            )
            error = {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": details,
                "extra_info": {},
            }
            return False, error, [], node_errors
        # ComfyUI returns a set here: its order is not the execution order (s04: 4, 5, 7, 2).
        ordered = sorted(good_outputs, key=_node_sort_key)
        return True, None, ordered[1:] + ordered[:1], node_errors

    def validate_inputs(self, node_id: str) -> tuple[bool, list[dict[str, Any]], str]:
        if node_id in self.validated:
            return self.validated[node_id]
        node = self.prompt[node_id]
        inputs = node.get("inputs", {})
        class_type = node["class_type"]
        info = self.double.node_info(class_type)
        assert info is not None
        required = info["input"].get("required", {})
        optional = info["input"].get("optional", {})
        order = info.get("input_order", {})
        names = list(order.get("required", list(required))) + list(order.get("optional", list(optional)))
        errors: list[dict[str, Any]] = []
        valid = True
        custom_validated = {"image"} if class_type == "LoadImage" else set()
        for name in names:
            spec = required.get(name) or optional.get(name)
            input_type = spec[0]
            extra = spec[1] if len(spec) > 1 else {}
            config = _input_config(spec)
            if name not in inputs:
                if name in required:
                    errors.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": name,
                            "extra_info": {"input_name": name},
                        }
                    )
                continue
            value = inputs[name]
            if isinstance(value, list):
                if len(value) != 2:
                    errors.append(
                        {
                            "type": "bad_linked_input",
                            "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            "details": name,
                            "extra_info": {
                                "input_name": name,
                                "input_config": config,
                                "received_value": value,
                            },
                        }
                    )
                    continue
                linked_id = value[0]
                linked_class = self.prompt[linked_id][
                    "class_type"
                ]  # KeyError for a missing node, as in ComfyUI
                linked_info = self.double.node_info(linked_class) or {"output": []}
                received_type = tuple(linked_info["output"])[value[1]]  # IndexError for a bad slot
                if not _types_match(received_type, input_type):
                    errors.append(
                        {
                            "type": "return_type_mismatch",
                            "message": "Return type mismatch between linked nodes",
                            "details": (
                                f"{name}, received_type({received_type}) mismatch input_type({input_type})"
                            ),
                            "extra_info": {
                                "input_name": name,
                                "input_config": config,
                                "received_type": received_type,
                                "linked_node": value,
                            },
                        }
                    )
                    continue
                try:
                    result = self.validate_inputs(str(linked_id))
                    if result[0] is False:
                        valid = False
                        continue
                except Exception as exc:
                    valid = False
                    reasons = [
                        _validation_exception(
                            "exception_during_inner_validation",
                            "Exception when validating inner node",
                            exc,
                            input_name=name,
                            input_config=config,
                            exception_message=str(exc),
                            exception_type=_full_type_name(type(exc)),
                            traceback=_inner_traceback(exc),
                            linked_node=value,
                        )
                    ]
                    self.validated[str(linked_id)] = (False, reasons, str(linked_id))
                    continue
                continue
            try:
                value = _convert(input_type, value)
            except Exception as exc:
                errors.append(
                    {
                        "type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {input_type} value",
                        "details": f"{name}, {value}, {exc}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": config,
                            "received_value": value,
                            "exception_message": str(exc),
                        },
                    }
                )
                continue
            if name in custom_validated:
                continue
            out_of_range = _out_of_range(value, extra)
            if out_of_range is not None:
                error_type, how = out_of_range
                errors.append(
                    {
                        "type": error_type,
                        "message": f"Value {value} {how}",
                        "details": name,
                        "extra_info": {"input_name": name, "input_config": config, "received_value": value},
                    }
                )
                continue
            options = (
                input_type
                if isinstance(input_type, list)
                else extra.get("options")
                if input_type == "COMBO"
                else None
            )
            if options is not None and value not in options:
                list_info: str = str(options)
                combo_config: Any = config
                if len(options) > 20:
                    list_info, combo_config = f"(list of length {len(options)})", None
                errors.append(
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": f"{name}: '{value}' not in {list_info}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": combo_config,
                            "received_value": value,
                        },
                    }
                )
                continue
        if class_type == "LoadImage" and "image" in inputs and not isinstance(inputs["image"], list):
            image = str(inputs["image"])
            if self.double.resolve_input(image) is None:
                errors.append(
                    {
                        "type": "custom_validation_failed",
                        "message": "Custom validation failed for node",
                        "details": f"image - Invalid image file: {image}",
                        "extra_info": {"input_name": "image"},
                    }
                )
        result = (False, errors, node_id) if errors or not valid else (True, [], node_id)
        self.validated[node_id] = result
        return result


def _invalid(message: str, node_id: str) -> dict[str, Any]:
    return {
        "type": "invalid_prompt",
        "message": message,
        "details": f"Node ID '#{node_id}'",
        "extra_info": {},
    }


def _inner_traceback(exc: BaseException) -> list[str]:
    key = "validation_inner_index_error" if isinstance(exc, IndexError) else "validation_inner_key_error"
    return list(RECORDED[key])


def _outer_traceback(exc: BaseException) -> list[str]:
    frames = list(RECORDED["validation_outer"])
    if isinstance(exc, IndexError):
        frames[-1] = RECORDED["validation_inner_index_error"][-1]
    return frames


# --------------------------------------------------------------------------------------
# Nodes. Each returns (outputs tuple, ui dict or None).
# --------------------------------------------------------------------------------------

NodeResult = tuple[tuple[Any, ...], dict[str, Any] | None]
NodeFunction = Callable[..., Awaitable[NodeResult]]


async def _empty_image(ctx: NodeContext, width: int, height: int, batch_size: int, color: int) -> NodeResult:
    rgb = np.array([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF], dtype=np.float32) / 255.0
    return (np.broadcast_to(rgb, (batch_size, height, width, 3)).copy(),), None


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with Image.open(path) as picture:
        picture = ImageOps.exif_transpose(picture)
        rgb = _from_pil(picture)
        if "A" in picture.getbands():
            mask = 1.0 - np.asarray(picture.getchannel("A"), dtype=np.float32) / 255.0
        else:
            mask = np.zeros((64, 64), dtype=np.float32)
    return rgb[None], mask[None]


async def _load_image(ctx: NodeContext, image: str) -> NodeResult:
    path = ctx.double.resolve_input(image)
    if path is None:
        raise FileNotFoundError(image)
    rgb, mask = await asyncio.to_thread(_load, path)
    return (rgb, mask), None


async def _image_invert(ctx: NodeContext, image: np.ndarray) -> NodeResult:
    return (1.0 - image,), None


async def _image_scale(
    ctx: NodeContext, image: np.ndarray, upscale_method: str, width: int, height: int, crop: str
) -> NodeResult:
    return (await asyncio.to_thread(_scale, image, upscale_method, width, height, crop),), None


async def _image_add_noise(ctx: NodeContext, image: np.ndarray, seed: int, strength: float) -> NodeResult:
    noise = np.random.default_rng(seed).standard_normal(image.shape).astype(np.float32)
    return (np.clip(image + noise * strength, 0.0, 1.0),), None


async def _image_blur(ctx: NodeContext, image: np.ndarray, blur_radius: int, sigma: float) -> NodeResult:
    def blur() -> np.ndarray:
        return np.stack(
            [_from_pil(_to_pil(frame).filter(ImageFilter.GaussianBlur(sigma))) for frame in image]
        )

    return (await asyncio.to_thread(blur),), None


async def _save_image(
    ctx: NodeContext,
    images: np.ndarray,
    filename_prefix: str = "ComfyUI",
    prompt: dict[str, Any] | None = None,
    extra_pnginfo: dict[str, Any] | None = None,
) -> NodeResult:
    results = await asyncio.to_thread(
        ctx.double.save_images, images, filename_prefix, "output", prompt, extra_pnginfo
    )
    return (), {"images": results}


async def _preview_image(
    ctx: NodeContext,
    images: np.ndarray,
    prompt: dict[str, Any] | None = None,
    extra_pnginfo: dict[str, Any] | None = None,
) -> NodeResult:
    prefix = "ComfyUI_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    results = await asyncio.to_thread(ctx.double.save_images, images, prefix, "temp", prompt, extra_pnginfo)
    return (), {"images": results}


async def _save_animated_png(
    ctx: NodeContext,
    images: np.ndarray,
    filename_prefix: str,
    fps: float,
    compress_level: int,
    prompt: dict[str, Any] | None = None,
    extra_pnginfo: dict[str, Any] | None = None,
) -> NodeResult:
    subfolder, _, prefix = filename_prefix.rpartition("/")
    folder = ctx.double.dirs["output"] / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    counter = 1 + sum(1 for path in folder.glob(f"{prefix}_*_.png"))
    filename = f"{prefix}_{counter:05}_.png"
    frames = [_to_pil(frame) for frame in images]
    frames[0].save(
        folder / filename,
        save_all=True,
        append_images=frames[1:],
        duration=int(1000 / fps),
        compress_level=compress_level,
    )
    # As in ComfyUI: "animated" is a list of booleans, not of files.
    return (), {
        "images": [{"filename": filename, "subfolder": subfolder, "type": "output"}],
        "animated": [True],
    }


async def _get_image_size(ctx: NodeContext, image: np.ndarray) -> NodeResult:
    batch, height, width, _ = image.shape
    text = f"width: {width}, height: {height}\n batch size: {batch}"
    node = ctx.node_id.encode()
    frame = struct.pack(">II", 3, len(node)) + node + text.encode()
    client_id = ctx.item.client_id
    conn = ctx.double.sockets.get(client_id) if client_id is not None else None
    if conn is not None:
        await conn.send_bytes(frame)
    return (width, height, batch), None


async def _preview_any(ctx: NodeContext, source: Any) -> NodeResult:
    if isinstance(source, str | int | float | bool):
        text = str(source)
    else:
        try:
            text = json.dumps(source, indent=4)
        except TypeError:
            text = str(source)
    return (), {"text": [text]}


async def _save_image_websocket(ctx: NodeContext, images: np.ndarray) -> NodeResult:
    total = images.shape[0]
    ctx.progress_nodes[ctx.node_id].update(value=0, max=total)
    client_id = ctx.item.client_id
    for step in range(total):
        png = _png_bytes(_to_pil(images[step]))
        conn = ctx.double.sockets.get(client_id) if client_id is not None else None
        ctx.progress_nodes[ctx.node_id].update(value=step, max=total)
        await ctx.double.send_progress_state(ctx.item, ctx.progress_nodes)
        progress = {"value": step, "max": total, "prompt_id": ctx.item.prompt_id, "node": ctx.node_id}
        if conn is not None and conn.supports_preview_metadata:
            metadata = json.dumps(
                {
                    "node_id": ctx.node_id,
                    "prompt_id": ctx.item.prompt_id,
                    "display_node_id": ctx.node_id,
                    "parent_node_id": None,
                    "real_node_id": ctx.node_id,
                    "image_type": "image/png",
                }
            ).encode()
            await conn.send_bytes(struct.pack(">II", 4, len(metadata)) + metadata + png)
            await ctx.double.send_to_client(ctx.item, "progress", progress)
        else:
            await ctx.double.send_to_client(ctx.item, "progress", progress)
            if conn is not None:
                await conn.send_bytes(struct.pack(">II", 1, 2) + png)
    ctx.progress_nodes[ctx.node_id].update(value=total, max=total)
    return (), None


# --- stand-in "model" nodes: deterministic, weight-free, NOT diffusion ------------------------


async def _checkpoint_loader(ctx: NodeContext, ckpt_name: str) -> NodeResult:
    return ({"model": ckpt_name}, {"clip": ckpt_name}, {"vae": ckpt_name}), None


async def _clip_text_encode(ctx: NodeContext, text: str, clip: dict[str, str]) -> NodeResult:
    return ({"text": text, "colour": _prompt_colour(text)},), None


async def _empty_latent(ctx: NodeContext, width: int, height: int, batch_size: int) -> NodeResult:
    return ({"samples": np.zeros((batch_size, height // 8, width // 8, 3), dtype=np.float32)},), None


async def _ksampler(
    ctx: NodeContext,
    model: dict[str, str],
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: dict[str, Any],
    negative: dict[str, Any],
    latent_image: dict[str, np.ndarray],
    denoise: float = 1.0,
) -> NodeResult:
    samples = latent_image["samples"]
    batch, height, width, _ = samples.shape
    generator = np.random.default_rng(seed % 2**63)
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, None, :, None]
    picture = np.clip(
        0.25 + 0.5 * positive["colour"] * ramp + 0.05 * generator.random((batch, height, width, 3)), 0, 1
    )
    picture = picture.astype(np.float32)
    for step in range(steps):
        if ctx.double.node_delays.get("KSampler", 0) > 0:
            await asyncio.sleep(ctx.double.node_delays["KSampler"])
        await ctx.progress(step + 1, steps)
    result = denoise * picture + (1.0 - denoise) * samples
    return ({"samples": result.astype(np.float32)},), None


async def _vae_decode(ctx: NodeContext, samples: dict[str, np.ndarray], vae: dict[str, str]) -> NodeResult:
    latent = samples["samples"]
    return (np.repeat(np.repeat(latent, 8, axis=1), 8, axis=2),), None


async def _vae_encode(ctx: NodeContext, pixels: np.ndarray, vae: dict[str, str]) -> NodeResult:
    batch, height, width, _ = pixels.shape
    cropped = pixels[:, : height // 8 * 8, : width // 8 * 8, :]
    latent = cropped.reshape(batch, height // 8, 8, width // 8, 8, 3).mean(axis=(2, 4))
    return ({"samples": latent.astype(np.float32)},), None


NODES: dict[str, NodeFunction] = {
    "EmptyImage": _empty_image,
    "LoadImage": _load_image,
    "ImageInvert": _image_invert,
    "ImageScale": _image_scale,
    "ImageAddNoise": _image_add_noise,
    "ImageBlur": _image_blur,
    "SaveImage": _save_image,
    "PreviewImage": _preview_image,
    "SaveAnimatedPNG": _save_animated_png,
    "GetImageSize": _get_image_size,
    "PreviewAny": _preview_any,
    "SaveImageWebsocket": _save_image_websocket,
    "CheckpointLoaderSimple": _checkpoint_loader,
    "CLIPTextEncode": _clip_text_encode,
    "EmptyLatentImage": _empty_latent,
    "KSampler": _ksampler,
    "VAEDecode": _vae_decode,
    "VAEEncode": _vae_encode,
}


# --------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------


class DoubleServer:
    """The double in a background thread of this process (uvicorn on 127.0.0.1)."""

    def __init__(self, root: Path, *, port: int = 0, **double_kwargs: Any) -> None:
        self.double = ComfyUIDouble(root, exit_on_crash=False, **double_kwargs)
        self.double.on_crash = self._crash
        config = uvicorn.Config(
            self.double.app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="comfyui-double", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> DoubleServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError("the ComfyUI double did not start")
            time.sleep(0.02)
        return self

    def _crash(self) -> None:
        self.server.should_exit = True
        self.server.force_exit = True

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> DoubleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if TYPE_CHECKING:
    from tests.servers import ServerProcess

REPO = Path(__file__).resolve().parents[2]


def _out_of_range(value: Any, extra: dict[str, Any]) -> tuple[str, str] | None:
    """ComfyUI's min/max check of a number input: (error type, how it is out), or None."""
    if "min" in extra and value < extra["min"]:
        return "value_smaller_than_min", f"smaller than min of {extra['min']}"
    if "max" in extra and value > extra["max"]:
        return "value_bigger_than_max", f"bigger than max of {extra['max']}"
    return None


def command(port: int, root: Path) -> list[str]:
    """The command line that serves the double on 127.0.0.1:``port`` with its files in ``root``."""
    return [sys.executable, "-m", "tests.fakes.comfyui_double", "--port", str(port), "--root", str(root)]


def start(
    root: Path, *, port: int = 0, name: str = "comfyui-double", log_dir: Path | None = None
) -> ServerProcess:
    """The one launcher of the double as a subprocess (tests and benchmarks): a
    ``tests.servers.ServerProcess`` once ``/system_stats`` answers."""
    from tests.servers import free_port, start_server  # the double itself needs neither

    port = port or free_port()
    return start_server(
        name,
        command(port, root),
        url=f"http://127.0.0.1:{port}",
        log_dir=log_dir or root.parent,
        health_path="/system_stats",
        timeout_s=60,
        cwd=REPO,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="ComfyUI 0.3.64 test double (tests only; never shipped)")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--listen", "--host", dest="host", default="127.0.0.1")
    parser.add_argument(
        "--root", type=Path, default=None, help="folder for input/, output/, temp/ (default: a temp dir)"
    )
    parser.add_argument(
        "--checkpoint", action="append", default=None, help="a fake checkpoint name (repeatable)"
    )
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="comfyui-double-"))
    double = ComfyUIDouble(root, checkpoints=args.checkpoint)
    uvicorn.run(double.app, host=args.host, port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
