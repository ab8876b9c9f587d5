"""HTTP + websocket client of one ComfyUI server (docs/comfyui-protocol.md).

ComfyUI's protocol has traps (docs/comfyui-protocol.md, section 7), and this module is
shaped by them:

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
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import mimetypes
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import websockets

from gpu_runner.engines.comfyui_errors import (
    TERMINAL_EVENTS,
    json_or_text,
    refused,
    validation_error,
)
from gpu_runner.engines.comfyui_post import PromptPoster
from gpu_runner.engines.comfyui_watch import (
    OutputFile,
    PromptProgress,
    PromptResult,
    PromptWatch,
    UploadedImage,
)
from gpu_runner.wake import CancelSignal, Wake, nothing
from shared.errors import JobCancelled, JobFailed, UpstreamUnavailable
from shared.logs import get_logger, log_event

__all__ = ["ComfyUIClient"]

logger = get_logger(__name__)

# An output up to this size is read into memory whole; a larger one (a video) is streamed.
SMALL_DOWNLOAD_BYTES = 8 << 20


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
        # Every job's POST /prompt goes the lean way (comfyui_post.py) to a plain-http ComfyUI.
        self._poster = (
            PromptPoster(self.base_url, timeout_s=http_timeout_s)
            if transport is None and self.base_url.startswith("http://")
            else None
        )
        scheme = "wss" if self.base_url.startswith("https") else "ws"
        self._ws_url = f"{scheme}://{self.base_url.split('://', 1)[1]}/ws?clientId={self.client_id}"
        self._watches: dict[str, PromptWatch] = {}
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
        if self._poster is not None:
            await self._poster.close()
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
            # A fresh context: the socket outlives the task that first needed it, and its
            # log lines must not carry that task's id (shared/logs.py binds it per context).
            self._socket_task = asyncio.create_task(
                self._socket_loop(), name="comfyui-websocket", context=contextvars.Context()
            )
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
                # No permessage-deflate: over loopback (ComfyUI beside the runner) inflating
                # ten small messages per prompt costs CPU and saves nothing.
                async with websockets.connect(
                    self._ws_url,
                    open_timeout=self.connect_timeout_s,
                    max_size=None,
                    ping_interval=20,
                    compression=None,
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
            if event in TERMINAL_EVENTS:
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
        payload = await asyncio.to_thread(path.read_bytes)  # an input image, capped by FETCH_MAX_BYTES
        response = await self._request(
            "POST", "/upload/image", files={"image": (filename, payload, content_type)}, data=data
        )
        if response.status_code != 200:
            raise refused(response, f"the upload of {filename!r}", code="comfyui_upload_failed")
        body = response.json()
        return UploadedImage(
            str(body["name"]), str(body.get("subfolder") or ""), str(body.get("type") or "input")
        )

    async def queue_prompt(self, prompt: dict[str, Any], *, prompt_id: str) -> dict[str, Any]:
        """POST /prompt with our client id and a prompt_id chosen by us (so a retry can find it)."""
        body = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        if self._poster is None:
            response = await self._request("POST", "/prompt", json=body)
        else:
            try:
                response = await self._poster.post_json("/prompt", json.dumps(body).encode())
            except httpx.TransportError as exc:
                raise self._unavailable(f"POST /prompt failed: {exc!r}") from exc
        if response.status_code == 400:
            raise validation_error(json_or_text(response), response.status_code)
        if response.status_code >= 500:
            raise self._unavailable(
                f"POST /prompt answered HTTP {response.status_code}",
                upstream_status=response.status_code,
                upstream_body=response.text[:2000],
            )
        if response.status_code != 200:
            raise refused(response, "the workflow", code="comfyui_rejected", quote=True)
        answer = response.json()
        if answer.get("node_errors"):
            # Queued anyway with only the valid outputs: stop it before it runs half a workflow.
            with contextlib.suppress(UpstreamUnavailable):
                await self.stop_prompt(prompt_id, within_s=self.cancel_grace_s)
            raise validation_error(answer, response.status_code)
        return dict(answer)

    async def get_history(self, prompt_id: str) -> dict[str, Any] | None:
        path = f"/history/{prompt_id}"
        entry = self._expect_json("GET", path, await self._request("GET", path)).get(prompt_id)
        return entry if isinstance(entry, dict) else None

    def _expect_json(self, method: str, path: str, response: httpx.Response) -> dict[str, Any]:
        """A 200 with a JSON object, or ``UpstreamUnavailable`` (retried): ComfyUI's own
        routes answer anything else only when it is broken or not ComfyUI at all."""
        if response.status_code != 200:
            raise self._unavailable(
                f"{method} {path} answered HTTP {response.status_code}",
                upstream_status=response.status_code,
                upstream_body=response.text[:500],
            )
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise self._unavailable(f"{method} {path} answered something other than a JSON object")
        return body

    async def get_queue(self) -> dict[str, Any]:
        return self._expect_json("GET", "/queue", await self._request("GET", "/queue"))

    async def queue_status(self) -> dict[str, Any]:
        """The runner's view of ComfyUI's queue: prompt ids running and pending."""
        queue = await self.get_queue()
        running = [str(item[1]) for item in queue.get("queue_running", [])]
        pending = [str(item[1]) for item in queue.get("queue_pending", [])]
        return {"running": running, "pending": pending, "queue_remaining": len(running) + len(pending)}

    async def system_stats(self) -> dict[str, Any]:
        return self._expect_json("GET", "/system_stats", await self._request("GET", "/system_stats"))

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: global without a prompt_id; a pending id is a no-op in ComfyUI."""
        body = {"prompt_id": prompt_id} if prompt_id is not None else None
        await self._request("POST", "/interrupt", json=body)

    async def delete_pending(self, prompt_ids: list[str]) -> None:
        await self._request("POST", "/queue", json={"delete": prompt_ids})

    async def stop_prompt(self, prompt_id: str, *, within_s: float) -> bool:
        """Delete the prompt if pending, interrupt it if running, and go on interrupting
        while it still runs, until ComfyUI holds it no more (True) or ``within_s`` passed.

        One interrupt is not enough: ComfyUI clears its flag when a prompt starts executing
        (``PromptExecutor.execute_async``), so an interrupt sent after the prompt left the
        queue but before it started is lost and the prompt runs to its end. The interrupt
        names the prompt, so a repeat never touches another job's."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        await self.delete_pending([prompt_id])
        while True:
            await self.interrupt(prompt_id)
            queue = await self.queue_status()
            if prompt_id not in queue["running"] and prompt_id not in queue["pending"]:
                return True
            if loop.time() >= deadline:
                return False
            if prompt_id in queue["pending"]:
                await self.delete_pending([prompt_id])
            await asyncio.sleep(0.2)

    async def download(self, output: OutputFile, dest: Path) -> Path:
        """GET /view streamed to ``dest`` (a video is never held in memory)."""
        params = {"filename": output.filename, "subfolder": output.subfolder, "type": output.type}
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
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) <= SMALL_DOWNLOAD_BYTES:
                    # Most outputs are a few images: read whole, written in one thread hop.
                    await asyncio.to_thread(_write_file, dest, await response.aread())
                    return dest
                await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
                file = await asyncio.to_thread(dest.open, "wb")
                try:
                    async for chunk in response.aiter_bytes(1 << 20):
                        await asyncio.to_thread(file.write, chunk)  # disk writes off the loop
                finally:
                    await asyncio.to_thread(file.close)
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
        watch = PromptWatch(prompt_id, prompt, on_progress)
        self._watches[prompt_id] = watch
        cancel_waiter: asyncio.Task[None] | None = None
        stop_hook = nothing
        if isinstance(cancel, CancelSignal):
            stop_hook = cancel.on_set(watch.wake.set)  # the worker's: no task waits on it
        elif cancel is not None:
            cancel_waiter = asyncio.create_task(_set_when(cancel, watch.wake))
        generation = self._socket_generation
        try:
            await self._queue_and_wait(prompt, prompt_id, watch, cancel, timeout_s)
            drops = self._socket_generation - generation
            if watch.history_entry is None and (drops > 0 or not self._connected.is_set()):
                # The socket was down at some point: its view may be incomplete, /history is not.
                watch.history_entry = await self._history_after_end(prompt_id)
            return self._outcome(watch, drops)
        finally:
            self._watches.pop(prompt_id, None)
            stop_hook()
            if cancel_waiter is not None:
                cancel_waiter.cancel()

    async def _queue_and_wait(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        watch: PromptWatch,
        cancel: asyncio.Event | None,
        timeout_s: float,
    ) -> None:
        try:
            await self.queue_prompt(prompt, prompt_id=prompt_id)
            log_event(logger, "comfyui_prompt_queued", prompt_id=prompt_id, nodes=len(prompt))
            await self._wait_for_end(watch, cancel, timeout_s)
        except asyncio.CancelledError:
            # Our caller gave up (the worker's TASK_TIMEOUT_S, a shutdown): ComfyUI must not
            # go on running a prompt nobody waits for. Bounded, so a dead ComfyUI can't hold it.
            if not watch.finished:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._abandon(prompt_id), timeout=5.0)
            raise

    async def _abandon(self, prompt_id: str) -> None:
        await self.stop_prompt(prompt_id, within_s=4.0)
        log_event(logger, "comfyui_prompt_abandoned", level=logging.WARNING, prompt_id=prompt_id)

    async def _wait_for_end(self, watch: PromptWatch, cancel: asyncio.Event | None, timeout_s: float) -> None:
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
                        await self.stop_prompt(watch.prompt_id, within_s=self.cancel_grace_s)
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
                await watch.wake.wait(max(0.01, min(next_poll, deadline) - loop.time()))
        finally:
            if poll is not None and not poll.done():
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await poll

    async def _poll(self, watch: PromptWatch) -> str:
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

    async def _cancel(self, watch: PromptWatch) -> None:
        """Stop the prompt (deleted if pending, interrupted while it runs) and wait, bounded,
        until ComfyUI is done with it, so the next job starts on an idle queue."""
        with contextlib.suppress(UpstreamUnavailable):
            await self.stop_prompt(watch.prompt_id, within_s=self.cancel_grace_s)
        log_event(logger, "comfyui_prompt_cancelled", prompt_id=watch.prompt_id)
        raise JobCancelled(
            "the task was cancelled; the ComfyUI prompt was interrupted",
            details={"prompt_id": watch.prompt_id},
        )

    def _outcome(self, watch: PromptWatch, drops: int) -> PromptResult:
        result = watch.outcome(drops)
        if result is None:
            raise self._unavailable(
                f"prompt {watch.prompt_id} ended without an outcome", prompt_id=watch.prompt_id
            )
        return result


def _write_file(dest: Path, payload: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(payload)


async def _set_when(source: asyncio.Event, target: Wake) -> None:
    await source.wait()
    target.set()
