"""The ComfyUI engine: run an API-format workflow on a ComfyUI server and collect its outputs.

ComfyUI's protocol has traps (recorded in /work/shared/comfyui/PROTOCOL.md §7), and this
module is shaped by them:

* Execution messages go only to the websocket whose ``clientId`` the prompt was posted
  with, and nothing is buffered: the socket is connected BEFORE the POST, the client id
  is unique per runner process (ComfyUI keeps one socket per id, a second runner with
  the same id would steal the first one's messages), and a dropped socket is reconnected.
* A prompt is finished when ``executing`` arrives with ``node: null`` and OUR prompt_id;
  the terminal event before it (``execution_success`` / ``_error`` / ``_interrupted``)
  decides the outcome. Because websockets drop events on long jobs, completion is raced
  against a slow ``/history/{id}`` poll, so a lost socket never hangs a job.
* A fully cached re-run sends no ``executing{node}`` and replays ``executed`` with the
  OLD file names: those files still exist on the server and are valid outputs.
* A 200 answer can carry ``node_errors`` (one output node valid, another broken): the
  valid part is already queued, so the prompt is deleted/interrupted and the job fails;
  a workflow must not run half.

Errors follow shared/errors.py: a 400 validation answer is ``JobFailed`` with code
``comfyui_validation_failed`` and a message naming node, class, input and reason; a
runtime ``execution_error`` is ``JobFailed`` ``comfyui_execution_error``; an unreachable or
dead ComfyUI is ``UpstreamUnavailable`` (``comfyui_unavailable``, retried); no
``COMFYUI_URL`` is ``JobFailed`` ``comfyui_not_configured``, raised at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import mimetypes
import re
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

import filetype
import httpx
import websockets
from PIL import Image

from gpu_runner.engines.base import Engine, EngineOutput, EngineResult, PreparedJob, ProgressCallback
from shared.errors import JobCancelled, JobFailed, TransientError, UpstreamUnavailable
from shared.logs import get_logger, log_event
from shared.settings import Settings
from shared.tasks import Progress, Task

__all__ = [
    "OUTPUT_FILE_KEYS",
    "ComfyUIClient",
    "ComfyUIEngine",
    "FetchedFile",
    "InputFetcher",
    "OutputFile",
    "PromptProgress",
    "PromptResult",
    "UploadedImage",
]

logger = get_logger(__name__)

# Keys of an ``executed`` output that list files; ``animated`` holds booleans in core nodes
# (SaveAnimatedPNG/WEBP) but lists of files in some custom nodes, so entries are checked.
OUTPUT_FILE_KEYS: Final = ("images", "gifs", "videos", "animated", "audio")
UPLOAD_SUBFOLDER: Final = "comfyswap"
_TERMINAL_EVENTS: Final = frozenset({"execution_success", "execution_error", "execution_interrupted"})
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------------------
# The fetcher interface the engine needs (shared.safe_fetch.SafeFetcher satisfies it)
# --------------------------------------------------------------------------------------


class FetchedFile(Protocol):
    """What the engine reads from a fetched input."""

    @property
    def path(self) -> Path: ...

    @property
    def content_type(self) -> str: ...


class InputFetcher(Protocol):
    """Downloads an input URL into a directory, refusing unsafe URLs and non-images."""

    async def fetch_to_file(
        self, url: str, dest_dir: Path, *, field: str, allowed_kinds: frozenset[str] = ...
    ) -> FetchedFile: ...


# --------------------------------------------------------------------------------------
# Values the client returns
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UploadedImage:
    """The answer of ``/upload/image``: ComfyUI may rename the file (``name (1).png``)."""

    name: str
    subfolder: str
    type: str

    @property
    def load_image_value(self) -> str:
        """What LoadImage's ``image`` input must say: ``subfolder/name`` for a sub-folder (s12)."""
        return f"{self.subfolder}/{self.name}" if self.subfolder else self.name


@dataclasses.dataclass(frozen=True)
class OutputFile:
    """One file an output node reported; it lives on the ComfyUI server until downloaded."""

    node_id: str
    key: str  # images | gifs | videos | animated | audio
    filename: str
    subfolder: str
    type: str  # output | temp | input
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PromptProgress:
    """Progress of one prompt: nodes finished (plus the running node's fraction) of all to run."""

    value: float
    max: float
    node_id: str | None
    node_type: str | None
    node_value: float | None = None
    node_max: float | None = None


