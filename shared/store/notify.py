"""Task-change notifications: who waits on a task (or on new work) wakes when it changes.

A store publishes a :class:`TaskChange` after every committed write; waiters subscribe
with a filter and block on a :class:`ChangeWatch` (threads) or get a callback (the
runner's event loop). Nothing polls: a waiter with nothing to wait for sleeps in the
kernel until a change or its own deadline.

Across processes (the embedded store: the API and the runner are two processes on one
SQLite file) changes travel as Unix datagrams. Each process that waits binds one
datagram socket in a private folder per store file; a writer sends one small datagram
(task id, status, environment, when it is claimable, lease holder) to every socket in
that folder after its commit. Why datagram sockets: a send is one syscall that never
blocks on a slow reader, a dead process's socket refuses at once (the sender unlinks
it), a receiver thread blocked in ``recv`` costs no CPU at all, and it is plain POSIX
(inotify would tie us to Linux; a FIFO per waiter needs an open/close dance per change
and cannot tell a dead reader from a slow one). A datagram is a hint, not the data:
receivers re-read the store, so a datagram lost to a full buffer costs latency (the
waiter's own deadline), never correctness.

The folder lives under the temp dir, named by a digest of the store's path: socket paths
are limited to ~100 bytes, and DATA_DIR may be deep. It is created 0700 and must belong
to this user, so no other local user can send us changes.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import hashlib
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.tasks import Task

__all__ = ["ChangeBus", "ChangeWatch", "Listener", "TaskChange", "WorkLine", "WorkWatch"]

_MAX_DATAGRAM = 1024
# A receiver drains its socket at once; a send that would wait longer than this means the
# receiver is wedged, and a lost hint only costs that waiter its own deadline.
_SEND_TIMEOUT_S = 0.05


@dataclasses.dataclass(frozen=True)
class TaskChange:
    """What changed: enough for a waiter to decide without reading the store."""

    task_id: str
    status: str
    environment: str
    available_at: float  # epoch seconds when a PENDING task becomes claimable
    lease_owner: str = ""
    # The whole task, when the backend delivers it with the change (Firestore's listener
    # does; a datagram does not): a waiter then needs no read of its own.
    task: Task | None = dataclasses.field(default=None, compare=False)

    def encode(self) -> bytes:
        fields = (self.task_id, self.status, self.environment, repr(self.available_at), self.lease_owner)
        return "\t".join(fields).encode()

    @classmethod
    def decode(cls, payload: bytes) -> TaskChange | None:
        try:
            task_id, status, environment, available_at, lease_owner = payload.decode().split("\t")
            return cls(task_id, status, environment, float(available_at), lease_owner)
        except ValueError:
            return None  # not ours (or the wake-up datagram close() sends itself)


Listener = Callable[[TaskChange], None]


class ChangeWatch:
    """A subscription a thread blocks on. ``wait`` returns True when something matching
    changed since the previous ``wait`` (or since the watch began), so a change that lands
    between a read and the next wait is never missed."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._changes = 0
        self._seen = 0
        self.last: TaskChange | None = None

    def notify(self, change: TaskChange | None = None) -> None:
        with self._condition:
            self._changes += 1
            self.last = change
            self._condition.notify_all()

    def wait(self, timeout_s: float) -> bool:
        with self._condition:
            if self._changes == self._seen and timeout_s > 0:
                self._condition.wait_for(lambda: self._changes != self._seen, timeout_s)
            fired = self._changes != self._seen
            self._seen = self._changes
            return fired


class WorkWatch(ChangeWatch):
    """A claimer waiting for work in a :class:`WorkLine`. It says after each claim whether
    it took a task (``tried``), so a wake it was given and did not use goes to another."""

    def __init__(self, line: WorkLine) -> None:
        super().__init__()
        self._line = line
        self.woken = False  # given a change it has not acted on yet (guarded by the line)
        # Whether its claim in progress began after the wake (its wait returned woken): a
        # wake that comes during a claim may come after the claim read the store.
        self.acting = False
        self.took = False
        self.waiting_since: float | None = None  # blocked in wait() since (monotonic)
        # A change it was given of a task claimable only later (a retry's backoff): it
        # waits for that time, and the others, who waited before the change, do not
        # know it. Handed on if it leaves without a task (guarded by the line).
        self.later: TaskChange | None = None

    def wait(self, timeout_s: float) -> bool:
        self._line.waiting(self)
        try:
            return super().wait(timeout_s)
        finally:
            self._line.not_waiting(self)

    def tried(self, took: bool) -> None:
        """After a claim: the wake (if any) is used; ``took`` whether it got a task."""
        self._line.tried(self, took)


