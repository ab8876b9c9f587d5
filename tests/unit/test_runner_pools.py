"""Runner pools (RUNNER_POOLS, shared/pools.py): which pool a task goes to first, the
fallback order after it, and the start-up checks of the setting."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from shared.dispatch.cloud_tasks import pools_from_settings
from shared.pools import RunnerPool, parse_runner_pools, pool_order
from shared.settings import Settings, get_settings, reset_settings_cache


def pool(name: str, **overrides: Any) -> RunnerPool:
    fields: dict[str, Any] = {
        "name": name,
        "location": "us-central1",
        "queues": [f"cswap-runner-{name}"],
        "runner_url": f"https://cswap-runner-{name}-123.us-central1.run.app",
        **overrides,
    }
    return RunnerPool.model_validate(fields)


def task_ids(count: int) -> list[str]:
    return [f"task_{uuid.uuid4().hex}" for _ in range(count)]


def first_choices(pools: list[RunnerPool], ids: list[str], environment: str = "face_swap") -> dict[str, str]:
    return {task_id: pool_order(pools, task_id, environment)[0].name for task_id in ids}


def test_unpinned_tasks_split_by_weight_and_every_pool_is_a_fallback() -> None:
    """Weights 3:1: about 75% of 8,000 tasks try pool us first (binomial sd 0.5%, the
    bound is 4 sd), and every order holds both pools, the other one second."""
    pools = [pool("us", weight=3), pool("eu", location="europe-west4", weight=1)]
    ids = task_ids(8000)

    firsts = first_choices(pools, ids)

    share = sum(name == "us" for name in firsts.values()) / len(ids)
    assert 0.73 <= share <= 0.77, share
    for task_id in ids[:200]:
        assert {candidate.name for candidate in pool_order(pools, task_id, "face_swap")} == {"us", "eu"}


def test_the_order_is_deterministic_whatever_order_the_pools_are_listed_in() -> None:
    """create_task, the reaper and a runner each build the order: they must agree."""
    pools = [pool("us"), pool("eu", location="europe-west4"), pool("asia", location="asia-southeast1")]
    for task_id in task_ids(100):
        order = [candidate.name for candidate in pool_order(pools, task_id, "comm")]
        assert order == [candidate.name for candidate in pool_order(pools[::-1], task_id, "comm")]
        assert order == [candidate.name for candidate in pool_order(list(pools), task_id, "comm")]


def test_an_environment_served_by_one_pool_is_pinned_to_it() -> None:
    comfy = pool("comfy", location="europe-west4", environments=["comm"], weight=1)
    swaps = pool("swaps", environments=["face_swap"], weight=5)
    general = pool("general", weight=5)
    for task_id in task_ids(200):
        assert [p.name for p in pool_order([comfy, swaps], task_id, "comm")] == ["comfy"]
        assert [p.name for p in pool_order([comfy, swaps], task_id, "face_swap")] == ["swaps"]
        assert pool_order([comfy, swaps], task_id, "other") == []
        assert {p.name for p in pool_order([comfy, general], task_id, "comm")} == {"comfy", "general"}


def test_a_pool_of_weight_zero_is_only_a_fallback() -> None:
    pools = [pool("us"), pool("eu", location="europe-west4"), pool("standby", location="us-east4", weight=0)]
    for task_id in task_ids(500):
        assert [p.name for p in pool_order(pools, task_id, "face_swap")][-1] == "standby"


def test_adding_a_pool_moves_only_the_tasks_the_new_pool_takes() -> None:
    """Rendezvous hashing: a new region takes its share and no task moves between the
    old pools (their queues keep the tasks' earlier names)."""
    before = [pool("us"), pool("eu", location="europe-west4")]
    after = [*before, pool("asia", location="asia-southeast1")]
    ids = task_ids(3000)

    old, new = first_choices(before, ids), first_choices(after, ids)

    moved = [task_id for task_id in ids if old[task_id] != new[task_id]]
    assert all(new[task_id] == "asia" for task_id in moved)
    assert 0.28 <= len(moved) / len(ids) <= 0.39, len(moved)


def test_without_runner_pools_the_single_region_settings_make_one_pool() -> None:
    settings = Settings(
        cloud_tasks_location="europe-west4",
        cloud_tasks_queue="q",
        cloud_tasks_queues="q,q-1",
        runner_url="https://runner.example.com/",
        runner_oidc_audience="https://audience.example.com",
        cloud_tasks_invoker_email="invoker@p.iam.gserviceaccount.com",
    )

    [only] = pools_from_settings(settings)

    assert (only.location, only.queues) == ("europe-west4", ("q", "q-1"))
    assert only.runner_url == "https://runner.example.com"
    assert only.effective_audience == "https://audience.example.com"
    assert only.invoker_email == "invoker@p.iam.gserviceaccount.com"


def test_runner_pools_are_read_from_json_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    declared = [
        {"name": "us", "location": "us-central1", "queues": ["a", "a-1"], "runner_url": "https://us.example"},
        {
            "name": "eu",
            "location": "europe-west4",
            "queues": ["a"],
            "runner_url": "https://eu.example",
            "weight": 0,
        },
    ]
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RUNNER_POOLS", json.dumps(declared))
    reset_settings_cache()
    try:
        pools = get_settings().runner_pools
    finally:
        reset_settings_cache()

    assert [(p.name, p.location, p.queues, p.weight) for p in pools] == [
        ("us", "us-central1", ("a", "a-1"), 1.0),
        ("eu", "europe-west4", ("a",), 0.0),
    ]
    assert pools_from_settings(Settings(runner_pools=pools)) == list(pools)


GOOD = {"name": "us", "location": "us-central1", "queues": ["q"], "runner_url": "https://us.example"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("[{not json", "must be a JSON list of pools"),
        ('{"name": "us"}', "must be a JSON list of pools"),
        (json.dumps([{**GOOD, "location": "mars"}]), "pool 0 (us) location"),
        (json.dumps([{**GOOD, "queues": []}]), "pool 0 (us) queues"),
        (json.dumps([{**GOOD, "weight": -1}]), "pool 0 (us) weight"),
        (json.dumps([{**GOOD, "runner_url": "ftp://x"}]), "pool 0 (us) runner_url"),
        (json.dumps([{**GOOD, "gpu": "l4"}]), "pool 0 (us) gpu"),
        (json.dumps([GOOD, {**GOOD, "queues": ["other"]}]), "pool names must be unique: us"),
        (json.dumps([GOOD, {**GOOD, "name": "eu"}]), "a queue belongs to one pool only: us-central1/q"),
        (json.dumps([{**GOOD, "weight": 0}]), "at least one pool needs a weight above 0"),
    ],
)
def test_a_bad_pool_config_stops_the_process_naming_runner_pools_and_the_fault(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path, value: str, reason: str
) -> None:
    with pytest.raises(ValidationError, match="runner_pools"):
        Settings(runner_pools=value)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RUNNER_POOLS", value)
    reset_settings_cache()
    try:
        with pytest.raises(SystemExit):
            get_settings()
    finally:
        reset_settings_cache()

    error = capsys.readouterr().err
    assert "RUNNER_POOLS: " in error and reason in error, error