@dataclasses.dataclass
class PromptResult:
    prompt_id: str
    outputs: dict[str, dict[str, Any]]  # node id -> the node's ``output`` as ComfyUI reported it
    cached_nodes: list[str]
    websocket_images: dict[str, list[tuple[str, bytes]]]  # SaveImageWebsocket: node -> (type, bytes)
    completed_via: str  # "websocket" or "history"
    socket_drops: int = 0

    def files(self) -> list[OutputFile]:
        found: list[OutputFile] = []
        for node_id, output in self.outputs.items():
            for key in OUTPUT_FILE_KEYS:
                entries = output.get(key)
                if not isinstance(entries, list):
                    continue
                for entry in entries:
                    if isinstance(entry, dict) and isinstance(entry.get("filename"), str):
                        extra = {k: v for k, v in entry.items() if k not in ("filename", "subfolder", "type")}
                        found.append(
                            OutputFile(
                                node_id,
                                key,
                                entry["filename"],
                                str(entry.get("subfolder") or ""),
                                str(entry.get("type") or "output"),
                                extra,
                            )
                        )
        return found

    def texts(self) -> dict[str, list[str]]:
        return {
            node_id: [str(text) for text in output["text"]]
            for node_id, output in self.outputs.items()
            if isinstance(output.get("text"), list)
        }


# --------------------------------------------------------------------------------------
# One prompt being watched
# --------------------------------------------------------------------------------------


class _PromptWatch:
    """The state of one posted prompt, fed by websocket messages and by /history."""

    def __init__(
        self, prompt_id: str, prompt: dict[str, Any], on_progress: Callable[[PromptProgress], None] | None
    ) -> None:
        self.prompt_id = prompt_id
        self.node_types = {node_id: str(node.get("class_type", "")) for node_id, node in prompt.items()}
        self.on_progress = on_progress
        self.started = False
        self.cached: list[str] = []
        self.outputs: dict[str, dict[str, Any]] = {}
        self.websocket_images: dict[str, list[tuple[str, bytes]]] = {}
        self.terminal: tuple[str, dict[str, Any]] | None = None
        self.finished = False
        self.history_entry: dict[str, Any] | None = None
        self.wake = asyncio.Event()
        self.poll_now = False
        self.current_node: str | None = None
        self._finished_nodes: set[str] = set()
        self._node_fraction = 0.0
        self._last_reported = -1.0

    def handle(self, event: str, data: dict[str, Any]) -> None:
        if event == "execution_start":
            self.started = True
        elif event == "execution_cached":
            self.started = True
            self.cached = [str(node) for node in data.get("nodes", [])]
            self._report()
        elif event == "executing":
            node = data.get("node")
            if node is None:
                if data.get("prompt_id") == self.prompt_id:
                    self.finished = True
                    self.wake.set()
                return
            self.started = True
            self.current_node = str(node)
            self._node_fraction = 0.0
            self._report()
        elif event == "executed":
            output = data.get("output")
            if isinstance(output, dict):
                self.outputs[str(data.get("node"))] = output
        elif event == "progress":
            node = str(data.get("node"))
            maximum = float(data.get("max") or 0)
            if maximum > 0:
                self.current_node = node
                self._node_fraction = min(1.0, float(data.get("value") or 0) / maximum)
                self._report(node_value=float(data.get("value") or 0), node_max=maximum)
        elif event == "progress_state":
            nodes = data.get("nodes")
            if isinstance(nodes, dict):
                for node_id, state in nodes.items():
                    if isinstance(state, dict) and state.get("state") == "finished":
                        self._finished_nodes.add(str(node_id))
                self._report()
        elif event in _TERMINAL_EVENTS:
            self.terminal = (event, data)

    def handle_image(self, node_id: str, image_type: str, payload: bytes) -> None:
        if self.node_types.get(node_id) == "SaveImageWebsocket":
            self.websocket_images.setdefault(node_id, []).append((image_type, payload))

    def _report(self, node_value: float | None = None, node_max: float | None = None) -> None:
        if self.on_progress is None:
            return
        to_run = [node for node in self.node_types if node not in self.cached]
        total = max(1, len(to_run))
        finished = len([node for node in self._finished_nodes if node in to_run])
        running = self._node_fraction if self.current_node not in self._finished_nodes else 0.0
        value = min(float(total), finished + running)
        if value < self._last_reported:  # progress never goes backwards for the caller
            return
        self._last_reported = value
        node_type = self.node_types.get(self.current_node or "")
        with contextlib.suppress(Exception):  # a faulty callback must not break the protocol
            self.on_progress(
                PromptProgress(value, float(total), self.current_node, node_type, node_value, node_max)
            )


# --------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------


