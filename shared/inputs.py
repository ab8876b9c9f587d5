"""The input store: ``data:`` inputs kept out of the task document, for the task's life only.

A client may send an input inline as a base64 ``data:`` URL (a phone photo is 2-5 MB).
Such a payload never goes into the task document: Firestore caps a document at 1 MiB,
every GET, list and webhook would carry the face images, and they would live as long as
the task. At creation the payload is written to the input store and the task keeps a
reference in its place::

    input:<task_id>/<name>;sha256=<hex digest>;size=<bytes>

The runner's fetcher (shared.safe_fetch) reads it back, checks size and digest, and
inspects it like any other input. When the task ends (completed, failed, cancelled, or
failed by the reaper) its inputs are deleted; tasks that never reached an end (a crash
between store and create) are found by :func:`sweep_inputs`.

Where: the first object store of the result chain that can hold them (GCS or R2: the
bucket INPUTS_BUCKET names, else the results bucket; under ``inputs/<task_id>/``, a
prefix the bucket's lifecycle rule expires after a day as a backstop), else files
under ``DATA_DIR/inputs`` (the embedded default, where the API and the runner share one
machine). Inputs are never served: the local folder is outside the results root and no
route reads it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from shared.errors import NotFound, UnsafeInput
from shared.logs import get_logger, log_event

if TYPE_CHECKING:
    from shared.settings import Settings
    from shared.storage.base import StorageProvider
    from shared.tasks import Task

__all__ = [
    "INPUT_KEY_PREFIX",
    "InputRef",
    "InputStore",
    "drop_task_inputs",
    "input_refs",
    "is_input_ref",
    "make_input_store",
    "replace_strings",
    "sweep_inputs",
]

logger = get_logger(__name__)

INPUT_KEY_PREFIX = "inputs/"
_SCHEME = "input:"
_REF = re.compile(
    r"input:(?P<task_id>task_[0-9a-f]{32})/(?P<name>[A-Za-z0-9_.-]{1,64})"
    r";sha256=(?P<sha256>[0-9a-f]{64});size=(?P<size>[0-9]{1,12})"
)


def is_input_ref(value: str) -> bool:
    return value[: len(_SCHEME)].lower() == _SCHEME


@dataclasses.dataclass(frozen=True)
class InputRef:
    """Where one stored input is and what it must be (digest and size)."""

    task_id: str
    name: str
    sha256: str
    size: int

    @property
    def url(self) -> str:
        return f"{_SCHEME}{self.task_id}/{self.name};sha256={self.sha256};size={self.size}"

    @property
    def key(self) -> str:
        return f"{INPUT_KEY_PREFIX}{self.task_id}/{self.name}"

    @classmethod
    def parse(cls, value: str) -> InputRef:
        match = _REF.fullmatch(value)
        if match is None:
            raise UnsafeInput("not a valid stored-input reference", code="unsafe_url")
        return cls(match["task_id"], match["name"], match["sha256"], int(match["size"]))


class InputStore:
    """Inputs of tasks on one storage provider, under ``inputs/<task_id>/<name>``."""

    def __init__(self, provider: StorageProvider) -> None:
        self.provider = provider

    def put(self, task_id: str, name: str, payload: bytes, media_type: str) -> InputRef:
        ref = InputRef(task_id, name, hashlib.sha256(payload).hexdigest(), len(payload))
        self.provider.put_bytes(ref.key, payload, media_type)
        return ref

    def read(self, ref: InputRef) -> bytes:
        """The payload; refused unless it has the size and digest the task recorded."""
        try:
            payload = self.provider.read_bytes(ref.key)
        except NotFound:
            raise UnsafeInput(
                f"stored input {ref.name} is gone (the task ended or was deleted)", code="input_not_found"
            ) from None
        if len(payload) != ref.size or hashlib.sha256(payload).hexdigest() != ref.sha256:
            raise UnsafeInput(f"stored input {ref.name} does not match its digest", code="input_corrupt")
        return payload

    def delete(self, refs: Iterable[InputRef]) -> int:
        return sum(1 for ref in refs if self.provider.delete(ref.key))

    def stored_task_ids(self) -> dict[str, dt.datetime]:
        """Task id -> newest write, of every task with inputs in the store."""
        newest: dict[str, dt.datetime] = {}
        for key, modified in self.provider.list_keys(INPUT_KEY_PREFIX):
            task_id = key.removeprefix(INPUT_KEY_PREFIX).split("/", 1)[0]
            newest[task_id] = max(modified, newest.get(task_id, modified))
        return newest

    def delete_task(self, task_id: str) -> int:
        return sum(
            1
            for key, _ in self.provider.list_keys(f"{INPUT_KEY_PREFIX}{task_id}/")
            if self.provider.delete(key)
        )


def make_input_store(settings: Settings) -> InputStore:
    """GCS or R2 when the result chain has one (the API and the runner both reach it),
    else the local folder DATA_DIR/inputs (one machine).

    On GCS or R2 the inputs go to INPUTS_BUCKET when it is set, else to the results
    bucket. A results bucket made public (public_results in Terraform: ``allUsers`` may
    read and *list* it) must not hold people's photos, so a deployment with public results
    keeps them in a private bucket of their own.
    """
    from shared.storage import make_provider
    from shared.storage.local import LocalStorage

    for name in [settings.storage_provider, *settings.fallback_providers]:
        if name in ("gcs", "r2"):
            if settings.inputs_bucket:
                field = "gcs_bucket_name" if name == "gcs" else "r2_bucket_name"
                settings = settings.model_copy(update={field: settings.inputs_bucket})
            return InputStore(make_provider(name, settings))
    return InputStore(LocalStorage(settings.data_dir / "inputs", "", key_prefix=INPUT_KEY_PREFIX))


def input_refs(value: Any) -> list[InputRef]:
    """Every stored-input reference inside ``value`` (a task's input_data), once each."""
    found: dict[str, InputRef] = {}
    for text in _strings(value):
        if is_input_ref(text) and text not in found:
            found[text] = InputRef.parse(text)
    return list(found.values())


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def replace_strings(value: Any, mapping: dict[str, str]) -> Any:
    """``value`` with every string found in ``mapping`` replaced (a template copies an input
    URL into its graph and its parameters: every copy must go)."""
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, dict):
        return {key: replace_strings(item, mapping) for key, item in value.items()}
    if isinstance(value, list):
        return [replace_strings(item, mapping) for item in value]
    return value


def drop_task_inputs(store: InputStore, task: Task) -> int:
    """Delete a finished task's stored inputs; failures are logged (the sweep retries)."""
    refs = input_refs(task.params.input_data)
    if not refs:
        return 0
    try:
        removed = store.delete(refs)
    except Exception as exc:
        log_event(logger, "inputs_delete_failed", task_id=task.taskId, error=repr(exc), level=logging.WARNING)
        return 0
    log_event(logger, "inputs_deleted", task_id=task.taskId, count=removed)
    return removed


def sweep_inputs(
    store: InputStore, is_live: Callable[[str], bool], *, older_than_s: float, now: dt.datetime | None = None
) -> int:
    """Delete the inputs of tasks that are gone or finished (``is_live(task_id)`` false),
    written more than ``older_than_s`` ago (younger ones may belong to a create in flight)."""
    now = now or dt.datetime.now(dt.UTC)
    removed = 0
    for task_id, newest in store.stored_task_ids().items():
        if (now - newest).total_seconds() < older_than_s or is_live(task_id):
            continue
        removed += store.delete_task(task_id)
    if removed:
        log_event(logger, "inputs_swept", count=removed)
    return removed
