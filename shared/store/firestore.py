"""The cloud task store: one Firestore document per task, every change a compare-and-set.

Document id = ``taskId``; the document is ``Task.to_document()`` with the fields the
queue queries (``created_at``, ``available_at``, ``updated_at``, ``started_at``,
``finished_at`` and a top-level ``lease_expires_at``) stored as native Firestore
timestamps, so range filters and ordering compare instants, not strings. ``status``,
``environment``, ``priority``, ``owner`` and ``idempotency_key`` are top-level already;
``shard`` (0..63, a hash of the id) lets a fleet of claimers read different parts of the
queue (``claim_next``).

Claimers announce themselves: ``<collection>_fleet/{environment}/<collection>_claimers/
{sha256(worker id)}`` holds ``seen_at`` (rewritten every _PRESENCE_REFRESH_S while the
worker claims) and ``expire_at`` (the TTL policy deletes it). A claimer that counts
another live announcement for its environments is one of a fleet before it has lost a
single race (``claim_next``).

Two kinds of compare-and-set. ``update()`` (every other life-cycle step in
:mod:`shared.store.base`) is a read-write transaction: it locks what it reads and
commits all or nothing, and two transactions on one document are serialised (one is
aborted and retried by ``@firestore.transactional``). The claims, where runners (or
duplicate deliveries) contend, lock nothing: ``claim_next()`` picks from a query and
``claim()`` reads the named task, and each writes on the condition that the document's
``update_time`` is still the one it read (see their docstrings for why not a
transaction); either way two runners never lease the same task (tests/contract checks
both under contention).

Idempotency keys are unique per (owner, key) through a second collection,
``<collection>_idempotency_keys/{sha256(owner, key)}``, created in the same atomic
batch as the task: the second create of a key fails as a whole.

Every query here is served by an index: single-field indexes (automatic) or the
composite indexes in :data:`REQUIRED_INDEXES`, which ``infra/firestore_indexes.json``
mirrors for Terraform. No method scans the collection.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from google.api_core import exceptions as gexc
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.field_path import FieldPath

from shared.errors import ComfySwapError, NotFound, TransientError
from shared.logs import log_event
from shared.store.base import (
    DEFAULT_RETENTION,
    RUNNING_STATUSES,
    Claim,
    Mutation,
    TaskStore,
    claimed_by_name,
    fair_pick,
    leased_copy,
)
from shared.store.notify import Listener, TaskChange
from shared.tasks import LEASED_STATUSES, QueueStats, Task, TaskStatus, utcnow

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = [
    "CLAIM_SHARDS",
    "REQUIRED_INDEXES",
    "FirestoreTaskStore",
    "IndexSpec",
    "claim_shard",
    "indexes_as_json",
    "spread_claims",
]

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

Order = Literal["ASCENDING", "DESCENDING"]


@dataclass(frozen=True)
class IndexSpec:
    """One composite index: the collection id and its (field, order) list, in order."""

    collection: str
    fields: tuple[tuple[str, Order], ...]


# The composite indexes the queries below need (the emulator does not enforce indexes,
# production does: a missing one fails the query with FAILED_PRECONDITION). Terraform's
# google_firestore_index resources and infra/firestore_indexes.json must match this.
REQUIRED_INDEXES: tuple[IndexSpec, ...] = (
    # claim_next: status == PENDING, environment in [...], order by priority desc, available_at.
    IndexSpec(
        "tasks",
        (
            ("status", "ASCENDING"),
            ("environment", "ASCENDING"),
            ("priority", "DESCENDING"),
            ("available_at", "ASCENDING"),
        ),
    ),
    # claim_next under contention: the same order within one claim shard.
    IndexSpec(
        "tasks",
        (
            ("status", "ASCENDING"),
            ("environment", "ASCENDING"),
            ("shard", "ASCENDING"),
            ("priority", "DESCENDING"),
            ("available_at", "ASCENDING"),
        ),
    ),
    # claim_next's fair-share probe: a PENDING task of an environment whose owner is not
    # among those already read (owner not-in [...]).
    IndexSpec("tasks", (("status", "ASCENDING"), ("environment", "ASCENDING"), ("owner", "ASCENDING"))),
    # pending_ids_available_before: status == PENDING by available_at.
    IndexSpec("tasks", (("status", "ASCENDING"), ("available_at", "ASCENDING"))),
    # expired_lease_ids: status in [FETCHED, PROCESSING], lease_expires_at < now.
    IndexSpec("tasks", (("status", "ASCENDING"), ("lease_expires_at", "ASCENDING"))),
    # list_tasks (newest first) by owner, by status, by both.
    IndexSpec("tasks", (("owner", "ASCENDING"), ("created_at", "DESCENDING"))),
    IndexSpec("tasks", (("status", "ASCENDING"), ("created_at", "DESCENDING"))),
    IndexSpec("tasks", (("owner", "ASCENDING"), ("status", "ASCENDING"), ("created_at", "DESCENDING"))),
    # subscribe_work's arrivals listener: the PENDING task of the environments written
    # last (created, or put back: a reaped lease, a released task, a retry).
    IndexSpec("tasks", (("status", "ASCENDING"), ("environment", "ASCENDING"), ("updated_at", "DESCENDING"))),
    # queue_stats: the oldest PENDING task, overall and per owner.
    IndexSpec("tasks", (("status", "ASCENDING"), ("created_at", "ASCENDING"))),
    IndexSpec("tasks", (("owner", "ASCENDING"), ("status", "ASCENDING"), ("created_at", "ASCENDING"))),
)


def indexes_as_json(collection: str = "tasks") -> dict[str, Any]:
    """REQUIRED_INDEXES in the ``firestore.indexes.json`` shape (Firebase CLI, Terraform input)."""
    return {
        "indexes": [
            {
                "collectionGroup": collection if spec.collection == "tasks" else spec.collection,
                "queryScope": "COLLECTION",
                "fields": [{"fieldPath": name, "order": order} for name, order in spec.fields],
            }
            for spec in REQUIRED_INDEXES
        ],
        "fieldOverrides": [],
    }


_TIMESTAMP_FIELDS = ("created_at", "available_at", "updated_at", "started_at", "finished_at")
_LEASE_EXPIRES_AT = "lease_expires_at"
_EXPIRE_AT = "expire_at"
_SHARD = "shard"
# Claim shards: every task document carries ``shard`` (0..CLAIM_SHARDS-1, a hash of its
# id), so claimers that contend can each read a different 64th of the queue.
CLAIM_SHARDS = 64
# How long a claimer keeps claiming from random shards after it lost a race: a fleet
# that contends once keeps contending; a lone claimer never enters this mode.
_SPREAD_S = 30.0
# Claimer announcements: how long one counts as live, and how often a claiming worker
# rewrites its own (each costs one write per environment and one count per environment
# and process: at 10,000 runners about 330 writes/s, spread over the environments).
_PRESENCE_S = 90.0
_PRESENCE_REFRESH_S = 30.0
# Random shards a claimer of a fleet reads before the whole queue's head.
_SHARD_DRAWS = 3
# Firestore's limit on the values of a not-in filter.
_NOT_IN_MAX = 10
# Firestore refuses an array directly inside an array (ComfyUI widgets can hold one);
# such a top-level field is stored as a JSON string under "<field>__json".
_JSON_SUFFIX = "__json"
# How many PENDING tasks a claim reads per page while skipping ones in retry backoff,
# and the most it reads in one claim.
_CLAIM_PAGE_SIZE = 10
# The page a claimer of a fleet reads of the whole queue when its shards were empty.
_SPREAD_FALLBACK_PAGE = 50
# A read inside a transaction that loses a lock is aborted before the commit, where the
# client's own retry does not reach; retried this often, with jittered backoff.
_ABORTED_READ_RETRIES = 5
_CLAIM_SCAN_LIMIT = 100


def _has_nested_array(value: Any, inside_array: bool = False) -> bool:
    if isinstance(value, list):
        return inside_array or any(_has_nested_array(item, True) for item in value)
    if isinstance(value, dict):
        return any(_has_nested_array(item, False) for item in value.values())
    return False


def _plain_utc(value: dt.datetime) -> dt.datetime:
    """The client returns its own datetime subclass; the model wants a plain tz-aware one."""
    utc = value.astimezone(dt.UTC)
    return dt.datetime(
        utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second, utc.microsecond, tzinfo=dt.UTC
    )


def encode_task(task: Task, expire_at: dt.datetime | None = None) -> dict[str, Any]:
    """The Firestore document of ``task``; ``expire_at`` is the field the TTL policy
    (infra/terraform/firestore.tf) deletes finished tasks on."""
    document = task.to_document()
    if expire_at is not None:
        document[_EXPIRE_AT] = expire_at
    for name in _TIMESTAMP_FIELDS:
        document[name] = getattr(task, name)
    document[_LEASE_EXPIRES_AT] = task.lease.expires_at if task.lease else None
    document[_SHARD] = claim_shard(task.taskId)
    for name in [name for name, value in document.items() if _has_nested_array(value)]:
        document[name + _JSON_SUFFIX] = json.dumps(document.pop(name))
    return document


def decode_task(document: dict[str, Any]) -> Task:
    """The task stored in a Firestore document (inverse of :func:`encode_task`)."""
    data = dict(document)
    data.pop(_LEASE_EXPIRES_AT, None)
    data.pop(_EXPIRE_AT, None)
    data.pop(_SHARD, None)
    for name in [name for name in data if name.endswith(_JSON_SUFFIX)]:
        data[name.removesuffix(_JSON_SUFFIX)] = json.loads(data.pop(name))
    for name in _TIMESTAMP_FIELDS:
        value = data.get(name)
        if isinstance(value, dt.datetime):
            data[name] = _plain_utc(value)
    return Task.from_document(data)


def claim_shard(task_id: str) -> int:
    """The claim shard of a task: stable (a hash of the id), uniform over CLAIM_SHARDS."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big") % CLAIM_SHARDS