class ComfyUIClient:
    """HTTP + websocket client of one ComfyUI server, shared by every job of the runner.

    ``client_id`` defaults to ``comfyswap-runner-<random>``: it must be unique per process.
    ``history_poll_interval_s`` is the slow poll that backs up the websocket;
    ``unreachable_after_s`` is how long ComfyUI may stay unreachable mid-run before the
    job is given back as retryable (a supervisor restart fits in it).
    """

    def __init__(
        self,
        base_url: str,
        *,
        client_id: str | None = None,
        http_timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        history_poll_interval_s: float = 2.0,
        reconnect_delay_s: float = 0.25,
        reconnect_delay_max_s: float = 5.0,
        unreachable_after_s: float = 10.0,
        cancel_grace_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or f"comfyswap-runner-{uuid.uuid4().hex[:12]}"
        self.connect_timeout_s = connect_timeout_s
        self.history_poll_interval_s = history_poll_interval_s
        self.reconnect_delay_s = reconnect_delay_s
        self.reconnect_delay_max_s = reconnect_delay_max_s
        self.unreachable_after_s = unreachable_after_s
        self.cancel_grace_s = cancel_grace_s
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=http_timeout_s, transport=transport)
        scheme = "wss" if self.base_url.startswith("https") else "ws"
        self._ws_url = f"{scheme}://{self.base_url.split('://', 1)[1]}/ws?clientId={self.client_id}"
        self._watches: dict[str, _PromptWatch] = {}
        self._socket_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._socket_generation = 0
        self._socket_error: BaseException | None = None
        # Which connect attempt the error came from, so a caller only trusts a fresh one.
        self._connect_attempts = 0
        self._socket_error_attempt = 0
        self._reconnect_now = asyncio.Event()
        self._executing_prompt: str | None = None
        self._closing = False

    # --- lifecycle -------------------------------------------------------------------
    async def close(self) -> None:
        self._closing = True
        if self._socket_task is not None:
            self._socket_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._socket_task
            self._socket_task = None
        await self._http.aclose()

    async def __aenter__(self) -> ComfyUIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def socket_connected(self) -> bool:
        return self._connected.is_set()

    async def ensure_socket(self) -> None:
        """Connect the websocket (once; it then reconnects by itself) before any POST.

        Only a refusal from a connect attempt made after this call counts: an error left
        over from before (ComfyUI was restarting) must not fail a task that arrives once it
        is back, so a waiting caller also cuts the reconnect backoff short."""
        if self._socket_task is None or self._socket_task.done():
            self._socket_error = None
            self._socket_task = asyncio.create_task(self._socket_loop(), name="comfyui-websocket")
        first_fresh_attempt = self._connect_attempts + 1
        self._reconnect_now.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        while not self._connected.is_set():
            fresh = self._socket_error_attempt >= first_fresh_attempt
            if (
                fresh
                and isinstance(self._socket_error, ConnectionRefusedError | OSError)
                and not isinstance(self._socket_error, TimeoutError)
            ):
                raise self._unavailable(f"cannot connect to the ComfyUI websocket: {self._socket_error}")
            if loop.time() > deadline:
                raise self._unavailable(f"no websocket connection within {self.connect_timeout_s:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), timeout=0.05)

    async def _socket_loop(self) -> None:
        delay = self.reconnect_delay_s
        while not self._closing:
            self._connect_attempts += 1
            self._reconnect_now.clear()
            try:
                async with websockets.connect(
                    self._ws_url, open_timeout=self.connect_timeout_s, max_size=None, ping_interval=20
                ) as socket:
                    await socket.send(
                        json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
                    )
                    self._socket_generation += 1
                    self._socket_error = None
                    self._connected.set()
                    delay = self.reconnect_delay_s
                    for watch in self._watches.values():  # events may have been lost: look at /history now
                        watch.poll_now = True
                        watch.wake.set()
                    async for message in socket:
                        self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._socket_error = exc
                self._socket_error_attempt = self._connect_attempts
            finally:
                if self._connected.is_set() and not self._closing:
                    log_event(
                        logger, "comfyui_socket_dropped", level=logging.WARNING, client_id=self.client_id
                    )
                self._connected.clear()
            with contextlib.suppress(TimeoutError):
                # Back off, unless a caller is waiting for the socket right now.
                await asyncio.wait_for(self._reconnect_now.wait(), timeout=delay)
            delay = min(delay * 2, self.reconnect_delay_max_s)

    def _dispatch(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self._dispatch_binary(message)
            return
        try:
            parsed = json.loads(message)
            event, data = str(parsed["type"]), parsed["data"]
        except (ValueError, KeyError, TypeError):
            return
        if not isinstance(data, dict):
            return
        prompt_id = data.get("prompt_id")
        if event == "executing":
            if prompt_id is None:  # after a reconnect ComfyUI resumes with {"node": X} only (s10)
                prompt_id = self._executing_prompt
            elif data.get("node") is not None:
                self._executing_prompt = str(prompt_id)
        watch = self._watches.get(str(prompt_id)) if prompt_id is not None else None
        if watch is not None:
            watch.handle(event, data)
            if event in _TERMINAL_EVENTS:
                watch.wake.set()

    def _dispatch_binary(self, message: bytes) -> None:
        if len(message) < 8:
            return
        event_type = struct.unpack(">I", message[:4])[0]
        if event_type == 4:  # PREVIEW_IMAGE_WITH_METADATA: [4][len][json][image]
            length = struct.unpack(">I", message[4:8])[0]
            try:
                metadata = json.loads(message[8 : 8 + length])
            except ValueError:
                return
            watch = self._watches.get(str(metadata.get("prompt_id")))
            if watch is not None:
                node_id = str(metadata.get("node_id"))
                watch.handle_image(
                    node_id, str(metadata.get("image_type") or "image/png"), message[8 + length :]
                )
        elif event_type == 1:  # legacy PREVIEW_IMAGE: no prompt id, only reached if flags were refused
            watch = self._watches.get(self._executing_prompt or "")
            if watch is not None and watch.current_node is not None:
                image_type = "image/png" if struct.unpack(">I", message[4:8])[0] == 2 else "image/jpeg"
                watch.handle_image(watch.current_node, image_type, message[8:])
        # type 3 (progress text, e.g. GetImageSize) carries nothing a job needs.

    # --- plain HTTP calls --------------------------------------------------------------
    def _unavailable(self, reason: str, **details: Any) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            f"ComfyUI at {self.base_url} is unavailable: {reason}",
            code="comfyui_unavailable",
            details={"comfyui_url": self.base_url, **details},
        )

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unavailable(f"{method} {path} failed: {exc!r}") from exc

    async def upload_image(
        self, path: Path, *, name: str | None = None, subfolder: str = "", overwrite: bool = False
    ) -> UploadedImage:
        """POST /upload/image; use the returned name, ComfyUI renames clashing files."""
        filename = name or path.name
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        data = {"subfolder": subfolder, "type": "input", "overwrite": "true" if overwrite else "false"}
        with path.open("rb") as file:
            response = await self._request(
                "POST", "/upload/image", files={"image": (filename, file, content_type)}, data=data
            )
        if response.status_code != 200:
            raise JobFailed(
                f"ComfyUI refused the upload of {filename!r} (HTTP {response.status_code})",
                code="comfyui_upload_failed",
                details={"upstream_status": response.status_code, "upstream_body": response.text[:2000]},
            )
        body = response.json()
        return UploadedImage(
            str(body["name"]), str(body.get("subfolder") or ""), str(body.get("type") or "input")
        )

    async def queue_prompt(self, prompt: dict[str, Any], *, prompt_id: str) -> dict[str, Any]:
        """POST /prompt with our client id and a prompt_id chosen by us (so a retry can find it)."""
        body = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        response = await self._request("POST", "/prompt", json=body)
        if response.status_code == 400:
            raise _validation_error(_json_or_text(response), response.status_code)
        if response.status_code >= 500:
            raise self._unavailable(
                f"POST /prompt answered HTTP {response.status_code}",
                upstream_status=response.status_code,
                upstream_body=response.text[:2000],
            )
        if response.status_code != 200:
            raise JobFailed(
                f"ComfyUI refused the workflow (HTTP {response.status_code}): {response.text[:300]}",
                code="comfyui_rejected",
                details={"upstream_status": response.status_code, "upstream_body": response.text[:2000]},
            )
        answer = response.json()
        if answer.get("node_errors"):
            # Queued anyway with only the valid outputs: stop it before it runs half a workflow.
            with contextlib.suppress(UpstreamUnavailable):
                await self.delete_pending([prompt_id])
                await self.interrupt(prompt_id)
            raise _validation_error(answer, response.status_code)
        return dict(answer)

    async def get_history(self, prompt_id: str) -> dict[str, Any] | None:
        response = await self._request("GET", f"/history/{prompt_id}")
        if response.status_code != 200:
            raise self._unavailable(f"GET /history answered HTTP {response.status_code}")
        entry = response.json().get(prompt_id)
        return entry if isinstance(entry, dict) else None

    async def get_queue(self) -> dict[str, Any]:
        response = await self._request("GET", "/queue")
        response.raise_for_status()
        return dict(response.json())

    async def queue_status(self) -> dict[str, Any]:
        """The runner's view of ComfyUI's queue: prompt ids running and pending."""
        queue = await self.get_queue()
        running = [str(item[1]) for item in queue.get("queue_running", [])]
        pending = [str(item[1]) for item in queue.get("queue_pending", [])]
        return {"running": running, "pending": pending, "queue_remaining": len(running) + len(pending)}

    async def system_stats(self) -> dict[str, Any]:
        response = await self._request("GET", "/system_stats")
        response.raise_for_status()
        return dict(response.json())

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: global without a prompt_id; a pending id is a no-op in ComfyUI."""
        body = {"prompt_id": prompt_id} if prompt_id is not None else None
        await self._request("POST", "/interrupt", json=body)

    async def delete_pending(self, prompt_ids: list[str]) -> None:
        await self._request("POST", "/queue", json={"delete": prompt_ids})

    async def download(self, output: OutputFile, dest: Path) -> Path:
        """GET /view streamed to ``dest`` (a video is never held in memory)."""
        params = {"filename": output.filename, "subfolder": output.subfolder, "type": output.type}
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            async with self._http.stream("GET", "/view", params=params) as response:
                if response.status_code == 404:
                    raise JobFailed(
                        f"output {output.filename!r} of node {output.node_id} is missing on ComfyUI "
                        "(deleted, or ComfyUI restarted with a fresh output folder)",
                        code="comfyui_output_missing",
                        details={"node_id": output.node_id, "filename": output.filename},
                    )
                if response.status_code != 200:
                    raise self._unavailable(f"GET /view answered HTTP {response.status_code}")
                with dest.open("wb") as file:
                    async for chunk in response.aiter_bytes(1 << 20):
                        file.write(chunk)
        except httpx.TransportError as exc:
            dest.unlink(missing_ok=True)
            raise self._unavailable(f"download of {output.filename!r} failed: {exc!r}") from exc
        return dest

    # --- running a prompt ---------------------------------------------------------------
    async def run_prompt(
        self,
        prompt: dict[str, Any],
        *,
        prompt_id: str | None = None,
        on_progress: Callable[[PromptProgress], None] | None = None,
        cancel: asyncio.Event | None = None,
        timeout_s: float = 1800.0,
    ) -> PromptResult:
        """Post ``prompt`` and wait for its outcome; raises the shared error for any failure."""
        if not isinstance(prompt, dict) or not prompt:
            raise JobFailed(
                "the workflow must be a non-empty object of nodes (ComfyUI API format)",
                code="comfyui_validation_failed",
            )
        prompt_id = prompt_id or str(uuid.uuid4())
        await self.ensure_socket()
        watch = _PromptWatch(prompt_id, prompt, on_progress)
        self._watches[prompt_id] = watch
        cancel_waiter: asyncio.Task[None] | None = None
        if cancel is not None:
            cancel_waiter = asyncio.create_task(_set_when(cancel, watch.wake))
        generation = self._socket_generation
        try:
            await self.queue_prompt(prompt, prompt_id=prompt_id)
            log_event(logger, "comfyui_prompt_queued", prompt_id=prompt_id, nodes=len(prompt))
            await self._wait_for_end(watch, cancel, timeout_s)
            drops = self._socket_generation - generation
            if watch.history_entry is None and (drops > 0 or not self._connected.is_set()):
                # The socket was down at some point: its view may be incomplete, /history is not.
                watch.history_entry = await self._history_after_end(prompt_id)
            return self._outcome(watch, drops)
        finally:
            self._watches.pop(prompt_id, None)
            if cancel_waiter is not None:
                cancel_waiter.cancel()

    async def _wait_for_end(
        self, watch: _PromptWatch, cancel: asyncio.Event | None, timeout_s: float
    ) -> None:
        """Wait for ``executing{null}`` on the socket, raced against a slow /history poll.

        The poll runs as its own task so a slow or stalled /history never delays an end the
        websocket already reported, and the websocket never has to be trusted alone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        next_poll = loop.time() + self.history_poll_interval_s
        unreachable_since: float | None = None
        absent_polls = 0
        poll: asyncio.Task[str] | None = None
        try:
            while not watch.finished:
                if cancel is not None and cancel.is_set():
                    await self._cancel(watch)
                now = loop.time()
                if now >= deadline:
                    with contextlib.suppress(UpstreamUnavailable):
                        await self.delete_pending([watch.prompt_id])
                        await self.interrupt(watch.prompt_id)
                    raise JobFailed(
                        f"the workflow did not finish within {timeout_s:g}s (TASK_TIMEOUT_S); "
                        "it was interrupted",
                        code="comfyui_timeout",
                        details={"prompt_id": watch.prompt_id, "timeout_s": timeout_s},
                    )
                if poll is not None and poll.done():
                    try:
                        state = poll.result()
                        unreachable_since = None
                    except UpstreamUnavailable:
                        unreachable_since = unreachable_since or now
                        if now - unreachable_since >= self.unreachable_after_s:
                            raise
                        state = "unknown"
                        next_poll = min(next_poll, now + 0.25)
                    poll = None
                    if state == "done":
                        return
                    absent_polls = absent_polls + 1 if state == "lost" else 0
                    if absent_polls >= 2:
                        raise self._unavailable(
                            f"prompt {watch.prompt_id} is neither queued nor in the history "
                            "(ComfyUI restarted?)",
                            prompt_id=watch.prompt_id,
                        )
                if poll is None and (watch.poll_now or now >= next_poll):
                    watch.poll_now = False
                    next_poll = now + self.history_poll_interval_s
                    poll = asyncio.create_task(self._poll(watch))
                    poll.add_done_callback(lambda _: watch.wake.set())
                watch.wake.clear()
                wait_s = max(0.01, min(next_poll, deadline) - loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watch.wake.wait(), timeout=wait_s)
        finally:
            if poll is not None and not poll.done():
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await poll

    async def _poll(self, watch: _PromptWatch) -> str:
        """``done`` (history has the end), ``queued``, or ``lost`` (ComfyUI forgot it)."""
        entry = await self.get_history(watch.prompt_id)
        if entry is None:
            status = await self.queue_status()
            if watch.prompt_id in status["running"] or watch.prompt_id in status["pending"]:
                return "queued"
            # It may have moved to the history between the two calls: look once more.
            entry = await self.get_history(watch.prompt_id)
            if entry is None:
                return "lost"
        status_block = entry.get("status") or {}
        if status_block.get("completed") or status_block.get("status_str") in ("success", "error"):
            watch.history_entry = entry
            watch.finished = True
            return "done"
        return "queued"

    async def _history_after_end(self, prompt_id: str) -> dict[str, Any] | None:
        for _ in range(3):
            with contextlib.suppress(UpstreamUnavailable):
                entry = await self.get_history(prompt_id)
                if entry is not None:
                    return entry
            await asyncio.sleep(0.2)
        return None

    async def _cancel(self, watch: _PromptWatch) -> None:
        """Delete it if pending (a no-op when running), interrupt it if running (a no-op when
        pending): in this order the two calls cover a prompt that starts in between."""
        with contextlib.suppress(UpstreamUnavailable):
            await self.delete_pending([watch.prompt_id])
            await self.interrupt(watch.prompt_id)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.cancel_grace_s
            # Wait (bounded) until ComfyUI is done with it, so the next job starts on an idle queue.
            while not watch.finished and loop.time() < deadline:
                if watch.started is False and watch.prompt_id not in (await self.queue_status())["running"]:
                    break
                watch.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watch.wake.wait(), timeout=min(0.5, self.history_poll_interval_s))
        log_event(logger, "comfyui_prompt_cancelled", prompt_id=watch.prompt_id)
        raise JobCancelled(
            "the task was cancelled; the ComfyUI prompt was interrupted",
            details={"prompt_id": watch.prompt_id},
        )

    def _outcome(self, watch: _PromptWatch, drops: int) -> PromptResult:
        terminal = watch.terminal
        outputs = dict(watch.outputs)
        via = "websocket"
        if watch.history_entry is not None:
            via = "history" if terminal is None or drops > 0 else "websocket"
            history_outputs = watch.history_entry.get("outputs") or {}
            # Keep the websocket's execution order, add what only the history knows.
            for node_id, output in history_outputs.items():
                outputs[str(node_id)] = output
            if terminal is None:
                terminal = _terminal_from_history(watch.history_entry)
        if terminal is None:
            raise self._unavailable(
                f"prompt {watch.prompt_id} ended without an outcome", prompt_id=watch.prompt_id
            )
        event, data = terminal
        if event == "execution_error":
            raise _execution_error(data, watch.prompt_id)
        if event == "execution_interrupted":
            raise TransientError(
                f"the ComfyUI prompt was interrupted by someone else at node {data.get('node_id')} "
                f"({data.get('node_type')}); it will be retried",
                code="comfyui_interrupted",
                details={"prompt_id": watch.prompt_id, "node_id": data.get("node_id")},
            )
        return PromptResult(watch.prompt_id, outputs, watch.cached, watch.websocket_images, via, drops)


