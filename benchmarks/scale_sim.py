"""Figure 10: the capacity model of docs/scale.md played forward (issue 14, item 5).

A seeded discrete-event simulation in pure Python (no dependency): tasks arrive as a
Poisson stream with a mix of image and video jobs, each goes to a region (by weight) and,
in push mode, to one of that region's Cloud Tasks queues (by hash, as
shared/dispatch/cloud_tasks.py does); queues dispatch at most ``queue_dispatch_per_s`` each
(Cloud Tasks' 500/s); GPU slots run one task at a time and crash at a given rate (the task
waits for its lease to expire, then runs again; the slot comes back after a restart).
Every task costs the Firestore requests figure 7 counts (create, claim, completion,
progress writes of a video). A request takes the client's CPU (``client_cpu_s``; with
``client_servers`` = 1, figure 9's runner threads sharing one Python interpreter), the
store's (``store_request_s`` on ``store_servers`` servers: the emulator's CPU; None =
Firestore, parallel) and a latency nobody queues for (``client_request_s``). In pull mode
a runner claims as ``FirestoreTaskStore.claim_next`` does: it announces itself (a write)
and counts the live announcements (a count) at its first claim and every
``presence_refresh_s``; until it has seen another runner's announcement or lost a race
it queries the head of the whole queue and writes the head with a compare-and-set; after
that it reads a random claim shard (up to ``shard_draws``, then a ``fallback_page`` of
the whole queue) and writes a random one of what it read. A write that finds the task
claimed since its query is a conflict, and the claim starts again with a new query.

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

__all__ = ["EmulatorCosts", "Result", "Scenario", "simulate"]

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
    store_servers: int | None = None  # None: parallel (Firestore); figure 9: the emulator's cores
    store_request_s: float = 0.02  # the store's time per request
    client_request_s: float = 0.0  # latency per request that nobody queues for
    client_servers: int | None = None  # None: each runner its own CPU; 1: one interpreter
    client_cpu_s: float = 0.0  # the client's CPU per request (queued when client_servers is set)
    completion_requests: int = 1  # pull: requests of the completion (a transaction: begin, get, commit)
    claim_page: int = 10  # pull: the candidates one claim query returns (_CLAIM_PAGE_SIZE)
    claim_shards: int = 64  # pull: CLAIM_SHARDS
    shard_draws: int = 3  # pull: _SHARD_DRAWS
    fallback_page: int = 50  # pull: _SPREAD_FALLBACK_PAGE
    presence_s: float = 90.0  # pull: _PRESENCE_S (an announcement counts this long)
    presence_refresh_s: float = 30.0  # pull: _PRESENCE_REFRESH_S
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


class _Pool:
    """``servers`` servers answering FIFO (None: as many as there are requests)."""

    def __init__(self, servers: int | None) -> None:
        self._free_at = [0.0] * servers if servers else None

    def serve(self, now: float, service_s: float) -> float:
        if self._free_at is None:
            return now + service_s
        start = max(now, heapq.heappop(self._free_at))
        heapq.heappush(self._free_at, start + service_s)
        return start + service_s


class _Store:
    """A request: the client's CPU, then the store's, then a latency nobody queues for."""

    def __init__(self, scenario: Scenario, rng: random.Random) -> None:
        self._client = _Pool(scenario.client_servers)
        self._server = _Pool(scenario.store_servers)
        self._scenario = scenario
        self._rng = rng

    def request(self, now: float) -> float:
        """When a request sent at ``now`` is answered (jitter +-20%, seeded)."""
        jitter = self._rng.uniform(0.8, 1.2)
        sent = self._client.serve(now, self._scenario.client_cpu_s * jitter)
        served = self._server.serve(sent, self._scenario.store_request_s * jitter)
        return served + self._scenario.client_request_s * jitter


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


def _queue_of(task_id: int, queues: int) -> int:
    digest = hashlib.sha256(f"face_swap/task_{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % queues


def simulate(scenario: Scenario) -> Result:  # one event loop, read top to bottom
    rng = random.Random(scenario.seed)  # noqa: S311  # a seeded simulation, not a secret
    store = _Store(scenario, rng)
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
    spreading: set[int] = set()  # pull: runners (slots) that lost a race: they read shards

    def requests(now: float, count: int) -> float:
        """When ``count`` requests sent one after another from ``now`` are all answered."""
        for _ in range(count):
            now = store.request(now)
        return now

    presence_due: dict[int, float] = {}  # pull: when a runner announces itself next
    announced: dict[str, dict[int, float]] = {name: {} for name in region_names}

    def pull_claim(now: float, region: str, slot: int, attempt: int = 0) -> None:
        """A runner's claim: its announcement and count when due, its queries one after
        another, then one compare-and-set."""
        if attempt == 0 and now >= presence_due.get(slot, 0.0):
            presence_due[slot] = now + scenario.presence_refresh_s
            at(store.request(now), "announced", (region, slot))
            return
        claim_queries(now, region, slot, attempt)

    def on_counted(now: float, region: str, slot: int) -> None:
        live = [since for since in announced[region].values() if now - scenario.presence_s <= since <= now]
        if len(live) > 1:
            spreading.add(slot)  # another runner announced itself: one of a fleet
        claim_queries(now, region, slot, 0)

    def claim_queries(now: float, region: str, slot: int, attempt: int) -> None:
        queue = pending[region]
        shard: int | None = None  # None: the head of the whole queue (a lone claimer's order)
        reads = 1
        if slot in spreading:
            shards = scenario.claim_shards
            draws = rng.sample(range(shards), min(scenario.shard_draws, shards))
            found = next((draw for draw in draws if any(task % shards == draw for task in queue)), None)
            shard = -1 if found is None else found  # -1: every draw empty, the fallback page
            reads = draws.index(found) + 1 if found is not None else len(draws) + 1
        page = _page(queue, shard)
        reads += 1 if len(page) >= scenario.claim_page else 0  # the fair-share probe
        at(requests(now, reads), "queried", (region, slot, attempt, shard))

    def _page(queue: list[int], shard: int | None) -> list[int]:
        if shard is None:
            return queue[: scenario.claim_page]
        if shard < 0:
            return queue[: scenario.fallback_page]
        return [task for task in queue if task % scenario.claim_shards == shard][: scenario.claim_page]

    def on_queried(now: float, region: str, slot: int, attempt: int, shard: int | None) -> None:
        queue = pending[region]
        page = _page(queue, shard) or queue[: scenario.fallback_page]
        if not page:
            idle_claimers[region] += 1
            free_slots[region] += 1
            return
        # The task written, with what its document looked like (its claim count stands
        # for its update time: a compare-and-set fails if it changed since).
        task = page[0] if shard is None else rng.choice(page)
        at(store.request(now), "cas", (region, slot, attempt, task, len(claimed_by.get(task, []))))

    def on_cas(now: float, region: str, slot: int, attempt: int, task: int, seen_claims: int) -> None:
        nonlocal conflicts
        if status.get(task) == "PENDING" and len(claimed_by.get(task, [])) == seen_claims:
            pending[region].remove(task)
            limits.writes(now)
            start_run(now, region, task, slot)
            return
        conflicts += 1
        spreading.add(slot)
        if attempt < 30:
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
        elif kind == "announced":
            region, slot = payload
            announced[region][slot] = now
            at(store.request(now), "counted", payload)
        elif kind == "counted":
            on_counted(now, *payload)
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
                at(requests(now, scenario.completion_requests), "completed", (region, task, slot))
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

MATCH_WITHIN = 0.25
# The completion's requests: a transaction (BeginTransaction, BatchGetDocuments, Commit).
COMPLETION_REQUESTS = 3


@dataclasses.dataclass(frozen=True)
class EmulatorCosts:
    """Per-request costs measured in figure 9's run at one runner count: the runners'
    client CPU (one Python interpreter: its threads take turns), the emulator's CPU, and
    the rest of a request's latency at one runner (nobody queues for it)."""

    client_cpu_s: float
    emulator_cpu_s: float
    latency_s: float

    @classmethod
    def measured(cls, result: dict[str, Any], one_runner: dict[str, Any], engine_s: float) -> EmulatorCosts:
        """From figure 9's figures. A CPU second costs more wall time when other processes
        of the machine took some of its cores meanwhile (``others_cpu_s``, from /proc/stat);
        and no request is modelled slower than one took with nobody else queuing (at one
        runner the emulator's JVM spends more CPU per request than the request lasts, on
        several threads at once)."""
        client_s, emulator_s = _cpu_per_request(result)
        one_client_s, one_emulator_s = _cpu_per_request(one_runner)
        # One runner's cycle is its requests one after another, then the engine.
        alone_s = (one_runner["elapsed"] - one_runner["claims"] * engine_s) / max(1, one_runner["requests"])
        if client_s + emulator_s > alone_s > 0:
            scale = alone_s / (client_s + emulator_s)
            client_s, emulator_s = client_s * scale, emulator_s * scale
        latency_s = max(0.0, alone_s - one_client_s - one_emulator_s)
        return cls(client_cpu_s=client_s, emulator_cpu_s=emulator_s, latency_s=latency_s)