class WorkLine:
    """The claimers of one process waiting for work of one set of environments, woken
    ONE per change (the longest waiting first), not all at once.

    Why: a change says that one task may have become claimable; waking every waiter sent
    them all to claim it and all but one lost (issue 14: every idle pull runner woke for
    each new task; the fetch_task long polls of many runners wait in one instance). A
    woken waiter that takes a task wakes the next (a burst spreads waiter by waiter;
    the chain ends at a claim that finds nothing: one empty claim per chain). A
    waiter woken that leaves without taking a task (its runner hung up, its deadline
    came) passes the wake on to the next, and so does one that leaves without a task after
    a change of a task claimable only later (a backoff: no write marks its end, and only
    the waiter woken knows to look then); a change that finds every waiter already woken
    is kept (up to one per waiter) for the next that waits, so none is lost."""

    def __init__(self, subscribe: Callable[[Listener], Callable[[], None]]) -> None:
        self._subscribe = subscribe
        self._lock = threading.Lock()
        self._waiters: list[WorkWatch] = []  # in the order they joined
        self._kept = 0  # changes no waiter was free for
        self._kept_later: TaskChange | None = None  # a kept change claimable only later
        self._unsubscribe: Callable[[], None] | None = None

    def join(self) -> WorkWatch:
        watch = WorkWatch(self)
        with self._lock:
            self._waiters.append(watch)
            first = self._unsubscribe is None
            if first:
                self._unsubscribe = lambda: None  # claimed: another joiner does not subscribe too
        if first:
            try:
                unsubscribe = self._subscribe(self._on_change)
            except BaseException:
                # Not left as a phantom waiter that holds the claim to subscribe: the
                # next joiner must subscribe, or every later waiter of this line sleeps
                # to its deadline.
                with self._lock:
                    self._waiters.remove(watch)
                    self._unsubscribe = None
                raise
            with self._lock:
                self._unsubscribe = unsubscribe
        return watch

    def leave(self, watch: WorkWatch) -> None:
        with self._lock:
            self._waiters.remove(watch)
            unused = not watch.took and (watch.woken or watch.later is not None)
            change = watch.later or watch.last
            watch.woken, watch.later = False, None
            unsubscribe = None
            if not self._waiters:
                unsubscribe, self._unsubscribe, self._kept = self._unsubscribe, None, 0
                self._kept_later = None
        if unsubscribe is not None:
            unsubscribe()
        elif unused:
            self._on_change(change)

    def waiting(self, watch: WorkWatch) -> None:
        with self._lock:
            watch.waiting_since = time.monotonic()
            if self._kept and not watch.woken:
                self._kept -= 1
                watch.woken = True
                watch.later = watch.later or self._kept_later
                if not self._kept:
                    self._kept_later = None
            else:
                return
        watch.notify(None)

    def not_waiting(self, watch: WorkWatch) -> None:
        with self._lock:
            watch.waiting_since = None
            watch.acting = watch.woken

    def tried(self, watch: WorkWatch, took: bool) -> None:
        with self._lock:
            woken, watch.took = watch.woken, took
            if took or watch.acting:
                watch.woken = False
            # else: the wake came during a claim that may have read the store before the
            # change: it is not used yet. The next wait returns at once, and the claim
            # after it acts on it (and, taking a task, wakes the next: a change may stand
            # for a burst).
            watch.acting = False
        if woken and took:
            # More may have come than the change said: one listener snapshot can stand
            # for a burst, and a claimer of a fleet may take another task than the head
            # (the head then does not change: no new snapshot). The next waiter looks
            # (a claim that finds nothing ends the chain); never this one, which leaves
            # with its task (a wake given to it would be dropped with it).
            self._wake_free(watch.later, exclude=watch)

    def _on_change(self, change: TaskChange | None) -> None:
        self._wake_free(change, keep=True)

    def _wake_free(
        self, change: TaskChange | None = None, *, keep: bool = False, exclude: WorkWatch | None = None
    ) -> None:
        later = change if change is not None and change.available_at > time.time() else None
        with self._lock:
            free = [watch for watch in self._waiters if not watch.woken and watch is not exclude]
            if not free:
                if keep:
                    self._kept = min(self._kept + 1, len(self._waiters))
                    self._kept_later = later or self._kept_later
                return
            # Blocked in wait() longest first; then one between claims (its next wait
            # returns at once: nothing is missed).
            chosen = min(
                free,
                key=lambda watch: (watch.waiting_since is None, watch.waiting_since or 0.0),
            )
            chosen.woken = True
            chosen.later = later or chosen.later
        chosen.notify(change)


