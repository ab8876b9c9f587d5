"""The capacity model's simulation (benchmarks/scale_sim.py, make bench figure 10): seeded,
pure Python, so these check what it computes, not how fast anything runs."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.scale_sim import EmulatorCosts, Scenario, emulator_scenario, fleet_scenario, simulate

ENGINE_S = 0.05


def figure_9(runners: int, **overrides: object) -> Scenario:
    costs = EmulatorCosts(client_cpu_s=0.002, emulator_cpu_s=0.002, latency_s=0.008)
    scenario = emulator_scenario(runners, 8 * runners, ENGINE_S, costs)
    return dataclasses.replace(scenario, **overrides)


def test_the_same_seed_gives_the_same_run_and_another_seed_another() -> None:
    first, again = simulate(figure_9(16)), simulate(figure_9(16))
    other = simulate(figure_9(16, seed=15))

    assert first == again
    assert (other.claims_per_s, other.conflicts) != (first.claims_per_s, first.conflicts)


def test_one_runner_claims_at_the_rate_its_requests_and_engine_allow() -> None:
    """1 runner: no queueing, no race; each cycle is its requests in turn, then the engine."""
    scenario = figure_9(1, backlog=200)
    result = simulate(scenario)
    per_request_s = scenario.client_cpu_s + scenario.store_request_s + scenario.client_request_s
    # the claim query, the fair-share probe (while a page is full), the write, the completion
    requests = 1 + 1 + 1 + scenario.completion_requests

    assert result.conflicts == 0
    assert result.claims_per_s == pytest.approx(1 / (ENGINE_S + requests * per_request_s), rel=0.05)


def test_many_runners_claim_every_task_once_and_lose_few_races_on_claim_shards() -> None:
    result = simulate(figure_9(64))

    assert result.tasks_done == result.claims == 512
    assert (result.duplicates, result.lost) == (0, 0)
    assert 0 < result.conflicts_per_claim < 0.6


def test_runners_that_all_write_the_head_lose_far_more_races() -> None:
    """The claim before claim shards (every claimer wrote the head of the queue): the model
    must show the pile-up figure 9 measured then, or it could not tell the designs apart."""
    spread = simulate(figure_9(32))
    at_the_head = simulate(figure_9(32, claim_shards=1, claim_page=1, fallback_page=1))

    assert at_the_head.conflicts_per_claim > 3 * spread.conflicts_per_claim
    assert (at_the_head.duplicates, at_the_head.lost) == (0, 0)


def test_runners_that_start_together_spread_from_their_first_claim() -> None:
    """Runners announce themselves before their first claim (FirestoreTaskStore._fleet_seen):
    a fleet that starts together no longer races for the head with its first claims.
    presence_s=0 (no announcement is ever live) is the claim before that: 63 of the 64
    first claims lost."""
    announced = simulate(figure_9(64))
    blind = simulate(figure_9(64, presence_s=0.0))

    assert blind.conflicts - announced.conflicts >= 40
    assert (announced.duplicates, announced.lost) == (0, 0)


def test_one_interpreter_caps_the_claim_rate_whatever_the_runner_count() -> None:
    """figure 9's runners are threads of one process: its CPU per request bounds the rate."""
    scenario = figure_9(64, client_cpu_s=0.01, store_request_s=0.001)
    result = simulate(scenario)
    requests_per_claim = 4 + scenario.completion_requests  # at most: + a probe, + a lost race

    assert result.claims_per_s <= 1 / (scenario.client_cpu_s * (requests_per_claim - 1)) * 1.05


def test_a_queue_past_500_dispatches_a_second_is_a_limit_crossed() -> None:
    result = simulate(
        fleet_scenario(
            arrivals_per_s=700.0,
            duration_s=1.0,
            measure_from_s=0.0,
            regions=(("one-region", 5000, 1.0),),
            queues_per_region=1,
            image_writes=0,
            video_writes=0,
            crashes_per_slot_hour=0.0,
        )
    )

    assert "a Cloud Tasks queue's 500 dispatches/s (tasks wait)" in result.limits_crossed


def test_at_1000_tasks_a_second_the_sequential_index_binds_first() -> None:
    result = simulate(fleet_scenario(duration_s=3.0, measure_from_s=0.0))

    assert result.first_limit == "Firestore sequential-index writes > 500/s"
    assert result.first_limit_at_s is not None and result.first_limit_at_s < 1.0


def test_request_costs_come_from_figure_9s_figures_and_the_machines_other_load() -> None:
    """CPU per request of the count itself; a request never slower than one measured alone
    (1 runner); CPU seconds stretched by the cores other processes took meanwhile."""
    import os

    one = {"elapsed": 2.0, "claims": 10, "requests": 50, "client_cpu_s": 0.5, "emulator_cpu_s": 2.5}
    alone_s = (2.0 - 10 * ENGINE_S) / 50  # 30 ms per request at 1 runner
    quiet = {"elapsed": 4.0, "claims": 80, "requests": 400, "client_cpu_s": 0.8, "emulator_cpu_s": 1.2}
    cores = os.cpu_count() or 2
    busy = {**quiet, "others_cpu_s": 4.0 * cores / 2}  # others held half the cores

    at_one = EmulatorCosts.measured(one, one, ENGINE_S)
    at_many = EmulatorCosts.measured(quiet, one, ENGINE_S)
    loaded = EmulatorCosts.measured(busy, one, ENGINE_S)

    assert at_one.client_cpu_s + at_one.emulator_cpu_s == pytest.approx(alone_s)  # 60 ms of CPU, 30 ms alone
    assert (at_many.client_cpu_s, at_many.emulator_cpu_s) == pytest.approx((0.002, 0.003))
    assert (loaded.client_cpu_s, loaded.emulator_cpu_s) == pytest.approx((0.004, 0.006))
