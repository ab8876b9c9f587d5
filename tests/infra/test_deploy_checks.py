"""What `terraform plan` and the first `apply` would reject, checked offline (issue 12).

The reference graph is built from python-hcl2's parse; anything that depends on
variables only is evaluated by real Terraform (`terraform console`, tests/infra/tfconfig.py),
so validations, conditionals and `templatefile()` are Terraform's own behaviour.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra import limits
from tests.infra.tfconfig import (
    REPO_ROOT,
    REQUIRED_VARIABLES,
    TERRAFORM_DIR,
    Graph,
    build_graph,
    console,
    evaluate,
    expression_of,
    map_entry,
    parsed_config,
    template_references,
    templatefile_arguments,
    templatefile_calls,
    terraform_binary,
    unquote,
    walk_strings,
)

needs_terraform = pytest.mark.skipif(terraform_binary() is None, reason="terraform is not on PATH")

MODES = ("cloud_run", "vm")


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _locals_text(graph: Graph, name: str) -> str:
    return "\n".join(walk_strings(graph.body(f"local.{name}")))


def _env_expression(graph: Graph, env_local: str, name: str) -> str:
    """The expression a local env map gives ``name`` (``NAME = expr`` inside a merge)."""
    expression = map_entry(_locals_text(graph, env_local), name)
    assert expression, f"{env_local} does not set {name}"
    return expression


# --- 1. the reference graph ------------------------------------------------------------


def test_reference_graph_is_acyclic(graph: Graph) -> None:
    cycles = graph.cycles()
    assert not cycles, "dependency cycle(s), `terraform validate` refuses them:\n" + "\n".join(
        " -> ".join(graph.cycle_path(component)) for component in cycles
    )


def test_graph_sees_every_kind_of_edge(graph: Graph) -> None:
    """The graph is only as good as its edges: depends_on, templatefile arguments,
    locals, variables and data sources all show up."""
    assert "google_project_service.apis" in graph.edges["google_cloudfunctions2_function.api"]  # depends_on
    assert "local.functions" in graph.edges["google_cloudfunctions2_function.api"]  # for_each
    assert "var.runner_image" in graph.edges["google_compute_instance.runner"]  # templatefile argument
    assert "data.google_project.project" in graph.edges["local.runner_url"]
    assert any(kind == "output" for kind in graph.kinds.values())


def test_templatefile_arguments_are_what_the_templates_read(graph: Graph) -> None:
    calls = templatefile_calls(graph)
    assert {template for _, template, _ in calls} >= {
        "templates/openapi2.yaml.tftpl",
        "templates/runner_vm_startup.sh.tftpl",
    }
    for caller, template, names in calls:
        read = template_references((TERRAFORM_DIR / template).read_text())
        assert read - set(names) == set(), f"{template} reads variables {caller} does not pass"
        assert set(names) - read == set(), f"{caller} passes {template} variables it never reads"


# --- 2. no index into a resource that may have no instance ------------------------------


def test_counted_resources_are_indexed_only_under_their_condition(graph: Graph) -> None:
    """`coalesce(x, r[0].name)` evaluates r[0] even when x is set ("Invalid index"); a
    conditional on the same condition as r's count does not."""
    counted = {
        address: str(body["count"])
        for address, body in graph.nodes.items()
        if graph.kinds[address] == "resource" and "count" in body
    }
    assert counted
    for address, body in graph.nodes.items():
        guard = str(body.get("count", "")) + str(body.get("for_each", "")) if isinstance(body, dict) else ""
        for text in walk_strings(body):
            for target, count in counted.items():
                if f"{target}[0]" not in text:
                    continue
                condition_refs = set(re.findall(r"(?:var|local)\.[a-z_]+", count.split("?")[0]))
                guarded = "?" in text and condition_refs <= set(re.findall(r"(?:var|local)\.[a-z_]+", text))
                guarded_block = (
                    condition_refs <= set(re.findall(r"(?:var|local)\.[a-z_]+", guard)) and "?" in guard
                )
                assert guarded or guarded_block, (
                    f"{address} indexes {target}[0] outside a conditional on {sorted(condition_refs)}: "
                    f"{text[:160]}"
                )
                assert not re.search(rf"coalesce\([^)]*{re.escape(target)}\[0\]", text), (
                    f"{address}: coalesce() evaluates every argument, {target}[0] included"
                )


