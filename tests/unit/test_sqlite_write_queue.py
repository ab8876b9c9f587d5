"""The embedded store's writers of every process queue on one file lock (``<file>.write-lock``,
flock), woken by the kernel the moment it is free, instead of SQLite's busy handler, which
sleeps 1, 2, 5, 10... ms between retries: two processes writing one file (the API creating
while the runner completes, figure 8) waited up to 20 ms for a lock held 0.1 ms."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from shared.store.sqlite import SQLiteTaskStore
from shared.tasks import Task

HOLD_S = 1.0  # long enough that the write surely starts while the lock is held


def test_a_write_waits_for_another_process_holding_the_write_lock_and_then_succeeds(tmp_path: Path) -> None:
    store = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # another process of the same store: holds the lock, then lets go
        try:
            fd = os.open(f"{store.path}.write-lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(write, b"h")
            time.sleep(HOLD_S)
            os.write(write, repr(time.time()).encode().ljust(32))
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os._exit(0)
    try:
        assert os.read(read, 1) == b"h"
        done: list[float] = []

        def create() -> None:
            store.create(Task(workflow="face_swap", environment="face_swap"))
            done.append(time.time())

        writer = threading.Thread(target=create)
        writer.start()
        released_at = float(os.read(read, 32).decode())
        writer.join(timeout=60)
    finally:
        os.waitpid(pid, 0)
        os.close(read)
        os.close(write)
    try:
        assert done, "the write never finished"
        assert done[0] >= released_at, "the write went ahead while another process held the write lock"
        assert len(store.list_tasks()) == 1
    finally:
        store.close()
