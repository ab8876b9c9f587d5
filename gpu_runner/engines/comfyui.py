"""The ComfyUI engine: run an API-format workflow on a ComfyUI server and collect its outputs.

The protocol lives in comfyui_client.py (its traps: docs/comfyui-protocol.md, section 7),
ComfyUI's answers as shared errors in comfyui_errors.py. This module turns a task into a
prompt (inputs fetched, uploaded under ``comfyswap/`` and wired in) and the prompt's
outputs into EngineOutputs, one description per output.

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
import itertools
import logging
import mimetypes
import os
import re
import shlex
import shutil
import uuid
from pathlib import Path
from typing import Any, Final

import filetype
import httpx
from PIL import Image

from gpu_runner.engines.base import Engine, EngineOutput, EngineResult, PreparedJob, ProgressCallback
from gpu_runner.engines.comfyui_client import ComfyUIClient
from gpu_runner.engines.comfyui_watch import (
    OUTPUT_FILE_KEYS,
    FetchedFile,
    InputFetcher,
    OutputFile,
    PromptProgress,
    PromptResult,
    UploadedImage,
)
from shared.errors import JobCancelled, JobFailed, UpstreamUnavailable
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

UPLOAD_SUBFOLDER: Final = "comfyswap"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


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
        self._output_dir = comfyui_output_dir(settings)

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
        """Run the prompt; while ComfyUI is unreachable (crashed, restarting: 12-40 s) the task
        is held, up to COMFYUI_RESTART_WAIT_S, and run again once it answers, so a restart
        does not spend the task's attempts."""
        loop = asyncio.get_running_loop()
        hold_until = loop.time() + self.settings.comfyui_restart_wait_s
        held = 0
        held_s = 0.0
        while True:
            try:
                result = await self._run_once(job, progress, cancel)
            except UpstreamUnavailable as exc:
                if cancel.is_set() or loop.time() >= hold_until:
                    raise
                log_event(
                    logger,
                    "comfyui_task_held",
                    level=logging.WARNING,
                    reason=exc.message,
                    wait_s=round(hold_until - loop.time(), 1),
                )
                waited_from = loop.time()
                if not await self._wait_until_ready(hold_until, cancel):
                    if cancel.is_set():
                        raise JobCancelled("the task was cancelled while ComfyUI was restarting") from None
                    raise
                held += 1
                held_s += loop.time() - waited_from
                continue
            if held:
                result.metadata["comfyui_held"] = {"times": held, "waited_s": round(held_s, 1)}
            return result

    async def _wait_until_ready(self, until: float, cancel: asyncio.Event) -> bool:
        loop = asyncio.get_running_loop()
        while loop.time() < until and not cancel.is_set():
            try:
                await asyncio.wait_for(self.client.system_stats(), timeout=2.0)
            except (UpstreamUnavailable, httpx.HTTPError, TimeoutError):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cancel.wait(), timeout=0.5)
                continue
            return True
        return False

    async def _run_once(
        self, job: PreparedJob, progress: ProgressCallback, cancel: asyncio.Event
    ) -> EngineResult:
        client = self.client
        workflow = copy.deepcopy(job.task.input_data["wf_json"])
        uploaded_names: list[UploadedImage] = []
        try:
            for entry in job.metadata.get("image_inputs", []):
                path = job.inputs[f"{entry['node']}.{entry['input']}"]
                label = entry["param"] or entry["input"]
                name = _SAFE_NAME.sub("_", f"{job.task.task_id}-{label}{path.suffix}")
                uploaded = await client.upload_image(path, name=name, subfolder=UPLOAD_SUBFOLDER)
                uploaded_names.append(uploaded)
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
        finally:
            if uploaded_names:
                await asyncio.to_thread(self._remove_uploads, uploaded_names)
        outputs = await self._collect(client, result, job.workdir / "outputs")
        metadata: dict[str, Any] = {
            "prompt_id": result.prompt_id,
            "cached_nodes": result.cached_nodes,
            "completed_via": result.completed_via,
        }
        if result.socket_drops:
            metadata["socket_drops"] = result.socket_drops
        return EngineResult(outputs=outputs, metadata=metadata)

    def _remove_uploads(self, uploads: list[UploadedImage]) -> None:
        """Delete the task's inputs from ComfyUI's input folder (it has no route for that)."""
        input_dir = comfyui_input_dir(self.settings)
        if input_dir is None:
            return
        root = input_dir.resolve()
        for uploaded in uploads:
            path = (root / uploaded.subfolder / uploaded.name).resolve()
            if path.is_relative_to(root):  # never outside the folder, whatever ComfyUI answered
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)

    async def _collect(self, client: ComfyUIClient, result: PromptResult, outdir: Path) -> list[EngineOutput]:
        """Every output of the prompt, each described once: files, websocket images, texts."""
        outputs: list[EngineOutput] = []
        for index, output in enumerate(result.files()):
            dest = outdir / f"{index:03}_{output.node_id}_{_SAFE_NAME.sub('_', output.filename)}"
            if output.type == "output" and self._output_dir is not None:
                # ComfyUI on this machine (the co-located deployment): no HTTP round trip.
                taken = await asyncio.to_thread(_take_local_output, self._output_dir, output, dest)
                if taken is not None:
                    outputs.append(taken)
                    continue
            await client.download(output, dest)
            outputs.append(await asyncio.to_thread(_describe, dest, output.node_id, output.description()))
        for node_id, images in result.websocket_images.items():
            for index, (image_type, payload) in enumerate(images):
                suffix = mimetypes.guess_extension(image_type) or ".bin"
                dest = outdir / f"ws_{node_id}_{index:03}{suffix}"
                await asyncio.to_thread(_write, dest, payload)
                outputs.append(await asyncio.to_thread(_describe, dest, node_id, {"source": "websocket"}))
        for node_id, texts in result.texts().items():
            # A text output (PreviewAny, ShowText...) is a result like a file: a graph whose
            # only output is text succeeded and must not end `no_output`.
            for index, text in enumerate(texts):
                dest = outdir / f"text_{node_id}_{index:03}.txt"
                await asyncio.to_thread(_write, dest, text.encode())
                extra = {"source": "text", "text": text[:1000]}
                outputs.append(
                    EngineOutput(
                        path=dest, content_type="text/plain", kind="text", node_id=node_id, extra=extra
                    )
                )
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

    async def interrupt(self, prompt_id: str | None = None) -> dict[str, Any]:
        await self.client.interrupt(prompt_id)
        return {"interrupted": True, "prompt_id": prompt_id}


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