# --- 5. the Terraform version constraint matches the features used -----------------------


def _features_used(graph: Graph) -> set[str]:
    features: set[str] = set()
    text = "\n".join(path.read_text() for path in TERRAFORM_DIR.glob("*.tf"))
    if re.search(r"\b(precondition|postcondition)\s*\{", text):
        features.add("precondition/postcondition")
    if re.search(r"optional\([^()]*(\([^()]*\))?[^()]*,", text):
        features.add("optional() with a default")
    if re.search(r"\b(startswith|endswith)\(", text):
        features.add("startswith()/endswith()")
    if re.search(r'resource\s+"terraform_data"', text):
        features.add("terraform_data")
    for block, feature in (
        ("check", "check block"),
        ("import", "import block"),
        ("removed", "removed block"),
    ):
        if re.search(rf"^{block}\s", text, flags=re.MULTILINE):
            features.add(feature)
    for address, body in graph.nodes.items():
        if graph.kinds[address] != "variable":
            continue
        own = address.removeprefix("var.")
        for validation in body.get("validation", []):
            others = set(re.findall(r"\bvar\.([a-z_]+)", str(validation.get("condition", "")))) - {own}
            if others:
                features.add("validation referring to another variable")
    return features


def test_required_version_admits_no_release_missing_a_feature_used(graph: Graph) -> None:
    required = unquote(str(parsed_config()["versions.tf"]["terraform"][0]["required_version"]))
    lower = re.search(r">=\s*([0-9.]+)", required)
    assert lower, f"required_version {required!r} has no lower bound"
    features = _features_used(graph)
    assert "optional() with a default" in features  # the detector itself works
    needed = max(features, key=lambda feature: _version(limits.TERRAFORM_FEATURES[feature]))
    assert _version(lower.group(1)) >= _version(limits.TERRAFORM_FEATURES[needed]), (
        f"required_version {required!r} admits releases without {needed} "
        f"(needs >= {limits.TERRAFORM_FEATURES[needed]})"
    )


# --- 3 and 4. alerts: filters restricted by resource type, metrics that exist -------------

# Which process logs each event the metrics count (shared/logs.py events), and the
# monitored resource type of that process's logs in each runner mode.
EVENT_SOURCES = {
    "task_finished": {"runner", "create_task"},  # create_task logs cancellations
    "task_claimed": {"fetch_task", "runner"},
    "queue_stats": {"runner", "reaper"},
    "runner_heartbeat": {"runner"},
}
_FUNCTIONS_ON_CLOUD_RUN = dict.fromkeys(("create_task", "fetch_task", "reaper"), "cloud_run_revision")
SOURCE_RESOURCE_TYPES = {
    "cloud_run": {"runner": "cloud_run_revision", **_FUNCTIONS_ON_CLOUD_RUN},
    "vm": {"runner": "gce_instance", **_FUNCTIONS_ON_CLOUD_RUN},
}


def _metric_events(graph: Graph) -> dict[str, str]:
    """Log-based metric short name (after PREFIX/) -> the event its filter counts."""
    events: dict[str, str] = {}
    for address, body in graph.nodes.items():
        if address.startswith("google_logging_metric."):
            name = unquote(str(body["name"])).split("/", 1)[1]
            event = re.search(r'jsonPayload\.event=\\"([a-z_]+)\\"', str(body["filter"]))
            assert event, f"{address}: filter names no jsonPayload.event"
            events[name] = event.group(1)
    return events


def _alert_conditions(graph: Graph) -> list[tuple[str, str, Any]]:
    """(alert address, condition kind, filter) of every alert condition. An alert made
    for_each over a local map of definitions (filter = each.value.filter) gives one
    condition per definition, with that definition's filter."""
    found = []
    for address, body in graph.nodes.items():
        if address.startswith("google_monitoring_alert_policy."):
            for condition in body["conditions"]:
                for kind in ("condition_threshold", "condition_absent"):
                    for spec in condition.get(kind, []):
                        if spec["filter"] != "${each.value.filter}":
                            found.append((address, kind, spec["filter"]))
                            continue
                        table = re.fullmatch(r"\$\{local\.([a-z_]+)\}", str(body.get("for_each", "")))
                        assert table, f"{address}: each.value.filter without a for_each over a local map"
                        definitions = graph.body(f"local.{table.group(1)}")
                        found.extend(
                            (address, kind, definition["filter"]) for definition in definitions.values()
                        )
    assert found
    return found