def _cpu_per_request(result: dict[str, Any]) -> tuple[float, float]:
    """(client, emulator) CPU seconds per request of one figure 9 count, stretched by the
    share of the cores other processes held meanwhile."""
    import os

    cores = float(os.cpu_count() or 2)
    others = result.get("others_cpu_s", 0.0) / result["elapsed"] if result["elapsed"] > 0 else 0.0
    slowdown = cores / max(0.25 * cores, cores - others)
    requests = max(1, result["requests"])
    return result["client_cpu_s"] / requests * slowdown, result["emulator_cpu_s"] / requests * slowdown


def emulator_scenario(runners: int, tasks: int, engine_s: float, costs: EmulatorCosts) -> Scenario:
    """Figure 9's setting: a backlog, ``runners`` pull-mode runners (threads of one
    process), one emulator (its CPU one server: os.cpu_count() - 1 cores, the other the
    interpreter's)."""
    import os

    return Scenario(
        arrivals_per_s=0.0,
        duration_s=0.0,
        backlog=tasks,
        drain=True,
        mode="pull",
        regions=(("emulator", runners, 1.0),),
        image_fraction=1.0,
        image_gpu_s=engine_s,
        store_servers=max(1, (os.cpu_count() or 2) - 1),
        store_request_s=costs.emulator_cpu_s,
        client_servers=1,
        client_cpu_s=costs.client_cpu_s,
        client_request_s=costs.latency_s,
        completion_requests=COMPLETION_REQUESTS,
    )