def test_parse_accepts_an_empty_setting_as_no_pools() -> None:
    assert parse_runner_pools("") == ()
    assert parse_runner_pools("  ") == ()


def test_each_new_delivery_of_a_task_starts_one_pool_further_down_its_order() -> None:
    """A task stuck in a region that takes it but never runs it moves on at its next
    delivery (the sweep's new dispatch generation); the same delivery repeated stays put
    (so Cloud Tasks can de-duplicate its name in the same queue)."""
    from shared.dispatch.cloud_tasks import CloudTasksDispatcher, PoolRoute
    from shared.tasks import Task

    pools = [pool("us"), pool("eu", location="europe-west4"), pool("asia", location="asia-southeast1")]
    routes = [
        PoolRoute(p, (f"projects/p/locations/{p.location}/queues/{p.queues[0]}",), p.runner_url, "", "")
        for p in pools
    ]
    dispatcher = CloudTasksDispatcher(None, routes=routes)  # the order needs no client
    task = Task(workflow="face_swap", environment="face_swap")
    base = [p.name for p in pool_order(pools, task.taskId, "face_swap")]

    for generation in range(5):
        delivery = task.model_copy(update={"dispatch_generation": generation})
        order = [route.name for route in dispatcher.routes_for(delivery)]
        assert order == base[generation % 3 :] + base[: generation % 3]
        assert order == [route.name for route in dispatcher.routes_for(delivery.model_copy())]