class ChangeBus:
    """Fan-out of task changes within this process and to the other processes of one store."""

    def __init__(self, store_key: str) -> None:
        digest = hashlib.sha256(store_key.encode()).hexdigest()[:16]
        self.directory = Path(tempfile.gettempdir()) / f"comfyswap-changes-{digest}"
        self._lock = threading.Lock()
        self._listeners: dict[int, Listener] = {}
        self._next_id = 0
        self._pid = os.getpid()
        self._receiver: socket.socket | None = None
        self._receiver_path: Path | None = None
        self._sender: socket.socket | None = None
        # Datagrams taken off this process's socket: a test reads it to prove that a waiter
        # at idle is not woken by anything.
        self.received = 0

    # --- subscribing -------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` (from a bus thread or the writer's thread) on every change;
        returns the unsubscribe function. The first subscriber binds this process's socket."""
        with self._lock:
            self._reset_after_fork()
            if self._receiver is None:
                self._start_receiver()  # first: a subscription that fails leaves no listener
            self._next_id += 1
            listener_id = self._next_id
            self._listeners[listener_id] = listener

        def unsubscribe() -> None:
            with self._lock:
                self._listeners.pop(listener_id, None)

        return unsubscribe

    def _reset_after_fork(self) -> None:
        # gunicorn forks its worker after the app (and the store) exist: the child has
        # neither the receiver thread nor a right to the parent's socket file.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._receiver = self._sender = None
            self._receiver_path = None
            self._listeners.clear()

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        info = self.directory.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PermissionError(f"{self.directory} must be a 0700 folder of this user")

    def _start_receiver(self) -> None:
        path = self.directory / f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            for attempt in range(3):
                self._ensure_directory()
                try:
                    receiver.bind(str(path))
                    break
                except FileNotFoundError:
                    # The last process of this store left and removed the folder just now.
                    if attempt == 2:
                        raise
        except BaseException:
            receiver.close()
            raise
        self._receiver, self._receiver_path = receiver, path
        atexit.register(self._leave, path)
        thread = threading.Thread(
            target=self._receive_forever, args=(receiver,), name="task-change-receiver", daemon=True
        )
        thread.start()

    def _receive_forever(self, receiver: socket.socket) -> None:
        while True:
            try:
                payload = receiver.recv(_MAX_DATAGRAM)  # blocks in the kernel: no CPU at idle
            except OSError:
                return  # closed
            if receiver.fileno() < 0 or self._receiver is not receiver:
                return
            self.received += 1
            change = TaskChange.decode(payload)
            if change is not None:
                self._deliver(change)

    def _deliver(self, change: TaskChange) -> None:
        with self._lock:
            listeners = list(self._listeners.values())
        for listener in listeners:
            listener(change)

    # --- publishing --------------------------------------------------------------------
    def publish(self, change: TaskChange) -> None:
        """Tell this process's subscribers and every other process's socket."""
        self._deliver(change)
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return  # nobody anywhere has ever waited on this store
        own = str(self._receiver_path) if self._receiver_path and self._pid == os.getpid() else None
        payload = change.encode()
        for entry in entries:
            if not entry.name.endswith(".sock") or entry.path == own:
                continue
            self._send(entry.path, payload)

    def _send(self, path: str, payload: bytes) -> None:
        with self._lock:
            if self._sender is None or self._pid != os.getpid():
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sender.settimeout(_SEND_TIMEOUT_S)
            sender = self._sender
        try:
            sender.sendto(payload, path)
        except (ConnectionRefusedError, FileNotFoundError):
            self._unlink(Path(path))  # its process is gone (killed without cleaning up)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS) and not isinstance(exc, TimeoutError):
                raise

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    @classmethod
    def _leave(cls, path: Path) -> None:
        """Remove this process's socket, and the folder when it was the last one."""
        cls._unlink(path)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # fails while another process's socket is in it

    def close(self) -> None:
        with self._lock:
            receiver, path = self._receiver, self._receiver_path
            self._receiver = self._receiver_path = None
            self._listeners.clear()
        if receiver is not None and path is not None:
            self._leave(path)
            with contextlib.suppress(OSError):
                receiver.shutdown(socket.SHUT_RDWR)  # wakes the receiver thread so it ends
            receiver.close()