def fleet_scenario(**overrides: Any) -> Scenario:
    """1,000 tasks/s on 10,000 GPU slots in three regions (docs/scale.md's mix), push mode."""
    base = Scenario(duration_s=90.0, measure_from_s=60.0, crashes_per_slot_hour=1 / 24)
    return dataclasses.replace(base, **overrides)


def sim_rows(measured: list[dict[str, Any]], engine_s: float) -> list[Any]:
    """Figure 10: the simulation against figure 9's measurements, then at 1,000 tasks/s."""
    from benchmarks.common import Row, not_measured

    rows: list[Row] = []
    one = next((result for result in measured if result["runners"] == 1 and result["claims_per_s"] > 0), None)
    if one is not None and not one.get("emulator_cpu_s"):
        rows.append(not_measured("10. simulation vs figure 9", "no emulator CPU figure (/proc not readable)"))
    elif one is not None:
        for result in measured:
            costs = EmulatorCosts.measured(result, one, engine_s)
            simulated = simulate(emulator_scenario(result["runners"], result["tasks"], engine_s, costs))
            ratio = simulated.claims_per_s / result["claims_per_s"] if result["claims_per_s"] else 0.0
            measured_conflicts = (result["conflicts"] + result["aborted"]) / max(1, result["claims"])
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
                    note=f"per request, measured in this count's run: client CPU "
                    f"{costs.client_cpu_s * 1000:.1f} ms, emulator CPU {costs.emulator_cpu_s * 1000:.1f} ms; "
                    f"latency beyond them at 1 runner {costs.latency_s * 1000:.1f} ms",
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
