"""Runner pools: where push dispatch may send a task, and in which order it tries them.

A pool is one region's GPU runner (a Cloud Run service) with its own Cloud Tasks queues,
the queues' target URL and the OIDC identity and audience their pushes carry. Terraform
writes them into RUNNER_POOLS (a JSON list, from ``var.runner_pools``); without it the
single-region settings (CLOUD_TASKS_LOCATION, CLOUD_TASKS_QUEUE(S), RUNNER_URL, ...) make
one pool.

The order for a task is deterministic, so every process (create_task, the reaper, a
runner re-dispatching) agrees on it without talking to each other:

1. only pools that serve the task's environment (a pool's ``environments``; empty = all),
   so an environment served by one pool alone is pinned to it;
2. among those, weighted rendezvous hashing of the pool name and the task id: each pool
   is first for about weight/total of the tasks, adding or removing a pool moves only
   the tasks that pool wins or loses, and the rest of the order is the fallback order
   when a region's queue cannot be reached;
3. pools of weight 0 last: fallback only (a region kept warm for failover).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

__all__ = ["RunnerPool", "parse_runner_pools", "pool_order"]

# A Google Cloud region id (us-central1, europe-west4, northamerica-northeast1).
REGION_PATTERN = r"^[a-z]+-[a-z]+[0-9]+$"


class RunnerPool(BaseModel):
    """One region's runner and the queues that feed it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,39}$")
    location: str = Field(pattern=REGION_PATTERN, description="Region of the queues (and the runner).")
    queues: tuple[str, ...] = Field(min_length=1, description="Queue ids, in the order the queue hash uses.")
    runner_url: str = Field(pattern=r"^https?://[^\s/]+", description="The runner's base URL (push target).")
    audience: str = Field("", description="Audience of the push's OIDC token; empty = runner_url.")
    invoker_email: str = Field("", description="Service account whose OIDC token Cloud Tasks attaches.")
    weight: float = Field(1.0, ge=0, le=1000, description="Share of the unpinned tasks; 0 = fallback only.")
    environments: tuple[str, ...] = Field((), description="Environments this pool serves; empty = all.")

    @property
    def effective_audience(self) -> str:
        return self.audience or self.runner_url.rstrip("/")

    def serves(self, environment: str) -> bool:
        return not self.environments or environment in self.environments


_POOL_LIST = TypeAdapter(list[RunnerPool])


def parse_runner_pools(value: object) -> tuple[RunnerPool, ...]:
    """RUNNER_POOLS (a JSON list, or already a list in tests) -> checked pools.

    Raises ValueError with a message naming the pool and the field at fault.
    """
    if isinstance(value, str):
        if not value.strip():
            return ()
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"must be a JSON list of pools ({exc.msg} at character {exc.pos})") from None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise ValueError('must be a JSON list of pools, e.g. [{"name": ..., "location": ..., ...}]')
    try:
        pools = tuple(_POOL_LIST.validate_python(value))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = error["loc"]
            index = where[0] if where else "?"
            label = _pool_label(value, index)
            field = ".".join(str(part) for part in where[1:]) or "pool"
            problems.append(f"{label} {field}: {error['msg']}")
        raise ValueError("; ".join(problems)) from None
    _check_together(pools)
    return pools


def _pool_label(raw: list[object], index: object) -> str:
    entry = raw[index] if isinstance(index, int) and index < len(raw) else None
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"pool {index} ({name})" if isinstance(name, str) else f"pool {index}"


def _check_together(pools: tuple[RunnerPool, ...]) -> None:
    """What no single pool can get wrong: duplicate names or queues, and no pool to pick."""
    if not pools:
        return
    names = [pool.name for pool in pools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"pool names must be unique: {', '.join(duplicates)} repeated")
    queues = [(pool.location, queue) for pool in pools for queue in pool.queues]
    shared = sorted({f"{where}/{queue}" for where, queue in queues if queues.count((where, queue)) > 1})
    if shared:
        # A queue in two pools would carry two pools' target URLs under one task name.
        raise ValueError(f"a queue belongs to one pool only: {', '.join(shared)} listed twice")
    if all(pool.weight == 0 for pool in pools):
        raise ValueError("at least one pool needs a weight above 0 (weight 0 = fallback only)")


def _rendezvous_score(pool: RunnerPool, task_id: str) -> float:
    """Weighted rendezvous score: the highest wins with probability weight/total."""
    digest = hashlib.sha256(f"{pool.name}/{task_id}".encode()).digest()
    # A uniform draw in (0, 1) from 64 bits: never 0 or 1, so the logarithm is finite.
    uniform = (int.from_bytes(digest[:8], "big") + 0.5) / 2.0**64
    return pool.weight / -math.log(uniform)


def pool_order(pools: Sequence[RunnerPool], task_id: str, environment: str) -> list[RunnerPool]:
    """The pools to try for a task, first choice first (empty: no pool serves its environment)."""
    candidates = [pool for pool in pools if pool.serves(environment)]
    return sorted(
        candidates,
        key=lambda pool: (pool.weight > 0, _rendezvous_score(pool, task_id), pool.name),
        reverse=True,
    )