def comfyui_input_dir(settings: Settings) -> Path | None:
    """COMFYUI_INPUT_DIR, else the input folder of the ComfyUI that COMFYUI_COMMAND starts
    (``--input-directory``, ``--base-directory``/input, or input/ beside its main.py)."""
    return _comfyui_folder(settings.comfyui_input_dir, settings.comfyui_command, "input")


def comfyui_output_dir(settings: Settings) -> Path | None:
    """COMFYUI_OUTPUT_DIR, else the output folder of the ComfyUI that COMFYUI_COMMAND starts
    (``--output-directory``, ``--base-directory``/output, or output/ beside its main.py)."""
    return _comfyui_folder(settings.comfyui_output_dir, settings.comfyui_command, "output")


def _comfyui_folder(explicit: str, command: str, folder: str) -> Path | None:
    if explicit.strip():
        return Path(explicit)
    try:
        argv = shlex.split(command)
    except ValueError:
        return None
    options = dict(itertools.pairwise(argv))
    if f"--{folder}-directory" in options:
        return Path(options[f"--{folder}-directory"])
    if "--base-directory" in options:
        return Path(options["--base-directory"]) / folder
    main = next((Path(arg) for arg in argv if arg.endswith("main.py")), None)
    return main.parent / folder if main is not None and main.is_absolute() else None


def _take_local_output(root: Path, output: OutputFile, dest: Path) -> EngineOutput | None:
    """A saved output taken straight from ComfyUI's output folder on this machine: a hard
    link (a copy across file systems) and its description, in one thread hop; None when the
    file is not there (then it is downloaded, and a missing file fails as on /view)."""
    root = root.resolve()
    source = (root / output.subfolder / output.filename).resolve()
    # Whatever ComfyUI reported (or a symlink in its folder), nothing outside the folder.
    if not source.is_relative_to(root) or source == root or not source.is_file():
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
    return _describe(dest, output.node_id, output.description())


def _write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def _looks_textual(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head