def test_every_logged_event_a_metric_counts_is_logged_by_the_code(graph: Graph) -> None:
    sources = "\n".join(
        path.read_text()
        for folder in ("shared", "gpu_runner", "functions")
        for path in (REPO_ROOT / folder).rglob("*.py")
    )
    for event in _metric_events(graph).values():
        assert re.search(rf'"{event}"', sources), f"no code logs the event {event!r} a metric counts"
        assert event in EVENT_SOURCES, f"EVENT_SOURCES does not say who logs {event!r}"


@needs_terraform
@pytest.mark.parametrize("mode", MODES)
def test_alert_filters_name_the_resource_type_their_metric_is_written_against(
    graph: Graph, mode: str
) -> None:
    """The Monitoring API refuses an alert filter without resource.type (400), and a
    log-based metric's series carry the resource type of the log entries it counts."""
    events = _metric_events(graph)
    conditions = _alert_conditions(graph)
    rendered = console([expression_of(spec) for _, _, spec in conditions], {"runner_mode": mode})
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    for (address, kind, _), text in zip(conditions, rendered.values, strict=True):
        metric = re.search(r'metric\.type="logging\.googleapis\.com/user/cswap/([a-z_]+)"', text)
        assert metric, f"{address}: {text}"
        resource_types = re.findall(r'resource\.type\s*=\s*"([a-z_]+)"', text)
        assert len(resource_types) == 1, f"{address} ({mode}): filter needs one resource.type: {text}"
        event = events[metric.group(1)]
        expected = {SOURCE_RESOURCE_TYPES[mode][source] for source in EVENT_SOURCES[event]}
        assert resource_types[0] in expected, (
            f"{address} ({mode}): {event} is written against {sorted(expected)}, "
            f"the filter asks for {resource_types[0]}"
        )
        if kind == "condition_absent":
            # Absence on a type that never carries the metric would always fire.
            assert expected == {resource_types[0]}, (
                f"{address} ({mode}): absence of {event} on {resource_types[0]}"
            )


def test_alerts_wait_for_their_metrics_to_propagate(graph: Graph) -> None:
    """Each alert depends on a wait (time_sleep) that depends on every metric the alert
    reads, long enough for the Monitoring API to know the metric."""
    metric_addresses = {
        unquote(str(body["name"])).split("/", 1)[1]: address
        for address, body in graph.nodes.items()
        if address.startswith("google_logging_metric.")
    }
    for address, _, spec in _alert_conditions(graph):
        metric = re.search(r"metric_prefix\}/([a-z_]+)", str(spec))
        assert metric, f"{address}: {spec}"
        metric_address = metric_addresses[metric.group(1)]
        waits = [edge for edge in graph.edges[address] if edge.startswith("time_sleep.")]
        assert any(metric_address in graph.edges[wait] for wait in waits), (
            f"{address} is created as soon as {metric_address} is: the API answers 'Cannot find metric(s)' "
            "for up to 10 minutes; put a time_sleep between them"
        )
    for address, body in graph.nodes.items():
        if address.startswith("time_sleep."):
            duration = unquote(str(body["create_duration"]))
            seconds = int(duration[:-1]) * {"s": 1, "m": 60}[duration[-1]]
            assert seconds >= limits.LOG_METRIC_PROPAGATION_S, (
                f"{address}: {duration} is shorter than 10 minutes"
            )


def test_time_provider_is_required_for_the_wait() -> None:
    providers = parsed_config()["versions.tf"]["terraform"][0]["required_providers"][0]
    assert unquote(providers["time"]["source"]) == "hashicorp/time"


# --- 6 and 16. the build account: least privilege ---------------------------------------


def _grants_to(graph: Graph, account: str) -> list[tuple[str, str, str]]:
    """(resource type, role, what it is granted on) of every grant to one account."""
    grants = []
    for address, body in graph.nodes.items():
        if not address.split(".")[0].endswith("_iam_member") or graph.kinds[address] != "resource":
            continue
        if f"google_service_account.{account}." not in str(body["member"]):
            continue
        kind = address.split(".")[0]
        roles = re.findall(r"roles/[A-Za-z.]+", str(body["role"]) + str(body.get("for_each", "")))
        target = " ".join(
            str(body.get(key, "")) for key in ("bucket", "repository", "project", "name", "secret_id")
        )
        grants += [(kind, role, target) for role in roles]
    return grants


