"""What the ComfyUI client hands back, and the state of one prompt it watches.

``_PromptWatch`` is fed by websocket messages and by ``/history``; its progress counts
nodes finished (plus the running node's fraction) of all the nodes that are not cached.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from gpu_runner.engines.comfyui_errors import TERMINAL_EVENTS, execution_error, terminal_from_history
from gpu_runner.wake import Wake
from shared.errors import TransientError

__all__ = [
    "OUTPUT_FILE_KEYS",
    "FetchedFile",
    "InputFetcher",
    "OutputFile",
    "PromptProgress",
    "PromptResult",
    "PromptWatch",
    "UploadedImage",
]

# Keys of an ``executed`` output that list files; ``animated`` holds booleans in core nodes
# (SaveAnimatedPNG/WEBP) but lists of files in some custom nodes, so entries are checked.
OUTPUT_FILE_KEYS: Final = ("images", "gifs", "videos", "animated", "audio")


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

    def description(self) -> dict[str, Any]:
        """What a task's output says about this file (``output_key``: ComfyUI's list it came
        from; ``key`` is the storage key the worker adds, never this)."""
        return {
            **self.extra,
            "filename": self.filename,
            "subfolder": self.subfolder,
            "type": self.type,
            "output_key": self.key,
        }


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


class PromptWatch:
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
        self.wake = Wake()
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
        elif event in TERMINAL_EVENTS:
            self.terminal = (event, data)

    def outcome(self, drops: int) -> PromptResult | None:
        """The prompt's result from what the socket and /history told; an execution error or
        someone else's interrupt raised; None if neither knows how it ended."""
        terminal = self.terminal
        outputs = dict(self.outputs)
        via = "websocket"
        if self.history_entry is not None:
            via = "history" if terminal is None or drops > 0 else "websocket"
            # Keep the websocket's execution order, add what only the history knows.
            for node_id, output in (self.history_entry.get("outputs") or {}).items():
                outputs[str(node_id)] = output
            if terminal is None:
                terminal = terminal_from_history(self.history_entry)
        if terminal is None:
            return None
        event, data = terminal
        if event == "execution_error":
            raise execution_error(data, self.prompt_id)
        if event == "execution_interrupted":
            raise TransientError(
                f"the ComfyUI prompt was interrupted by someone else at node {data.get('node_id')} "
                f"({data.get('node_type')}); it will be retried",
                code="comfyui_interrupted",
                details={"prompt_id": self.prompt_id, "node_id": data.get("node_id")},
            )
        return PromptResult(self.prompt_id, outputs, self.cached, self.websocket_images, via, drops)

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
