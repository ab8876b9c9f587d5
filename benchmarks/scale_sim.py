"""Figure 10: the capacity model of docs/scale.md played forward (issue 14, item 5).

A seeded discrete-event simulation in pure Python (no dependency): tasks arrive as a
Poisson stream with a mix of image and video jobs, each goes to a region (by weight) and,
in push mode, to one of that region's Cloud Tasks queues (by hash, as
shared/dispatch/cloud_tasks.py does); queues dispatch at most ``queue_dispatch_per_s`` each
(Cloud Tasks' 500/s); GPU slots run one task at a time and crash at a given rate (the task
waits for its lease to expire, then runs again; the slot comes back after a restart).
Every task costs the Firestore requests figure 7 counts (create, claim, completion,
progress writes of a video); the store is a pool of ``store_servers`` servers with a
per-request service time (1 server = the emulator, which answers one request at a
time; None = Firestore, treated as parallel with a latency). In pull mode a runner
queries the head of the queue and claims with a compare-and-set: a claim that lost to
another runner (the task was claimed between its query and its write) is a conflict and
the runner tries the next candidate, as ``FirestoreTaskStore.claim_next`` does.

Printed: queue wait p50/p99, GPU utilisation, claims/s, conflicts per claim, and the first
published limit the traffic crosses (Firestore writes to a collection with a sequential
indexed field, a single document's sustained write rate, the 500/50/5 ramp, a queue's
dispatch rate). It is checked first against figure 9 (many runners on the emulator) at the
runner counts both can run, then extrapolated to 1,000 tasks/s on 10,000 GPUs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Result", "Scenario", "simulate"]

# Published limits (docs/scale.md cites each).
QUEUE_DISPATCH_PER_S = 500.0  # Cloud Tasks RateLimits.max_dispatches_per_second maximum
# Cloud Tasks picks max_burst_size from the rate (output only); 100 is an assumption.
QUEUE_BURST = 100.0
SEQUENTIAL_INDEX_WRITES_PER_S = 500.0  # Firestore best practices: sequential indexed field
DOCUMENT_WRITES_PER_S = 1.0  # Firestore: sustained writes to one document
RAMP_START_OPS_PER_S = 500.0  # Firestore "500/50/5": start at 500 ops/s,
RAMP_GROWTH = 1.5  # then at most +50%
RAMP_STEP_S = 300.0  # every 5 minutes


@dataclasses.dataclass(frozen=True)
class Scenario:
    """What is simulated. Times in seconds; rates per second."""

    arrivals_per_s: float = 1000.0
    duration_s: float = 60.0
    image_fraction: float = 0.95
    image_gpu_s: float = 3.0
    video_gpu_s: float = 60.0
    # GPU slots per region and the share of arrivals each region gets.
    regions: tuple[tuple[str, int, float], ...] = (
        ("us-central1", 4000, 0.4),
        ("europe-west4", 3000, 0.3),
        ("asia-southeast1", 3000, 0.3),
    )
    mode: str = "push"  # push: Cloud Tasks queues; pull: runners claim from Firestore
    queues_per_region: int = 2
    queue_dispatch_per_s: float = QUEUE_DISPATCH_PER_S
    # Firestore requests per task (figure 7): create, claim, complete (+ progress for video).
    image_writes: int = 3
    video_writes: int = 38
    store_servers: int | None = None  # None: parallel (Firestore); 1: the emulator
    store_request_s: float = 0.02
    client_request_s: float = 0.0  # client-side time per request, not serialised by the store
    claim_queries: int = 2  # pull: reads before the compare-and-set (running per owner, the page)
    conflict_cost: float = 1.0  # a lost compare-and-set's server time, as a share of a request's
    claim_page: int = 10  # pull: the candidates one claim query returns (_CLAIM_PAGE_SIZE)
    spread_first: bool = False  # pull: the first try is a random one of the page, not its head
    crashes_per_slot_hour: float = 0.0
    lease_s: float = 60.0
    restart_s: float = 60.0
    backlog: int = 0  # tasks already queued at time 0 (figure 9 creates them before timing)
    drain: bool = False  # run until every task is done (checks: none lost) or stop at duration_s
    measure_from_s: float = 0.0  # waits and GPU busy time count from here (after the warm-up)
    seed: int = 14


@dataclasses.dataclass
class Result:
    tasks_arrived: int
    tasks_done: int
    claims: int
    conflicts: int
    claims_per_s: float
    wait_p50_s: float
    wait_p99_s: float
    gpu_utilisation: float
    first_limit: str
    first_limit_at_s: float | None
    duplicates: int
    lost: int
    limits_crossed: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def conflicts_per_claim(self) -> float:
        return self.conflicts / self.claims if self.claims else 0.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


class _Store:
    """A pool of servers answering requests FIFO, each taking ``service_s``."""

    def __init__(self, servers: int | None, service_s: float, client_s: float, rng: random.Random) -> None:
        self._free_at = [0.0] * servers if servers else None
        self._service_s = service_s
        self._client_s = client_s
        self._rng = rng

    def request(self, now: float, cost: float = 1.0) -> float:
        """When a request sent at ``now`` is answered (jitter +-20%, seeded)."""
        service = cost * self._service_s * self._rng.uniform(0.8, 1.2)
        if self._free_at is None:
            return now + self._client_s + service
        start = max(now, heapq.heappop(self._free_at))
        heapq.heappush(self._free_at, start + service)
        return start + service + self._client_s


class _Limits:
    """Per-second counters of the traffic that published limits bound; the first crossing wins."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.window: dict[str, dict[int, int]] = {}
        self.crossed: dict[str, float] = {}

    def count(self, name: str, now: float, limit: float, amount: int = 1) -> None:
        second = int(now)
        per_second = self.window.setdefault(name, {})
        per_second[second] = per_second.get(second, 0) + amount
        if per_second[second] > limit and name not in self.crossed:
            self.crossed[name] = now

    def writes(self, now: float, amount: int = 1) -> None:
        # Every task document carries created_at/available_at: its creates and claims
        # update a sequential index entry (composite indexes keep them, exemptions or not).
        self.count("Firestore sequential-index writes > 500/s", now, SEQUENTIAL_INDEX_WRITES_PER_S, amount)
        steps = int(now // RAMP_STEP_S)
        self.count(
            "Firestore 500/50/5 ramp (new traffic)", now, RAMP_START_OPS_PER_S * RAMP_GROWTH**steps, amount
        )


def _spread(page: list[tuple[int, int]], rng: random.Random) -> list[tuple[int, int]]:
    """shared.store.firestore.spread_claims: the page rotated by a random offset."""
    if len(page) < 2:
        return page
    start = rng.randrange(len(page))
    return page[start:] + page[:start]


def _queue_of(task_id: int, queues: int) -> int:
    digest = hashlib.sha256(f"face_swap/task_{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % queues


def simulate(scenario: Scenario) -> Result:  # one event loop, read top to bottom
    rng = random.Random(scenario.seed)  # noqa: S311  # a seeded simulation, not a secret
    store = _Store(scenario.store_servers, scenario.store_request_s, scenario.client_request_s, rng)
    limits = _Limits(scenario)
    events: list[tuple[float, int, str, Any]] = []
    sequence = itertools.count()

    def at(time: float, kind: str, payload: Any) -> None:
        heapq.heappush(events, (time, next(sequence), kind, payload))

    region_names = [name for name, _, _ in scenario.regions]
    weights = [weight for _, _, weight in scenario.regions]
    free_slots = {name: slots for name, slots, _ in scenario.regions}
    total_slots = sum(free_slots.values())
    # push: per region, per queue FIFO of task ids and the time its next dispatch token is due.
    queues = {name: [deque[int]() for _ in range(scenario.queues_per_region)] for name in region_names}
    tokens = {name: [QUEUE_BURST] * scenario.queues_per_region for name in region_names}
    refilled_at = {name: [0.0] * scenario.queues_per_region for name in region_names}
    wake_scheduled: set[tuple[str, int]] = set()
    # pull: per region, the PENDING tasks in claim order (oldest first), and who holds what.
    pending = {name: list[int]() for name in region_names}
    status: dict[int, str] = {}
    enqueued_at: dict[int, float] = {}
    kind_of: dict[int, str] = {}
    region_of: dict[int, str] = {}
    claimed_by: dict[int, list[int]] = {}
    waits: list[float] = []
    running: dict[tuple[int, int], float] = {}
    busy_s = 0.0
    claims = conflicts = done = duplicates = 0
    slot_ids = itertools.count()

    def gpu_s(task: int) -> float:
        mean = scenario.image_gpu_s if kind_of[task] == "image" else scenario.video_gpu_s
        return mean * rng.uniform(0.75, 1.25)

    def new_task(now: float, task: int) -> None:
        kind_of[task] = "image" if rng.random() < scenario.image_fraction else "video"
        region_of[task] = rng.choices(region_names, weights)[0]
        limits.writes(now)  # the create
        at(store.request(now), "created", task)

    def make_ready(now: float, task: int) -> None:
        status[task] = "PENDING"
        enqueued_at[task] = now
        region = region_of[task]
        if scenario.mode == "push":
            queue = _queue_of(task, scenario.queues_per_region)
            queues[region][queue].append(task)
            at(now, "dispatch", (region, queue))
        else:
            pending[region].append(task)
            at(now, "wake", region)

    def start_run(now: float, region: str, task: int, slot: int) -> None:
        nonlocal claims, duplicates
        claims += 1
        duplicates += status.get(task) == "RUNNING"
        claimed_by.setdefault(task, []).append(slot)
        if now >= scenario.measure_from_s:
            waits.append(now - enqueued_at[task])
        status[task] = "RUNNING"
        run = gpu_s(task)
        crash_in = (
            rng.expovariate(scenario.crashes_per_slot_hour / 3600.0)
            if scenario.crashes_per_slot_hour > 0
            else math.inf
        )
        running[(task, slot)] = now
        if crash_in < run:
            at(now + crash_in, "crash", (region, task, slot, crash_in))
        else:
            at(now + run, "finish", (region, task, slot, run))

    def try_dispatch(now: float, region: str, queue: int) -> None:
        lane = queues[region][queue]
        if lane and free_slots[region] == 0:
            limits.crossed.setdefault(f"GPU slots of {region} all busy (tasks wait)", now)
        rate = scenario.queue_dispatch_per_s
        bucket = tokens[region]
        bucket[queue] = min(QUEUE_BURST, bucket[queue] + (now - refilled_at[region][queue]) * rate)
        refilled_at[region][queue] = now
        while lane and free_slots[region] > 0:
            if bucket[queue] < 1.0 - 1e-9:  # (a token due now may be short by rounding)
                limits.crossed.setdefault("a Cloud Tasks queue's 500 dispatches/s (tasks wait)", now)
                if (region, queue) not in wake_scheduled:
                    wake_scheduled.add((region, queue))
                    at(now + max(1.0 - bucket[queue], 0.5) / rate, "dispatch", (region, queue))
                return
            bucket[queue] = max(0.0, bucket[queue] - 1.0)
            task = lane.popleft()
            free_slots[region] -= 1
            limits.writes(now)  # the claim transaction's write
            at(store.request(now), "claimed", (region, task, next(slot_ids)))

    idle_claimers: dict[str, int] = dict.fromkeys(region_names, 0)

    def pull_claim(now: float, region: str, slot: int, attempt: int = 0) -> None:
        """A runner's claim: its queries (one request each, in turn), then compare-and-set writes."""
        answered = now
        for _ in range(max(1, scenario.claim_queries)):
            answered = store.request(answered)
        at(answered, "queried", (region, slot, attempt))

    def on_queried(now: float, region: str, slot: int, attempt: int) -> None:
        queue = pending[region]
        if not queue:
            idle_claimers[region] += 1
            free_slots[region] += 1
            return
        # The page the query returned, with what each document looked like (its claim count
        # stands for its update time: a compare-and-set fails if it changed since).
        page = [(task, len(claimed_by.get(task, []))) for task in queue[: scenario.claim_page]]
        if scenario.spread_first:
            page = _spread(page, rng)
        at(store.request(now), "cas", (region, slot, attempt, page))

    def on_cas(now: float, region: str, slot: int, attempt: int, page: list[tuple[int, int]]) -> None:
        nonlocal conflicts
        task, seen_claims = page[0]
        if status.get(task) == "PENDING" and len(claimed_by.get(task, [])) == seen_claims:
            pending[region].remove(task)
            limits.writes(now)
            start_run(now, region, task, slot)
            return
        conflicts += 1
        rest = _spread(page[1:], rng)  # as FirestoreTaskStore.claim_next: a random one next
        if rest:
            at(store.request(now, scenario.conflict_cost), "cas", (region, slot, attempt, rest))
        elif attempt < 8:
            pull_claim(now, region, slot, attempt + 1)
        else:
            free_slots[region] += 1  # gives up this round (store_contention) and waits

    # Arrivals: a backlog at 0, then Poisson until duration_s.
    task_ids = itertools.count()
    for _ in range(scenario.backlog):
        task = next(task_ids)
        kind_of[task] = "image" if rng.random() < scenario.image_fraction else "video"
        region_of[task] = rng.choices(region_names, weights)[0]
        make_ready(0.0, task)
    if scenario.arrivals_per_s > 0:
        at(rng.expovariate(scenario.arrivals_per_s), "arrive", None)
    if scenario.mode == "pull":
        for name, slots, _ in scenario.regions:
            for _ in range(slots):
                free_slots[name] -= 1
                pull_claim(0.0, name, next(slot_ids))

    horizon = scenario.duration_s
    last_done: float | None = None
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if not scenario.drain and now > horizon:
            break
        if kind == "arrive":
            if now >= horizon:
                continue
            new_task(now, next(task_ids))
            at(now + rng.expovariate(scenario.arrivals_per_s), "arrive", None)
        elif kind == "created":
            make_ready(now, payload)
        elif kind == "dispatch":
            wake_scheduled.discard(payload)
            try_dispatch(now, *payload)
        elif kind == "claimed":
            region, task, slot = payload
            start_run(now, region, task, slot)
        elif kind == "wake":
            region = payload
            while idle_claimers[region] > 0 and pending[region] and free_slots[region] > 0:
                idle_claimers[region] -= 1
                free_slots[region] -= 1
                pull_claim(now, region, next(slot_ids))
        elif kind == "queried":
            on_queried(now, *payload)
        elif kind == "cas":
            on_cas(now, *payload)
        elif kind in {"finish", "crash"}:
            region, task, slot, ran = payload
            running.pop((task, slot), None)
            busy_s += max(0.0, min(now, horizon) - max(now - ran, scenario.measure_from_s))
            if kind == "finish":
                # Progress writes of a video go to the task's own document every 2 s.
                writes = scenario.image_writes if kind_of[task] == "image" else scenario.video_writes
                limits.writes(now, writes - 2)  # claim and create counted already
                if kind_of[task] == "video":
                    limits.count("one document > 1 write/s sustained", now, 60 * DOCUMENT_WRITES_PER_S)
                at(store.request(now), "completed", (region, task, slot))
            else:
                status[task] = "LEASED_BY_DEAD_RUNNER"
                at(now + scenario.lease_s, "expired", task)
                at(now + scenario.restart_s, "restarted", (region, slot))
        elif kind == "completed":
            region, task, slot = payload
            status[task] = "COMPLETED"
            done += 1
            last_done = now
            _slot_free(now, region, slot, scenario, free_slots, queues, at, pull_claim)
        elif kind == "expired":
            make_ready(now, payload)
        elif kind == "restarted":
            region, _ = payload
            _slot_free(now, region, next(slot_ids), scenario, free_slots, queues, at, pull_claim)
        else:  # pragma: no cover - every kind is handled above
            raise AssertionError(kind)

    busy_s += sum(max(0.0, horizon - max(started, scenario.measure_from_s)) for started in running.values())
    arrived = next(task_ids)
    span = last_done or 0.0
    first_limit, first_at = ("none within the run", None)
    if limits.crossed:
        first_limit, first_at = min(limits.crossed.items(), key=lambda item: item[1])
    return Result(
        tasks_arrived=arrived,
        tasks_done=done,
        claims=claims,
        conflicts=conflicts,
        claims_per_s=claims / span if span > 0 else 0.0,
        wait_p50_s=_percentile(waits, 0.5),
        wait_p99_s=_percentile(waits, 0.99),
        gpu_utilisation=busy_s / (total_slots * (horizon - scenario.measure_from_s))
        if total_slots and horizon > scenario.measure_from_s
        else 0.0,
        first_limit=first_limit,
        first_limit_at_s=first_at,
        duplicates=duplicates,
        lost=sum(1 for task in range(arrived) if status.get(task) != "COMPLETED") if scenario.drain else 0,
        limits_crossed=dict(limits.crossed),
    )


def _slot_free(
    now: float,
    region: str,
    slot: int,
    scenario: Scenario,
    free_slots: dict[str, int],
    queues: dict[str, list[deque[int]]],
    at: Callable[[float, str, Any], None],
    pull_claim: Callable[..., None],
) -> None:
    if scenario.mode == "push":
        free_slots[region] += 1
        for queue in range(scenario.queues_per_region):
            at(now, "dispatch", (region, queue))
    else:
        pull_claim(now, region, slot)


# --- make bench figure 10 ------------------------------------------------------------------

# The emulator's share of one request's time (the rest is the client's own, overlapping
# between runners) and a lost compare-and-set's server cost: fitted once on the
# 2026-12-02 02:10 UTC run of figure 9 (1 and 8 runners), then kept fixed.
EMULATOR_SHARE = 0.74
EMULATOR_CONFLICT_COST = 0.1
MATCH_WITHIN = 0.25


def emulator_scenario(runners: int, tasks: int, engine_s: float, per_request_s: float) -> Scenario:
    """Figure 9's setting: a backlog, ``runners`` pull-mode runners, one emulator."""
    return Scenario(
        arrivals_per_s=0.0,
        duration_s=0.0,
        backlog=tasks,
        drain=True,
        mode="pull",
        regions=(("emulator", runners, 1.0),),
        image_fraction=1.0,
        image_gpu_s=engine_s,
        store_servers=1,
        store_request_s=per_request_s * EMULATOR_SHARE,
        client_request_s=per_request_s * (1 - EMULATOR_SHARE),
        conflict_cost=EMULATOR_CONFLICT_COST,
    )


def fleet_scenario(**overrides: Any) -> Scenario:
    """1,000 tasks/s on 10,000 GPU slots in three regions (docs/scale.md's mix), push mode."""
    base = Scenario(duration_s=90.0, measure_from_s=60.0, crashes_per_slot_hour=1 / 24)
    return dataclasses.replace(base, **overrides)


def sim_rows(measured: list[dict[str, Any]], engine_s: float) -> list[Any]:
    """Figure 10: the simulation against figure 9's measurements, then at 1,000 tasks/s."""
    from benchmarks.common import Row

    rows: list[Row] = []
    one = next((result for result in measured if result["runners"] == 1 and result["claims_per_s"] > 0), None)
    if one is not None:
        # One runner's cycle: claim queries + the compare-and-set + the completion, and the engine.
        per_request_s = (1.0 / one["claims_per_s"] - engine_s) / (Scenario.claim_queries + 2)
        for result in measured:
            simulated = simulate(
                emulator_scenario(result["runners"], result["tasks"], engine_s, per_request_s)
            )
            ratio = simulated.claims_per_s / result["claims_per_s"] if result["claims_per_s"] else 0.0
            measured_conflicts = result["conflicts"] / max(1, result["claims"])
            rows.append(
                Row(
                    f"10. simulation vs figure 9: {result['runners']} runner(s), pull, emulator model",
                    f"{simulated.claims_per_s:.1f} claims/s ({ratio:.2f}x measured), "
                    f"{simulated.conflicts_per_claim:.2f} conflicts per claim; "
                    f"{simulated.duplicates} claimed twice, {simulated.lost} lost",
                    f"claims/s within {MATCH_WITHIN:.0%} of measured",
                    f"measured {result['claims_per_s']:.1f} claims/s, "
                    f"{measured_conflicts:.2f} conflicts per claim",
                    "meets" if abs(ratio - 1) <= MATCH_WITHIN else "MISSES",
                    note=f"per request {per_request_s * 1000:.0f} ms from the 1-runner row",
                )
            )
    for label, scenario in (("3 regions (40/30/30%), 2 queues each", fleet_scenario()),):
        fleet = simulate(scenario)
        others = ", ".join(sorted(set(fleet.limits_crossed) - {fleet.first_limit})) or "-"
        rows.append(
            Row(
                f"10. simulated 1,000 tasks/s, 10,000 GPU slots, {label}: 95% image 3 s / 5% video 60 s, "
                f"1 crash per slot-day, {scenario.duration_s:.0f} s",
                f"queue wait p50 {fleet.wait_p50_s * 1000:.0f} ms, p99 {fleet.wait_p99_s * 1000:.0f} ms; "
                f"GPU utilisation {fleet.gpu_utilisation:.0%} (from {scenario.measure_from_s:.0f} s); "
                f"first limit: {fleet.first_limit}"
                + (f" at {fleet.first_limit_at_s:.1f} s" if fleet.first_limit_at_s is not None else "")
                + f"; also crossed: {others}",
                "which published limit binds first (docs/scale.md)",
                "",
                "info",
            )
        )
    return rows