async def _set_when(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


def _json_or_text(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"error": {"type": "unparsable", "message": response.text[:2000]}, "node_errors": {}}
    return body if isinstance(body, dict) else {"error": {"message": str(body)}, "node_errors": {}}


def _terminal_from_history(entry: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    status = entry.get("status") or {}
    for message in status.get("messages") or []:
        if isinstance(message, list) and len(message) == 2 and message[0] in _TERMINAL_EVENTS:
            return str(message[0]), dict(message[1])
    if status.get("status_str") == "success":
        return "execution_success", {}
    if status.get("status_str") == "error":
        return "execution_error", {"exception_message": "ComfyUI reported an error without details"}
    return None


def _node_error_reason(error: dict[str, Any]) -> str:
    message = str(error.get("message") or error.get("type") or "invalid")
    details = str(error.get("details") or "")
    reason = f"{message}: {details}" if details else message
    extra = error.get("extra_info") or {}
    exception_type = extra.get("exception_type")
    if exception_type == "KeyError":
        missing = details.strip("'\"")
        reason += f" (a link refers to node {missing}, which is not in the workflow)"
    elif exception_type == "IndexError":
        reason += " (a link refers to an output slot its node does not have)"
    return reason


def _validation_error(body: dict[str, Any], status: int) -> JobFailed:
    """A 400 (or a 200 with node_errors) as a message the workflow's author can act on."""
    problems: list[dict[str, Any]] = []
    lines: list[str] = []
    node_errors = body.get("node_errors") or {}
    if isinstance(node_errors, dict):
        for node_id, node_error in node_errors.items():
            class_type = node_error.get("class_type", "?")
            for node_problem in node_error.get("errors") or []:
                extra = node_problem.get("extra_info") or {}
                input_name = extra.get("input_name")
                reason = _node_error_reason(node_problem)
                where = f"node {node_id} ({class_type})" + (f" input {input_name!r}" if input_name else "")
                lines.append(f"{where}: {reason}")
                problems.append(
                    {
                        "node_id": str(node_id),
                        "class_type": class_type,
                        "input_name": input_name,
                        "type": node_problem.get("type"),
                        "reason": reason,
                    }
                )
    raw_error = body.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    if not lines:
        message = str(error.get("message") or "the workflow is invalid")
        details = str(error.get("details") or "")
        if error.get("type") == "prompt_no_outputs":
            details = "add an output node such as SaveImage"
        lines.append(f"{message} ({details})" if details else message)
    return JobFailed(
        "ComfyUI rejected the workflow: " + "; ".join(lines),
        code="comfyui_validation_failed",
        details={
            "error_type": error.get("type"),
            "problems": problems,
            "upstream_status": status,
            "upstream_body": body,
        },
    )


def _execution_error(data: dict[str, Any], prompt_id: str) -> JobFailed:
    node_id = data.get("node_id")
    node_type = data.get("node_type")
    exception_type = data.get("exception_type") or "Exception"
    exception_message = str(data.get("exception_message") or "").strip()
    return JobFailed(
        f"ComfyUI failed in node {node_id} ({node_type}): {exception_type}: {exception_message}",
        code="comfyui_execution_error",
        details={
            "prompt_id": prompt_id,
            "node_id": node_id,
            "node_type": node_type,
            "exception_type": exception_type,
            "exception_message": exception_message,
            "traceback": list(data.get("traceback") or [])[-3:],
        },
    )


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


class ComfyUIEngine(Engine):
    """Runs ``comm`` tasks (``params.input_data.wf_json``) on the configured ComfyUI.

    ``fetcher`` downloads the template's ``image_inputs`` (SSRF-safe in production,
    shared.safe_fetch.SafeFetcher); ``client`` is built from COMFYUI_URL when omitted.
    """

    name = "comfyui"

    def __init__(
        self,
        settings: Settings,
        fetcher: InputFetcher | None,
        *,
        client: ComfyUIClient | None = None,
        client_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self._client = client
        self._client_id = client_id

    @property
    def configured(self) -> bool:
        return self._client is not None or bool(self.settings.comfyui_url.strip())

    @property
    def client(self) -> ComfyUIClient:
        if not self.configured:
            raise JobFailed(
                "no ComfyUI is configured for the `comm` environment: set COMFYUI_URL "
                "(e.g. http://127.0.0.1:8188) on this runner, or send comm tasks to a runner that has one",
                code="comfyui_not_configured",
            )
        if self._client is None:
            client_id = self._client_id or f"{self.settings.comfyui_client_id}-{uuid.uuid4().hex[:12]}"
            self._client = ComfyUIClient(self.settings.comfyui_url, client_id=client_id)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    # --- Engine -----------------------------------------------------------------------
    async def prepare(self, task: Task, workdir: Path) -> PreparedJob:
        self.client  # noqa: B018  # fail fast, before any download, when ComfyUI is not configured
        wf_json = task.input_data.get("wf_json")
        if not isinstance(wf_json, dict) or not wf_json:
            raise JobFailed(
                "params.input_data.wf_json must be a ComfyUI API-format workflow", code="comfyui_no_workflow"
            )
        job = PreparedJob(task=task, workdir=workdir)
        image_inputs = []
        for entry in task.input_data.get("image_inputs") or []:
            node_id, input_name = str(entry["node"]), str(entry["input"])
            if node_id not in wf_json:
                raise JobFailed(
                    f"image input {entry.get('param')!r} targets node {node_id}, not in the workflow"
                )
            if self.fetcher is None:
                raise JobFailed(
                    "this runner has no input fetcher for image inputs", code="comfyui_no_fetcher"
                )
            fetched = await self.fetcher.fetch_to_file(
                str(entry["url"]),
                workdir / "inputs",
                field=f"task_data.{entry.get('param', input_name)}",
                allowed_kinds=frozenset({"image"}),
            )
            job.inputs[f"{node_id}.{input_name}"] = fetched.path
            image_inputs.append({"param": entry.get("param"), "node": node_id, "input": input_name})
        job.metadata["image_inputs"] = image_inputs
        return job

    async def run(self, job: PreparedJob, progress: ProgressCallback, cancel: asyncio.Event) -> EngineResult:
        client = self.client
        workflow = copy.deepcopy(job.task.input_data["wf_json"])
        for entry in job.metadata.get("image_inputs", []):
            path = job.inputs[f"{entry['node']}.{entry['input']}"]
            name = _SAFE_NAME.sub("_", f"{job.task.task_id}-{entry['param'] or entry['input']}{path.suffix}")
            uploaded = await client.upload_image(path, name=name, subfolder=UPLOAD_SUBFOLDER)
            workflow[entry["node"]].setdefault("inputs", {})[entry["input"]] = uploaded.load_image_value
        if cancel.is_set():
            raise JobCancelled("the task was cancelled before ComfyUI started it")

        def report(state: PromptProgress) -> None:
            stage = f"node {state.node_id} {state.node_type}" if state.node_id else "queued"
            progress(Progress(value=state.value, max=state.max, stage=stage))

        result = await client.run_prompt(
            workflow,
            prompt_id=str(uuid.uuid4()),
            on_progress=report,
            cancel=cancel,
            timeout_s=self.settings.task_timeout_s,
        )
        outputs = await self._collect(client, result, job.workdir / "outputs")
        metadata: dict[str, Any] = {
            "prompt_id": result.prompt_id,
            "cached_nodes": result.cached_nodes,
            "completed_via": result.completed_via,
            "text_outputs": result.texts(),
            "comfyui_outputs": result.outputs,
        }
        if result.socket_drops:
            metadata["socket_drops"] = result.socket_drops
        return EngineResult(outputs=outputs, metadata=metadata)

    async def _collect(self, client: ComfyUIClient, result: PromptResult, outdir: Path) -> list[EngineOutput]:
        outputs: list[EngineOutput] = []
        for index, output in enumerate(result.files()):
            dest = outdir / f"{index:03}_{output.node_id}_{_SAFE_NAME.sub('_', output.filename)}"
            await client.download(output, dest)
            extra = {
                "filename": output.filename,
                "subfolder": output.subfolder,
                "type": output.type,
                "key": output.key,
            }
            outputs.append(_describe(dest, output.node_id, {**output.extra, **extra}))
        for node_id, images in result.websocket_images.items():
            for index, (image_type, payload) in enumerate(images):
                suffix = mimetypes.guess_extension(image_type) or ".bin"
                dest = outdir / f"ws_{node_id}_{index:03}{suffix}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(payload)
                outputs.append(_describe(dest, node_id, {"source": "websocket"}))
        return outputs

    # --- helpers for the runner's routes ----------------------------------------------
    async def health(self) -> dict[str, Any]:
        if not self.configured:
            return {"status": "not_configured", "reason": "COMFYUI_URL is not set"}
        try:
            stats = await asyncio.wait_for(self.client.system_stats(), timeout=5.0)
        except (UpstreamUnavailable, httpx.HTTPError, TimeoutError) as exc:
            return {"status": "unavailable", "comfyui_url": self.client.base_url, "error": str(exc)}
        system = stats.get("system") or {}
        return {
            "status": "available",
            "comfyui_url": self.client.base_url,
            "comfyui_version": system.get("comfyui_version"),
            "devices": [device.get("name") for device in stats.get("devices") or []],
            "websocket_connected": self.client.socket_connected,
        }

    async def queue_status(self) -> dict[str, Any]:
        return await self.client.queue_status()

    async def system_stats(self) -> dict[str, Any]:
        return await self.client.system_stats()

    async def interrupt(self, prompt_id: str | None = None) -> None:
        await self.client.interrupt(prompt_id)


def _describe(path: Path, node_id: str, extra: dict[str, Any]) -> EngineOutput:
    """An EngineOutput whose content type comes from the bytes, not from the file name."""
    with path.open("rb") as file:
        head = file.read(8192)
    guess = filetype.guess(head)
    content_type = guess.mime if guess is not None else (mimetypes.guess_type(path.name)[0] or "")
    if not content_type:
        content_type = "text/plain" if _looks_textual(head) else "application/octet-stream"
    kind = "file"
    width = height = None
    if content_type.startswith("image/"):
        kind = "image"
        with contextlib.suppress(Exception), Image.open(path) as image:
            width, height = image.size
            frames = int(getattr(image, "n_frames", 1))
            if frames > 1:
                extra = {**extra, "frames": frames}
    elif content_type.startswith("video/"):
        kind = "video"
    elif content_type.startswith("text/"):
        kind = "text"
    return EngineOutput(
        path=path,
        content_type=content_type,
        kind=kind,
        node_id=node_id,
        width=width,
        height=height,
        extra=extra,
    )


def _looks_textual(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head