def test_build_account_gets_only_what_a_function_build_needs(graph: Graph) -> None:
    grants = _grants_to(graph, "build")
    roles = {(kind, role) for kind, role, _ in grants}
    assert roles == {
        ("google_project_iam_member", "roles/logging.logWriter"),
        ("google_storage_bucket_iam_member", "roles/storage.objectAdmin"),
        ("google_artifact_registry_repository_iam_member", "roles/artifactregistry.writer"),
    }, roles
    targets = {role: target for _, role, target in grants}
    assert "google_storage_bucket.sources." in targets["roles/storage.objectAdmin"]
    writer_target = targets["roles/artifactregistry.writer"]
    assert "google_artifact_registry_repository.functions." in writer_target, (
        "artifactregistry.writer only on the functions' own repository (not the runner images')"
    )
    build = graph.body("google_cloudfunctions2_function.api")["build_config"][0]
    assert "google_artifact_registry_repository.functions" in str(build.get("docker_repository")), (
        "function builds must push to the repository the build account can write"
    )


def test_the_runner_may_enqueue_and_attach_the_invoker_token(graph: Graph) -> None:
    """The push-mode runner re-dispatches itself (release at SIGTERM, retry backoff, its
    lease reaper): enqueuer on the queue and actAs on the invoker, like create_task."""
    enqueuer = graph.body("google_cloud_tasks_queue_iam_member.enqueuer")
    assert enqueuer["for_each"] == "${local.enqueuer_grants}"
    assert "google_service_account.runner.member" in str(graph.body("local.enqueuers"))
    # Every queue shard: the grants are the product of enqueuers and local.queues.
    assert "local.queues" in str(graph.body("local.enqueuer_grants"))
    acts_as = graph.body("google_service_account_iam_member.acts_as_invoker")
    assert "google_cloud_tasks_queue_iam_member.enqueuer" in str(acts_as["for_each"])
    assert ".shard ==" in str(acts_as["for_each"]), "actAs once per enqueuer, not once per queue"


def test_functions_reach_only_the_inputs_prefix_of_the_results_bucket(graph: Graph) -> None:
    """The input store (shared/inputs.py) keeps data: inputs under inputs/ in the results
    bucket: the functions that write and delete them get that prefix only, and a
    lifecycle rule removes what a crash left behind."""
    from shared.inputs import INPUT_KEY_PREFIX

    grant = graph.body("google_storage_bucket_iam_member.function_inputs")
    assert "google_storage_bucket.results." in str(grant["bucket"])
    expression = str(grant["condition"][0]["expression"])
    assert f'/objects/{INPUT_KEY_PREFIX}\\")' in expression
    assert f'objectListPrefix\\", \\"\\").startsWith(\\"{INPUT_KEY_PREFIX}\\")' in expression
    rules = graph.body("google_storage_bucket.results")["lifecycle_rule"]
    assert any(f'"{INPUT_KEY_PREFIX}"' in str(rule["condition"][0].get("matches_prefix")) for rule in rules)
    for address, body in graph.nodes.items():
        if address.startswith(
            "google_storage_bucket_iam_member."
        ) and "google_service_account.function" in str(body["member"]):
            assert "condition" in body, f"{address}: a function's bucket grant without the inputs/ condition"


# --- 7. make deploy from a fresh clone --------------------------------------------------