def _replacement(previous: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    """Field updates that turn ``previous`` into exactly ``document`` (update() merges).

    Names are quoted as field paths, so a key holding a dot stays one field.
    """
    updates: dict[str, Any] = {FieldPath(name).to_api_repr(): value for name, value in document.items()}
    for name in previous.keys() - document.keys():
        updates[FieldPath(name).to_api_repr()] = firestore.DELETE_FIELD
    return updates


def idempotency_document_id(owner: str, key: str) -> str:
    """A fixed-length id per (owner, key): document ids cannot hold '/' or exceed 1500 bytes."""
    return hashlib.sha256(f"{owner}\x00{key}".encode()).hexdigest()


class FirestoreTaskStore(TaskStore):
    """Tasks in one Firestore collection; see the module docstring for the layout."""

    def __init__(
        self,
        client: firestore.Client,
        *,
        collection: str = "tasks",
        transaction_attempts: int = 30,
        retention: dt.timedelta = DEFAULT_RETENTION,
    ) -> None:
        self._client = client
        self.retention = retention
        self._tasks = client.collection(collection)
        self._idempotency_keys = client.collection(f"{collection}_idempotency_keys")
        # Many runners claiming at once contend on the same head-of-queue document; each
        # aborted transaction is retried keeping its place in line, so a generous cap
        # only matters under pathological contention.
        self._transaction_attempts = transaction_attempts
        self._rng = random.Random()  # noqa: S311  # spreads claimers, not a secret
        self._spread_until = 0.0  # monotonic time until which claims read a random shard
        self._fleet = client.collection(f"{collection}_fleet")
        self._claimers_collection = f"{collection}_claimers"
        self._fleet_lock = threading.Lock()
        # (environment, worker id) -> monotonic time of this process's last announcement,
        # and environment -> when this process last counted the announcements.
        self._announced: dict[tuple[str, str], float] = {}
        self._counted: dict[str, float] = {}
        self._claiming = 0  # claims in progress in this process (fetch_task serves many)
        self._shard_owners: set[str] = set()  # the owners the last shard read held
        self.claim_conflicts = 0  # claims lost to another claimer (a metric; the bench reads it)
        self._work_lock = threading.Lock()
        self._work_feeds: dict[frozenset[str], _WorkFeed] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> FirestoreTaskStore:
        """The client honours FIRESTORE_EMULATOR_HOST by itself (anonymous credentials)."""
        client = firestore.Client(project=settings.google_cloud_project, database=settings.firestore_database)
        return cls(
            client,
            collection=settings.firestore_collection,
            retention=dt.timedelta(days=settings.task_retention_days),
        )

    def close(self) -> None:
        with self._work_lock:
            feeds, self._work_feeds = list(self._work_feeds.values()), {}
        for feed in feeds:
            feed.close()
        self._client.close()  # type: ignore[no-untyped-call]  # the client's close() lacks annotations

    # --- helpers ----------------------------------------------------------------------
    def _run_transaction(self, body: Callable[[Any], _T]) -> _T:
        """Run ``body(transaction)`` in a retried read-write transaction.

        A ComfySwapError from ``body`` (a mutation refusing a transition, a missing task)
        commits nothing and is raised after the transaction ends: committing an empty
        transaction releases its locks, where a rollback after a lock timeout can fail
        and hide the real error. The client retries an aborted commit itself; an aborted
        read is retried here. Running out of attempts becomes a TransientError.
        """
        refused: list[ComfySwapError] = []

        def guarded(transaction: Any) -> _T | None:
            refused.clear()
            try:
                return body(transaction)
            except ComfySwapError as exc:
                refused.append(exc)
                return None

        last_error: Exception | None = None
        for attempt in range(_ABORTED_READ_RETRIES):
            transaction = self._client.transaction(max_attempts=self._transaction_attempts)
            try:
                result = firestore.transactional(guarded)(transaction)
            except gexc.Aborted as exc:
                last_error = exc
                time.sleep(random.uniform(0, 0.05 * 2**attempt))  # noqa: S311  # jitter, not crypto
                continue
            except ValueError as exc:
                if not isinstance(exc.__cause__, gexc.Aborted):
                    raise
                last_error = exc
                break
            if refused:
                raise refused[0]
            return cast(_T, result)
        raise self._contention("the task store") from last_error

    # --- primitives -------------------------------------------------------------------
    def create(self, task: Task, *, serialized: str | None = None) -> Task:
        # ``serialized`` is not used: a Firestore document is a map of typed fields.
        batch = self._client.batch()
        batch.create(self._tasks.document(task.taskId), encode_task(task, self.expire_at(task)))
        if task.idempotency_key:
            batch.create(
                self._idempotency_keys.document(idempotency_document_id(task.owner, task.idempotency_key)),
                {"task_id": task.taskId, "owner": task.owner, "idempotency_key": task.idempotency_key},
            )
        try:
            batch.commit()
        except gexc.AlreadyExists as exc:
            raise self.creation_conflict(task) from exc
        return task

    def get(self, task_id: str) -> Task | None:
        snapshot = self._tasks.document(task_id).get()
        return decode_task(snapshot.to_dict() or {}) if snapshot.exists else None

    def update(self, task_id: str, mutate: Mutation) -> Task:
        reference = self._tasks.document(task_id)

        def body(transaction: Any) -> Task:
            snapshot = reference.get(transaction=transaction)
            if not snapshot.exists:
                raise _not_found(task_id)
            updated = mutate(decode_task(snapshot.to_dict() or {}))
            transaction.set(reference, encode_task(updated, self.expire_at(updated)))
            return updated

        return self._run_transaction(body)

    def claim(self, task_id: str, *, worker_id: str, lease_seconds: float) -> Task:
        """Lease one named task (push delivery) with a compare-and-set on its update time,
        as claim_next writes, not a transaction: Cloud Tasks delivers at least once, and
        duplicate deliveries of one task (a retry, two regions' queues) arrive together.
        As transactions they queued on the document's lock; the emulator resolves that by
        lock timeouts (8 deliveries took 2.5 s, once 60 s and 239 aborted commits, and
        seven ended store_contention instead of not_claimable). Here one write wins and
        each other one fails at once, reads the task again and gets the Conflict."""
        reference = self._tasks.document(task_id)
        for _ in range(self._transaction_attempts):
            snapshot = reference.get()
            if not snapshot.exists:
                raise _not_found(task_id)
            document = snapshot.to_dict() or {}
            claimed = claimed_by_name(decode_task(document), worker_id, lease_seconds, utcnow())
            if self._write_if_unchanged(snapshot, document, claimed):
                return claimed
            # Changed (or deleted) since the read: the next read tells why.
        raise self._contention("the task store")

    def _write_if_unchanged(self, snapshot: Any, document: dict[str, Any], updated: Task) -> bool:
        """Write ``updated`` over the task ``snapshot`` read, only if nobody wrote it since (a
        compare-and-set on its update time): False when it changed or went, or (the
        emulator, under load) the write timed out on its lock."""
        try:
            snapshot.reference.update(
                _replacement(document, encode_task(updated)),
                option=self._client.write_option(last_update_time=snapshot.update_time),
            )
        except (gexc.FailedPrecondition, gexc.NotFound, gexc.Aborted):
            return False
        return True

    def _contention(self, what: str) -> TransientError:
        return TransientError(
            f"{what} is busy (too much contention); try again",
            code="store_contention",
            details={"attempts": self._transaction_attempts},
        )

    def _claim(self, claim: Claim) -> Task | None:
        """Lease the best available PENDING task with a compare-and-set on its update time.

        Fair between owners (TaskStore.claim_next) within the candidates one claim reads
        (up to _CLAIM_SCAN_LIMIT, best priority first): Firestore cannot order by "each
        owner's head", so an owner whose best task ranks below that window waits for it.

        Why not a read-write transaction around the query: its reads lock the head of
        the queue, so every concurrent claimer queues on the same lock, and the emulator
        resolves such a collision only by a 2 s lock timeout. A write conditioned on the
        document's ``update_time`` (as read by the query) is the same compare-and-set
        without locks: of two claimers of one task exactly one write succeeds, the other
        gets FAILED_PRECONDITION at once and moves on.

        Many claimers (issue 14): a claimer with no evidence of others takes the head of
        the whole queue (strictly best priority, then oldest: a lone runner's order).
        One is of a fleet when another worker announced itself for its environments
        within _PRESENCE_S (``_fleet_seen``: so a fleet that starts together does not
        race for the head with its first claims), when another claim is in progress in
        this process (a fetch_task instance serving many runners), or when it lost a
        race in the last _SPREAD_S seconds. A claimer of a fleet reads a random claim
        shard (a 64th of the queue, by task id; up to _SHARD_DRAWS draws
        when shards are empty, then a larger page of the whole queue) and takes a random
        one of the candidates equal to the first in turn (same owner, same priority).
        Claimers then spread over up to CLAIM_SHARDS x _CLAIM_PAGE_SIZE tasks instead of
        all writing the oldest. Owners' turns hold across shards: when every owner in
        the shard read has claimed tasks and another owner waits (a not-in probe), the
        claimer reads the whole queue instead. Priorities hold within a shard, and FIFO
        loosens to the shards' first pages: the oldest task waits until a claimer draws
        its shard and picks it (on average at most 64 x 10 claims of the fleet). A lost
        race is retried at once from another random shard.
        """
        envs = list(claim.environments)
        with self._fleet_lock:
            self._claiming += 1
            crowded = self._claiming > 1
        try:
            if self._fleet_seen(claim.worker_id, envs) or crowded:
                self._spread_until = max(self._spread_until, time.monotonic() + _SPREAD_S)
            return self._claim_as_one_of(claim, envs)
        finally:
            with self._fleet_lock:
                self._claiming -= 1

    def _claim_as_one_of(self, claim: Claim, envs: list[str]) -> Task | None:
        """claim_next's loop: the head (alone) or random claim shards (one of a fleet)
        until one compare-and-set wins."""
        now, max_running_per_owner = claim.now, claim.max_running_per_owner
        for _ in range(self._transaction_attempts):
            spread = time.monotonic() < self._spread_until
            turns: list[Any] = []
            if spread:
                # Several draws: a shard drained near the end of a backlog sends a claimer
                # to another one before the whole queue's head, where the others would be.
                for shard in self._rng.sample(range(CLAIM_SHARDS), _SHARD_DRAWS):
                    in_shard = self._claim_turns(envs, now, max_running_per_owner, shard)
                    if in_shard is None:
                        break  # another owner's turn may be in another shard: the whole queue
                    turns = spread_claims(in_shard, self._rng)
                    if turns:
                        break
            if not turns:
                if spread:
                    # Near the end of a backlog: read more of the head, so the claimers
                    # left spread over all that remains instead of its first page.
                    turns = spread_claims(
                        self._claim_turns(envs, now, max_running_per_owner, None, _SPREAD_FALLBACK_PAGE)
                        or [],
                        self._rng,
                    )
                else:
                    turns = self._claim_turns(envs, now, max_running_per_owner, None) or []
            if not turns:
                return None  # nothing available, or every owner waiting is at its cap
            snapshot = turns[0]
            document = snapshot.to_dict() or {}
            claimed = leased_copy(decode_task(document), claim.worker_id, claim.lease_seconds, now)
            if self._write_if_unchanged(snapshot, document, claimed):
                return claimed
            # Another runner claimed (or someone changed) it first, or the write timed
            # out on its lock: this claimer is one of several, so it reads a random shard
            # from now on (see above).
            self.claim_conflicts += 1
            self._spread_until = time.monotonic() + _SPREAD_S
        raise self._contention("the task queue")

    def _fleet_seen(self, worker_id: str, envs: list[str]) -> bool:
        """Whether another worker claiming ``envs`` announced itself in the last
        _PRESENCE_S seconds. Announces ``worker_id`` first (a write per environment), then
        counts (an aggregation per environment: one read per 1,000 claimers), each at
        most every _PRESENCE_REFRESH_S per process; between counts the answer of the last
        one holds (it set _spread_until). Announcing before counting matters when a
        fleet starts together: of two claimers, the one that counts last sees both.

        A hint, not a lock: when the store cannot answer, the claim goes on in a lone
        claimer's order (a lost race still spreads it), rather than fail a claim."""
        now_m = time.monotonic()
        with self._fleet_lock:
            announce = [env for env in envs if now_m >= self._announced.get((env, worker_id), 0.0)]
            count = [env for env in envs if now_m >= self._counted.get(env, 0.0)]
            if len(self._announced) > 4096:  # a fetch_task instance sees many workers come and go
                self._announced = {key: due for key, due in self._announced.items() if due > now_m}
            for env in announce:
                self._announced[(env, worker_id)] = now_m + _PRESENCE_REFRESH_S
            for env in count:
                self._counted[env] = now_m + _PRESENCE_REFRESH_S
        if not announce and not count:
            return False
        now = utcnow()
        try:
            if announce:
                batch = self._client.batch()
                for env in announce:
                    batch.set(
                        self._claimers(env).document(hashlib.sha256(worker_id.encode()).hexdigest()),
                        {
                            "worker_id": worker_id,
                            "seen_at": now,
                            _EXPIRE_AT: now + dt.timedelta(seconds=_PRESENCE_S),
                        },
                    )
                batch.commit()
            cutoff = now - dt.timedelta(seconds=_PRESENCE_S)
            return any(self._live_claimers(env, cutoff) > 1 for env in count)
        except gexc.GoogleAPICallError as exc:
            log_event(logger, "claimer_presence_unavailable", level=logging.WARNING, error=str(exc))
            return False

    def _claimers(self, env: str) -> Any:
        return self._fleet.document(env).collection(self._claimers_collection)

    def _live_claimers(self, env: str, cutoff: dt.datetime) -> int:
        """Workers of ``env`` that announced themselves since ``cutoff`` (a count
        aggregation on seen_at's automatic single-field index: no composite index)."""
        aggregation: Any = (
            self._claimers(env).where(filter=FieldFilter("seen_at", ">=", cutoff)).count(alias="n")
        )
        results = aggregation.get()
        return int(results[0][0].value) if results else 0

    def _claim_turns(
        self,
        envs: list[str],
        now: dt.datetime,
        cap: int,
        shard: int | None,
        page_size: int = _CLAIM_PAGE_SIZE,
    ) -> list[Any] | None:
        """Claimable PENDING snapshots of ``envs`` (of one claim shard, if given), in the
        order owners take turns (fair_pick), best first; [] if none; None if the shard's
        owners all have claimed tasks while another owner waits (maybe in another shard,
        with none claimed: its turn comes first, so the caller reads the whole queue)."""
        counts: dict[str, int] = {}
        available = self._claim_candidates(envs, now, shard, counts, page_size)
        if available is None:
            return None
        if not available:
            return []
        owners = {str(snapshot.get("owner") or "") for snapshot in available}
        if cap or len(owners) > 1:
            for owner in owners - counts.keys():
                counts[owner] = self._running_count(owner)
        by_id = {snapshot.id: snapshot for snapshot in available}
        turns = fair_pick([decode_task(snapshot.to_dict() or {}) for snapshot in available], counts, cap)
        return [by_id[task.taskId] for task in turns]

    def _running_count(self, owner: str) -> int:
        """The owner's claimed (FETCHED or PROCESSING) tasks: a count aggregation, billed
        one read per 1,000 entries, instead of reading every running task of the fleet."""
        aggregation: Any = (
            self._tasks.where(filter=FieldFilter("owner", "==", owner))
            .where(filter=FieldFilter("status", "in", [status.value for status in RUNNING_STATUSES]))
            .count(alias="n")
        )
        results = aggregation.get()
        return int(results[0][0].value) if results else 0

    def _other_owner_waiting(self, envs: list[str], owners: set[str]) -> bool:
        """Whether a PENDING task of ``envs`` belongs to an owner not in ``owners`` (one
        query of at most one document per environment; True when it cannot tell)."""
        if len(owners) > _NOT_IN_MAX:
            return True
        for env in envs:
            probe = (
                self._tasks.where(filter=FieldFilter("status", "==", TaskStatus.PENDING.value))
                .where(filter=FieldFilter("environment", "==", env))
                .where(filter=FieldFilter("owner", "not-in", sorted(owners)))
                .limit(1)
            )
            if list(probe.stream()):
                return True
        return False

    def _claim_candidates(
        self, envs: list[str], now: dt.datetime, shard: int | None, counts: dict[str, int], page_size: int
    ) -> list[Any] | None:
        """PENDING snapshots of ``envs`` (of ``shard``, if given) available at ``now``,
        best first; ``counts`` collects the running counts it had to read.

        Firestore cannot filter available_at <= now while ordering by priority first,
        so tasks in retry backoff are skipped here; within a priority the available ones
        sort first (available_at ascending), so skipping rarely needs a second page. Pages
        are read on while every candidate so far belongs to an owner with claimed tasks
        and another owner has PENDING tasks (it may be waiting further down, with none
        claimed: it goes first). With one owner waiting, that costs one probe, no count.
        """
        queue = self._tasks.where(filter=FieldFilter("status", "==", TaskStatus.PENDING.value)).where(
            filter=FieldFilter("environment", "in", envs)
        )
        if shard is not None:
            queue = queue.where(filter=FieldFilter(_SHARD, "==", shard))
        queue = (
            queue.order_by("priority", direction=firestore.Query.DESCENDING)
            .order_by("available_at", direction=firestore.Query.ASCENDING)
            .limit(page_size)
        )
        if shard is not None:
            # The probe for other owners goes before the page when the owners it will hold
            # are known from the last claim (one tenant's fleet: always): a request between
            # reading the page and writing its task would give other claimers more time
            # to take that task first.
            expected = self._shard_owners
            other_waiting = self._other_owner_waiting(envs, expected) if expected else None
            available = [
                snapshot for snapshot in queue.stream() if _plain_utc(snapshot.get("available_at")) <= now
            ]
            owners = {str(snapshot.get("owner") or "") for snapshot in available}
            if owners:
                self._shard_owners = owners
            if other_waiting is None or owners != expected:
                other_waiting = bool(available) and self._other_owner_waiting(envs, owners)
            if available and other_waiting:
                for owner in owners - counts.keys():
                    counts[owner] = self._running_count(owner)
                if all(counts[owner] > 0 for owner in owners):
                    return None
            return available
        page = queue
        scanned = 0
        available = []
        seen: set[str] = set()
        while scanned < _CLAIM_SCAN_LIMIT:
            snapshots = list(page.stream())
            available += [
                snapshot for snapshot in snapshots if _plain_utc(snapshot.get("available_at")) <= now
            ]
            if len(snapshots) < page_size:
                break
            seen |= {str(snapshot.get("owner") or "") for snapshot in snapshots}
            if available and not self._other_owner_waiting(envs, seen):
                break
            waiting = {str(snapshot.get("owner") or "") for snapshot in available}
            for owner in waiting - counts.keys():
                counts[owner] = self._running_count(owner)
            if any(counts[owner] == 0 for owner in waiting):
                break
            scanned += len(snapshots)
            page = queue.start_after(snapshots[-1])
        return available

    def list_tasks(
        self, *, owner: str | None = None, statuses: Iterable[TaskStatus] | None = None, limit: int = 50
    ) -> list[Task]:
        query: Any = self._tasks
        if owner is not None:
            query = query.where(filter=FieldFilter("owner", "==", owner))
        status_values = [TaskStatus(status).value for status in statuses] if statuses is not None else []
        if len(status_values) == 1:
            query = query.where(filter=FieldFilter("status", "==", status_values[0]))
        elif status_values:
            query = query.where(filter=FieldFilter("status", "in", status_values))
        query = query.order_by("created_at", direction=firestore.Query.DESCENDING).limit(limit)
        return [decode_task(snapshot.to_dict()) for snapshot in query.stream()]

    def queue_stats(self, *, owner: str | None = None) -> QueueStats:
        scope: Any = self._tasks
        if owner is not None:
            scope = scope.where(filter=FieldFilter("owner", "==", owner))
        counts: dict[str, int] = {}
        for status in TaskStatus:
            aggregation = scope.where(filter=FieldFilter("status", "==", status.value)).count(alias="n")
            results = aggregation.get()
            counts[status.value.lower()] = int(results[0][0].value) if results else 0
        oldest_pending_age_s: float | None = None
        oldest = list(
            scope.where(filter=FieldFilter("status", "==", TaskStatus.PENDING.value))
            .order_by("created_at", direction=firestore.Query.ASCENDING)
            .limit(1)
            .stream()
        )
        if oldest:
            created_at = oldest[0].get("created_at")
            oldest_pending_age_s = (utcnow() - _plain_utc(created_at)).total_seconds()
        return QueueStats(**counts, oldest_pending_age_s=oldest_pending_age_s)

    def finished_since(self, cutoff: dt.datetime, *, limit: int = 2000) -> list[Task]:
        # finished_at is a native timestamp set only when a task ends, so a range on it
        # reads exactly the window (a single-field index; no composite index needed).
        query: Any = (
            self._tasks.where(filter=FieldFilter("finished_at", ">=", cutoff))
            .order_by("finished_at", direction=firestore.Query.DESCENDING)
            .limit(limit)
        )
        return [decode_task(snapshot.to_dict()) for snapshot in query.stream()]

    def find_by_idempotency_key(self, owner: str, key: str) -> Task | None:
        snapshot = self._idempotency_keys.document(idempotency_document_id(owner, key)).get()
        if not snapshot.exists:
            return None
        return self.get(str(snapshot.get("task_id")))

    def expired_lease_ids(self, now: dt.datetime, limit: int = 100) -> list[str]:
        query = (
            self._tasks.where(
                filter=FieldFilter("status", "in", sorted(status.value for status in LEASED_STATUSES))
            )
            .where(filter=FieldFilter(_LEASE_EXPIRES_AT, "<", now))
            .limit(limit)
        )
        return [snapshot.id for snapshot in query.stream()]

    def expired_task_ids(self, now: dt.datetime, limit: int = 100) -> list[str]:
        # Deployed, the TTL policy deletes these (within about a day of expire_at) and
        # expire_at has no index, so nothing runs this there; it serves the emulator,
        # which has no TTL, and the contract tests.
        query = (
            self._tasks.where(filter=FieldFilter(_EXPIRE_AT, "<=", now))
            .order_by(_EXPIRE_AT, direction=firestore.Query.ASCENDING)
            .limit(limit)
        )
        return [snapshot.id for snapshot in query.stream()]

    def delete(self, task_id: str) -> bool:
        reference = self._tasks.document(task_id)
        snapshot = reference.get()
        if not snapshot.exists:
            return False
        task = decode_task(snapshot.to_dict() or {})
        batch = self._client.batch()
        batch.delete(reference)
        if task.idempotency_key:
            batch.delete(
                self._idempotency_keys.document(idempotency_document_id(task.owner, task.idempotency_key))
            )
        batch.commit()
        return True

    def pending_ids_available_before(self, cutoff: dt.datetime, limit: int = 100) -> list[str]:
        query = (
            self._tasks.where(filter=FieldFilter("status", "==", TaskStatus.PENDING.value))
            .where(filter=FieldFilter("available_at", "<", cutoff))
            .order_by("available_at", direction=firestore.Query.ASCENDING)
            .limit(limit)
        )
        return [snapshot.id for snapshot in query.stream()]

    # --- change notifications: Firestore real-time listeners ---------------------------
    def subscribe_task(self, task_id: str, listener: Listener) -> Callable[[], None]:
        """A document listener: Firestore pushes every committed change of the task (the
        first delivery is the state when listening began, so nothing between the caller's
        read and this subscription is missed). Costs one read per delivered change."""

        def on_snapshot(snapshots: list[Any], changes: Any, read_time: Any) -> None:
            for snapshot in snapshots:
                if snapshot.exists:
                    listener(_change_of(decode_task(snapshot.to_dict() or {})))

        watch = self._tasks.document(task_id).on_snapshot(on_snapshot)
        return watch.unsubscribe

    def subscribe_work(self, environments: Iterable[str], listener: Listener) -> Callable[[], None]:
        """Wake on new work of ``environments``: one shared pair of query listeners per
        environment set and process (opened by the first waiter, kept), on the head of the
        claim queue and on the PENDING task written last (see :class:`_WorkFeed`)."""
        key = frozenset(environments)
        with self._work_lock:
            feed = self._work_feeds.get(key)
            if feed is None:
                envs = sorted(key)
                feed = self._work_feeds[key] = _WorkFeed(
                    self._claim_head_query(envs), self._arrivals_query(envs)
                )
        return feed.subscribe(listener)

    def next_wake_at(self, environments: Iterable[str], now: dt.datetime) -> dt.datetime | None:
        """The soonest end of a retry backoff the listeners saw (the head's, or that of a
        task put back behind it), from their copies (no read). Expired leases are the
        scheduled reaper's (POST /internal/reap, every minute)."""
        with self._work_lock:
            feed = self._work_feeds.get(frozenset(environments))
        return feed.next_wake_at(now) if feed is not None else None

    def _claim_head_query(self, envs: list[str]) -> Any:
        # The claim query's own order and index (REQUIRED_INDEXES[0]), limited to its head:
        # a new task wakes waiters when it becomes the head, and each change costs one
        # read per listener, not one per queued task.
        return (
            self._tasks.where(filter=FieldFilter("status", "==", TaskStatus.PENDING.value))
            .where(filter=FieldFilter("environment", "in", envs))
            .order_by("priority", direction=firestore.Query.DESCENDING)
            .order_by("available_at", direction=firestore.Query.ASCENDING)
            .limit(1)
        )

    def _arrivals_query(self, envs: list[str]) -> Any:
        # The PENDING task written last: every write that makes a task PENDING (create,
        # release, reap, retry) sets updated_at, so it is the newest there even when it
        # sorts behind the head (a higher-priority task in retry backoff stays the head:
        # the head listener sees no change). Limited to one: one read per such write.
        # updated_at is the writer's clock: a write stamped before one already seen (clock
        # skew between writers) wakes nobody and costs its waiters their deadline.
        return (
            self._tasks.where(filter=FieldFilter("status", "==", TaskStatus.PENDING.value))
            .where(filter=FieldFilter("environment", "in", envs))
            .order_by("updated_at", direction=firestore.Query.DESCENDING)
            .limit(1)
        )


def _not_found(task_id: str) -> NotFound:
    return NotFound(f"task {task_id} not found", code="task_not_found", details={"task_id": task_id})


def spread_claims(candidates: list[Any], rng: random.Random) -> list[Any]:
    """``candidates`` (in turn order, best first) in the order a claimer of a fleet tries
    them: the leading ones of the head's owner and priority rotated by a random offset,
    the rest after them.

    Every runner's query returns the same page; going on in order would make them all
    write the same document at once and all but one lose (issue 14: conflicts per claim
    grew with the runner count). A random start among the head's equals keeps priorities
    and owners' turns strict and FIFO within a priority to about one page (10 tasks)."""
    if len(candidates) < 2:
        return candidates

    def standing(snapshot: Any) -> tuple[Any, Any]:
        return snapshot.get("owner"), snapshot.get("priority")

    head = standing(candidates[0])
    same = next((i for i, snapshot in enumerate(candidates) if standing(snapshot) != head), len(candidates))
    start = rng.randrange(same)
    return candidates[start:same] + candidates[:start] + candidates[same:]


def _change_of(task: Task) -> TaskChange:
    return TaskChange(
        task.taskId,
        task.status.value,
        task.environment,
        task.available_at.timestamp(),
        task.lease.owner if task.lease else "",
        task,
    )


class _WorkFeed:
    """Two query listeners on a claim queue, fanned out to local waiters.

    The head listener (the claim order's first task) wakes waiters when the head changes
    and gives the head's backoff end. Alone it missed a task claimable now that sorts
    behind a head in retry backoff (a lower priority): the head stays the head, no
    snapshot, and every waiter slept to its deadline. The arrivals listener (the PENDING
    task written last) sees every task that becomes PENDING; it wakes a waiter only for a
    write newer than any it saw (the newest being claimed moves an older one up: no new
    work) of a task that sorts behind the head (one that sorts first becomes the head:
    the head listener wakes for it, so the common case still costs one wake)."""

    def __init__(self, head_query: Any, arrivals_query: Any) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[int, Listener] = {}
        self._next_id = 0
        self._head: Task | None = None
        self.head_available_at: dt.datetime | None = None
        self._newest: dt.datetime | None = None  # the latest updated_at the arrivals saw
        self._later_at: dt.datetime | None = None  # the soonest backoff end behind the head
        self._head_seen = threading.Event()
        self._arrivals_seen = threading.Event()
        self._watches = [
            head_query.on_snapshot(self._on_head_snapshot),
            arrivals_query.on_snapshot(self._on_arrivals_snapshot),
        ]

    def listening(self) -> bool:
        """Both listeners delivered their first snapshot (what a test waits for: a task
        written before that is in the first snapshot, not a change)."""
        return self._head_seen.is_set() and self._arrivals_seen.is_set()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        with self._lock:
            self._next_id += 1
            listener_id = self._next_id
            self._listeners[listener_id] = listener

        def unsubscribe() -> None:
            with self._lock:
                self._listeners.pop(listener_id, None)

        return unsubscribe

    def next_wake_at(self, now: dt.datetime) -> dt.datetime | None:
        with self._lock:
            if self._later_at is not None and self._later_at <= now:
                self._later_at = None
            times = [at for at in (self.head_available_at, self._later_at) if at is not None and at > now]
        return min(times, default=None)

    def _on_head_snapshot(self, snapshots: list[Any], changes: Any, read_time: Any) -> None:
        head = decode_task(snapshots[0].to_dict() or {}) if snapshots else None
        with self._lock:
            self._head = head
            self.head_available_at = head.available_at if head is not None else None
        self._head_seen.set()
        if head is not None:  # None: the queue emptied, nothing to claim
            self._deliver(head)

    def _on_arrivals_snapshot(self, snapshots: list[Any], changes: Any, read_time: Any) -> None:
        newest = decode_task(snapshots[0].to_dict() or {}) if snapshots else None
        self._arrivals_seen.set()
        if newest is None:
            return
        with self._lock:
            if self._newest is not None and newest.updated_at <= self._newest:
                return
            self._newest = newest.updated_at
            head = self._head
            if head is None or _claim_order(newest) <= _claim_order(head):
                return  # it is (or becomes) the head: the head listener wakes for it
            if newest.available_at > utcnow() and (
                self._later_at is None or newest.available_at < self._later_at
            ):
                self._later_at = newest.available_at  # no write will mark its backoff's end
        self._deliver(newest)

    def _deliver(self, task: Task) -> None:
        with self._lock:
            listeners = list(self._listeners.values())
        change = _change_of(task)
        for listener in listeners:
            listener(change)

    def close(self) -> None:
        for watch in self._watches:
            watch.unsubscribe()


def _claim_order(task: Task) -> tuple[int, dt.datetime, str]:
    """Where ``task`` sorts in the claim query (priority desc, available_at, then id)."""
    return -task.priority, task.available_at, task.taskId
