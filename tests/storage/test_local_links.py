"""Uploads that don't copy: the `local` store hard-links the runner's work files."""

from __future__ import annotations

import os
from pathlib import Path

from shared.storage.local import LocalStorage


def _store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "results", "http://127.0.0.1:1/results", link_from=tmp_path / "work")


def test_a_work_file_is_linked_into_the_results_not_copied(tmp_path):
    output = tmp_path / "work" / "task_1" / "result.mp4"
    output.parent.mkdir(parents=True)
    output.write_bytes(b"\x00" * 4096)

    stored = _store(tmp_path).upload_file(output, "results/task_1/000.mp4", "video/mp4")

    result = tmp_path / "results" / "task_1" / "000.mp4"
    assert stored.size == 4096
    assert os.stat(result).st_ino == os.stat(output).st_ino  # one file, two names: no bytes copied
    output.unlink()  # the runner deletes its work folder after the task
    assert result.read_bytes() == b"\x00" * 4096


def test_a_file_from_elsewhere_is_copied(tmp_path):
    shared = tmp_path / "engine-shared" / "out.png"
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"png")

    _store(tmp_path).upload_file(shared, "results/task_2/000.png", "image/png")

    result = tmp_path / "results" / "task_2" / "000.png"
    assert os.stat(result).st_ino != os.stat(shared).st_ino
    shared.write_bytes(b"rewritten by its owner")
    assert result.read_bytes() == b"png"


def test_a_retried_upload_replaces_the_object(tmp_path):
    store = _store(tmp_path)
    for content in (b"first", b"second"):
        output = tmp_path / "work" / "task_3" / "result.png"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.unlink(missing_ok=True)
        output.write_bytes(content)
        store.upload_file(output, "results/task_3/000.png", "image/png")

    assert (tmp_path / "results" / "task_3" / "000.png").read_bytes() == b"second"
    assert [path.name for path in (tmp_path / "results" / "task_3").iterdir()] == ["000.png"]


def test_a_copied_upload_is_byte_identical_through_the_kernel_copy_or_without_it(tmp_path, monkeypatch):
    content = os.urandom(3 * 1024 * 1024 + 17)
    shared = tmp_path / "engine-shared" / "out.mp4"
    shared.parent.mkdir(parents=True)
    shared.write_bytes(content)
    store = _store(tmp_path)

    store.upload_file(shared, "results/task_4/000.mp4", "video/mp4")
    assert (tmp_path / "results" / "task_4" / "000.mp4").read_bytes() == content

    def no_sendfile(*args, **kwargs):  # a file system or kernel without it
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", no_sendfile)
    store.upload_file(shared, "results/task_5/000.mp4", "video/mp4")
    assert (tmp_path / "results" / "task_5" / "000.mp4").read_bytes() == content
    assert sorted(path.name for path in (tmp_path / "results" / "task_5").iterdir()) == ["000.mp4"]