def test_make_deploy_creates_the_venv_before_bundling(tmp_path: Path) -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    shutil.copy(REPO_ROOT / "Makefile", tmp_path / "Makefile")  # a fresh clone has no .venv
    result = subprocess.run(
        [make, "-n", "deploy"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()

    def first(pattern: str) -> int:
        for number, line in enumerate(lines):
            if re.search(pattern, line):
                return number
        raise AssertionError(f"`make -n deploy` never runs {pattern!r}:\n{result.stdout}")

    assert (
        first(r"-m venv \.venv")
        < first(r"bundle_functions\.py")
        < first(r"terraform -chdir=infra/terraform init")
    )


# --- 9. nothing anonymous reaches a GPU ------------------------------------------------


def _openapi_call(graph: Graph) -> list[str]:
    return next(
        names for _, template, names in templatefile_calls(graph) if template.endswith("openapi2.yaml.tftpl")
    )


def _gpu_arguments(graph: Graph) -> set[str]:
    """templatefile arguments of the gateway whose value is (or may be) the runner's URL,
    following local values only."""
    arguments = next(
        args
        for _, template, args in templatefile_arguments(graph)
        if template.endswith("openapi2.yaml.tftpl")
    )
    reaching = set()
    for name, value in arguments.items():
        refs = set(re.findall(r"\b(local\.[a-z_]+|google_cloud_run_v2_service\.runner)", value))
        if "google_cloud_run_v2_service.runner" in refs or any(
            graph.reaches(ref, "google_cloud_run_v2_service.runner", through={"local"})
            for ref in refs
            if ref in graph.nodes
        ):
            reaching.add(name)
    return reaching


@needs_terraform
@pytest.mark.parametrize("api_key_required", [True, False])
def test_no_anonymous_route_reaches_the_gpu_runner(graph: Graph, api_key_required: bool) -> None:
    """Every gateway route whose backend may be the Cloud Run GPU service needs an API key
    at the gateway: the instance wakes (and bills) before the runner checks anything."""
    names = _openapi_call(graph)
    gpu = _gpu_arguments(graph)
    assert gpu, "no gateway argument carries the runner's URL: the check would pass vacuously"
    values = {name: f"https://{name.replace('_', '-')}.example" for name in names if name.endswith("_url")}
    arguments = {
        name: json.dumps(values.get(name, "60.0"))
        if name != "api_key_required"
        else json.dumps(api_key_required)
        for name in names
    }
    call = (
        'templatefile("${path.module}/templates/openapi2.yaml.tftpl", {'
        + ", ".join(f"{name} = {value}" for name, value in arguments.items())
        + "})"
    )
    document = yaml.safe_load(evaluate(call))
    default_security = document.get("security", [])
    gpu_urls = {values[name] for name in gpu}
    reached = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if operation["x-google-backend"]["address"] not in gpu_urls:
                continue
            reached += 1
            security = operation.get("security", default_security)
            assert security, f"{method.upper()} {path} reaches the GPU runner without an API key"
    assert reached, "no route reaches the runner"


@needs_terraform
def test_only_cloud_run_services_trust_a_signature_removed_token(graph: Graph) -> None:
    """CLOUD_RUN_INVOKER_IAM is true for the Cloud Run runner and the functions only, and
    Terraform never sets K_SERVICE (Cloud Run does): a VM must not pass for Cloud Run."""
    runner = _env_expression(graph, "runner_env", "CLOUD_RUN_INVOKER_IAM")
    assert [evaluate(runner, {"runner_mode": mode}) for mode in MODES] == ["true", "false"]
    assert evaluate(_env_expression(graph, "function_env", "CLOUD_RUN_INVOKER_IAM")) == "true"
    assert map_entry(_locals_text(graph, "vm_runner_env"), "CLOUD_RUN_INVOKER_IAM") is None
    configuration = "\n".join(path.read_text() for path in TERRAFORM_DIR.rglob("*.tf*"))
    assert "K_SERVICE" not in configuration


def test_runner_service_keeps_invoker_iam(graph: Graph) -> None:
    runner = graph.body("google_cloud_run_v2_service.runner")
    assert runner.get("invoker_iam_disabled") in (None, False)


# --- 10. the reaper schedule ------------------------------------------------------------


def _functions_serving(path: str) -> set[str]:
    return {
        main.parent.name
        for main in (REPO_ROOT / "functions").glob("*/main.py")
        if re.search(rf'Route\("POST", "{re.escape(path)}"', main.read_text())
    }


def test_reaper_schedule_carries_no_key(graph: Graph) -> None:
    job = graph.body("google_cloud_scheduler_job.reaper")
    target = job["http_target"][0]
    headers = {unquote(key).lower() for key in target.get("headers", {})}
    assert "x-api-key" not in headers and "authorization" not in headers, "a credential in the job's headers"
    assert "key_string" not in json.dumps(job)
    assert "google_service_account.scheduler.email" in str(target["oidc_token"][0]["service_account_email"])
    assert not any(address.startswith("google_apikeys_key.reaper") for address in graph.nodes)
    audience = str(target["oidc_token"][0]["audience"])
    function_env = _locals_text(graph, "function_env") + _locals_text(graph, "common_env")
    assert re.search(
        r"REAPER_INVOKER_EMAIL\s*=\s*\$?\{?google_service_account\.scheduler\.email", function_env
    )
    reaper_audience = _env_expression(graph, "function_env", "REAPER_OIDC_AUDIENCE")
    assert reaper_audience.strip("${}") in audience, (
        "the function expects the audience the scheduler asks for"
    )


@needs_terraform
def test_reaper_target_is_validated_to_a_function_serving_the_path() -> None:
    serving = _functions_serving("/internal/reap")
    assert serving, "no function serves POST /internal/reap"
    for target in ("create_task", "fetch_task", "get_task", "runner"):
        result = console(["var.reaper.target"], {"reaper": {"target": target}})
        accepted = result.returncode == 0
        assert accepted == (target in serving), (
            f"reaper.target = {target!r}: accepted={accepted}\n{result.stderr[-800:]}"
        )


# --- 11 and 12. Cloud Tasks limits ------------------------------------------------------


def _queue_rate_limits(graph: Graph) -> dict[str, Any]:
    return graph.body("google_cloud_tasks_queue.runner")["rate_limits"][0]


@needs_terraform
@pytest.mark.parametrize(
    ("slots", "instances", "shards"),
    [(1, 1, 1), (16, 100, 1), (16, 31, 1), (5, 100, 1), (16, 100, 3), (4, 1, 8)],
)
def test_queue_rates_stay_within_cloud_tasks_limits(
    graph: Graph, slots: int, instances: int, shards: int
) -> None:
    """The limits are per queue: each of queue.shards queues stays within 500/s and 5000
    concurrent, and together they ask for the runner's slots (each its share, at least 1)."""
    rates = _queue_rate_limits(graph)
    variables = {"engine_slots": slots, "runner_max_instances": instances, "queue": {"shards": shards}}
    per_second = evaluate(expression_of(rates["max_dispatches_per_second"]), variables)
    concurrent = evaluate(expression_of(rates["max_concurrent_dispatches"]), variables)
    assert 0 < per_second <= limits.QUEUE_MAX_DISPATCHES_PER_SECOND, per_second
    assert 0 < concurrent <= limits.QUEUE_MAX_CONCURRENT_DISPATCHES, concurrent
    share = -(-slots * instances // shards)
    assert concurrent == min(share, limits.QUEUE_MAX_CONCURRENT_DISPATCHES)
    assert concurrent * shards >= min(slots * instances, limits.QUEUE_MAX_CONCURRENT_DISPATCHES)


def test_queues_are_one_resource_for_each_shard_in_the_dispatchers_order(graph: Graph) -> None:
    """N queues by for_each over local.queues; shard 0 keeps the old queue's name and
    address (a moved block: a deleted queue's name cannot be reused for days); every
    component gets CLOUD_TASKS_QUEUES in shard order; the dashboard sums the queues."""
    queue = graph.body("google_cloud_tasks_queue.runner")
    assert queue["for_each"] == "${local.queues}"
    assert queue["name"] == "${each.value}"
    moved = parsed_config()["tasks.tf"]["moved"]
    assert [(str(block["from"]), str(block["to"])) for block in moved] == [
        ("${google_cloud_tasks_queue.runner}", '${google_cloud_tasks_queue.runner["0"]}')
    ], moved
    env = str(graph.body("local.common_env"))
    assert "CLOUD_TASKS_QUEUES" in env and "range(var.queue.shards)" in env
    assert 'google_cloud_tasks_queue.runner["0"].name' in env
    assert "local.queue_name" in str(graph.body("local.queue_names"))


@needs_terraform
@pytest.mark.parametrize("shards", [1, 3])
def test_queue_names_keep_shard_zero_and_refuse_bad_counts(shards: int) -> None:
    names, queues = console(["local.queue_names", "local.queues"], {"queue": {"shards": shards}}).values
    assert names[0] == f"{REQUIRED_VARIABLES['prefix']}-runner"
    assert names == [names[0]] + [f"{names[0]}-{shard}" for shard in range(1, shards)]
    assert queues == {str(shard): name for shard, name in enumerate(names)}
    for bad in (0, 101, 1.5):
        assert console(["var.queue"], {"queue": {"shards": bad}}).returncode != 0, bad


def test_sequential_fields_are_exempt_from_single_field_indexes(graph: Graph) -> None:
    """Timestamps written by the store grow with time: their automatic single-field
    indexes are hotspots (about 500 writes/s) and cost. Exempt them all, keeping only
    the one order a single-field query of the store uses (created_at and finished_at,
    descending), and never a field a composite index needs on its own."""
    from shared.store.firestore import REQUIRED_INDEXES

    field = graph.body("google_firestore_field.sequential")
    assert field["for_each"] == "${local.firestore_field_indexes}"
    assert field["collection"] == "${var.firestore.collection}"
    exempt = {
        name: [unquote(order) for order in orders]
        for name, orders in graph.body("local.firestore_field_indexes").items()
    }
    assert set(exempt) >= {"created_at", "updated_at", "available_at", "lease_expires_at", "started_at"}
    assert exempt["created_at"] == ["DESCENDING"] and exempt["finished_at"] == ["DESCENDING"]
    assert all(orders == [] for name, orders in exempt.items() if name not in {"created_at", "finished_at"})
    composite_fields = {name for index in REQUIRED_INDEXES for name, _ in index.fields}
    assert {"available_at", "lease_expires_at", "created_at"} <= composite_fields


def test_claimer_announcements_expire(graph: Graph) -> None:
    """Pull-mode claimers announce themselves in <collection>_claimers (a collection group
    under <collection>_fleet); workers that stop claiming must not stay there for ever."""
    field = graph.body("google_firestore_field.claimers_expire_at")
    assert unquote(field["collection"]) == "${var.firestore.collection}_claimers"
    assert unquote(field["field"]) == "expire_at"
    assert "ttl_config" in field


@needs_terraform
def test_dispatch_deadline_outlasts_the_synchronous_push_handling(graph: Graph) -> None:
    deadline_expression = _env_expression(graph, "function_env", "CLOUD_TASKS_DISPATCH_DEADLINE_S")
    timeout_expression = _env_expression(graph, "runner_env", "TASK_TIMEOUT_S")
    deadline, task_timeout, request_timeout = (
        float(value)
        for value in console([deadline_expression, timeout_expression, "var.runner.timeout_s"]).values
    )
    assert limits.DISPATCH_DEADLINE_MIN_S <= deadline <= limits.DISPATCH_DEADLINE_MAX_S
    assert deadline >= task_timeout + limits.PUSH_TRANSFER_ALLOWANCE_S, (
        f"a task may run {task_timeout:g}s + transfers; Cloud Tasks gives up at {deadline:g}s and redelivers"
    )
    assert request_timeout >= deadline, "Cloud Run would cut the push request before Cloud Tasks' deadline"
    # Values that would break it are refused by the variables' validations.
    too_long = {"runner_mode": "cloud_run", "task_limits": {"timeout_s": deadline}}
    assert console(["var.task_limits"], too_long).returncode != 0
    assert (
        console(
            ["var.queue"], {"queue": {"dispatch_deadline_s": limits.DISPATCH_DEADLINE_MAX_S + 1}}
        ).returncode
        != 0
    )
    short_request = {"runner": {"timeout_s": 600}}
    assert console(["var.runner"], short_request).returncode != 0
    # A pulling VM has no delivery deadline: long tasks are allowed there.
    assert (
        console(["var.task_limits"], {"runner_mode": "vm", "task_limits": {"timeout_s": 3000}}).returncode
        == 0
    )


# --- Cloud Run GPU minimums --------------------------------------------------------------


@needs_terraform
@pytest.mark.parametrize("gpu", sorted(limits.CLOUD_RUN_GPU_MINIMUMS))
def test_runner_sizes_below_the_cloud_run_gpu_minimums_are_refused(gpu: str) -> None:
    minimum = limits.CLOUD_RUN_GPU_MINIMUMS[gpu]
    enough = {"cpu": str(minimum["cpu"]), "memory": f"{minimum['memory_gib']}Gi"}
    base = {"gpu_type": gpu, "runner_mode": "cloud_run"}
    assert console(["var.runner"], {**base, "runner": enough}).returncode == 0
    few_cpus = {**enough, "cpu": str(minimum["cpu"] - 1)}
    assert console(["var.runner"], {**base, "runner": few_cpus}).returncode != 0
    little_memory = {**enough, "memory": f"{minimum['memory_gib'] - 1}Gi"}
    assert console(["var.runner"], {**base, "runner": little_memory}).returncode != 0


@needs_terraform
def test_default_runner_size_meets_the_default_gpu_minimum() -> None:
    runner, gpu = console(["var.runner", "var.gpu_type"]).values
    minimum = limits.CLOUD_RUN_GPU_MINIMUMS[gpu]
    assert int(runner["cpu"]) >= minimum["cpu"]
    assert int(runner["memory"].removesuffix("Gi")) >= minimum["memory_gib"]


@needs_terraform
def test_gpu_zonal_redundancy_is_explicit_and_matches_the_quota_the_guide_requests(graph: Graph) -> None:
    template = graph.body("google_cloud_run_v2_service.runner")["template"][0]
    assert "gpu_zonal_redundancy_disabled" in template, "left to Cloud Run's default (zonal redundancy on)"
    disabled = evaluate(expression_of(template["gpu_zonal_redundancy_disabled"]))
    assert disabled is True
    guide = " ".join((REPO_ROOT / "docs" / "deploy.md").read_text().split())
    assert limits.GPU_QUOTA_REQUESTED in guide


def test_runner_uses_instance_based_billing(graph: Graph) -> None:
    resources = graph.body("google_cloud_run_v2_service.runner")["template"][0]["containers"][0]["resources"][
        0
    ]
    assert resources["cpu_idle"] is False, "Cloud Run GPUs need instance-based billing (cpu_idle = false)"


# --- 13. functions hold long polls concurrently ----------------------------------------


@needs_terraform
def test_functions_serve_concurrent_long_polls(graph: Graph) -> None:
    service = graph.body("google_cloudfunctions2_function.api")["service_config"][0]
    concurrency = evaluate(expression_of(service["max_instance_request_concurrency"]))
    cpu = evaluate(expression_of(service["available_cpu"]))
    timeout = evaluate(expression_of(service["timeout_seconds"]))
    assert concurrency > 1, "each ?wait= / fetch long poll would pin an instance"
    assert float(cpu) >= limits.FUNCTION_CONCURRENCY_MIN_CPU
    from shared.service import MAX_FETCH_WAIT_S

    assert timeout > MAX_FETCH_WAIT_S
    # functions-framework serves with gunicorn threads: THREADS must cover the concurrency.
    threads = _env_expression(graph, "function_env", "THREADS")
    assert evaluate(threads) == str(concurrency)
    assert console(["var.functions"], {"functions": {"concurrency": 10, "cpu": "0.5"}}).returncode != 0


# --- 15. a default VM zone that exists ----------------------------------------------------


@needs_terraform
@pytest.mark.parametrize("gpu", sorted(limits.GPU_ZONES))
def test_default_vm_zone_offers_the_gpu(gpu: str) -> None:
    for region, zones in limits.GPU_ZONES[gpu].items():
        zone = evaluate("local.runner_vm_zone", {"region": region, "gpu_type": gpu, "runner_mode": "vm"})
        assert zone.startswith(f"{region}-") and zone.rsplit("-", 1)[1] in zones, f"{gpu} in {region}: {zone}"
    chosen = evaluate(
        "local.runner_vm_zone", {"region": "europe-west1", "runner_vm": {"zone": "europe-west1-d"}}
    )
    assert chosen == "europe-west1-d"


# --- 16. dashboard and gateway routes ---------------------------------------------------


def _defaults(node: Any, where: str = "") -> list[str]:
    """Fields whose value the Monitoring API drops (proto3 defaults): they diff forever."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if value in ([], {}, "", 0) and not isinstance(value, bool):
                found.append(f"{where}.{key}")
            found += _defaults(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found += _defaults(item, f"{where}[{index}]")
    return found


@needs_terraform
def test_dashboard_holds_no_field_the_api_drops(graph: Graph) -> None:
    dashboard_json = str(graph.body("google_monitoring_dashboard.comfyswap")["dashboard_json"])
    match = re.fullmatch(r"\$\{jsonencode\((local\.[a-z_]+)\)\}", dashboard_json)
    assert match, "dashboard_json = jsonencode(local.X), X built from variables only, so it can be checked"
    dashboard = evaluate(match.group(1))
    assert dashboard["mosaicLayout"]["tiles"]
    assert _defaults(dashboard) == [], "empty or zero fields the API drops"


def test_openapi_document_is_routed_by_the_gateway() -> None:
    template = (TERRAFORM_DIR / "templates" / "openapi2.yaml.tftpl").read_text()
    assert re.search(r"^  /api/openapi\.json:\n    get:", template, flags=re.MULTILINE)
