"""What `terraform plan` and the first `apply` would reject, checked offline (issue 12).

The reference graph is built from python-hcl2's parse; anything that depends on
variables only is evaluated by real Terraform (`terraform console`, tests/infra/tfconfig.py),
so validations, conditionals and `templatefile()` are Terraform's own behaviour.
"""

from __future__ import annotations

import itertools
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
    assert "data.google_project.project" in graph.edges["local.runner_urls"]
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
    # A dispatch that fell over to another pool: the functions (a runner has one pool).
    "dispatch_pool_failed": {"create_task", "reaper"},
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
    lease reaper): enqueuer on its queues and actAs on its invoker, like create_task."""
    enqueuer = graph.body("google_cloud_tasks_queue_iam_member.enqueuer")
    assert enqueuer["for_each"] == "${local.enqueuer_grants}"
    assert "google_service_account.runner[pool].member" in str(graph.body("local.enqueuer_members"))
    # Every queue shard: the grants are the product of enqueuers and their pools' queues.
    assert "local.queues" in str(graph.body("local.enqueuer_grants"))
    acts_as = graph.body("google_service_account_iam_member.acts_as_invoker")
    assert acts_as["for_each"] == "${local.invoker_users}", "actAs once per enqueuer and pool, not per queue"


@needs_terraform
def test_each_pools_runner_enqueues_on_its_own_queues_and_is_invoked_by_its_own_identity() -> None:
    """Least privilege per pool: the functions enqueue on every queue of every pool (they
    dispatch anywhere), a pool's runner on its own pool's queues only; actAs once per
    (enqueuer, pool); each pool's invoker may call its own runner only, the gateway the
    home pool's. The primary pool's grants keep their single-region keys."""
    pools = {"primary": {}, "eu": {"region": "europe-west4", "queue_shards": 2}}
    grants, users, invokers = console(
        ["local.enqueuer_grants", "local.invoker_users", "local.runner_invoker_grants"],
        {"runner_pools": pools},
    ).values

    assert {key: grant["queue"] for key, grant in grants.items() if grant["who"] == "create_task"} == {
        "create_task": "0",
        "create_task/eu/0": "eu/0",
        "create_task/eu/1": "eu/1",
    }
    assert {key: grant["queue"] for key, grant in grants.items() if grant["who"].startswith("runner")} == {
        "runner": "0",
        "runner-eu/eu/0": "eu/0",
        "runner-eu/eu/1": "eu/1",
    }
    assert {key: (user["who"], user["pool"]) for key, user in users.items() if "runner" in key} == {
        "runner": ("runner", "primary"),
        "runner-eu@eu": ("runner-eu", "eu"),
    }
    assert users["create_task"] == {"who": "create_task", "pool": "primary"}
    assert users["create_task@eu"] == {"who": "create_task", "pool": "eu"}
    assert invokers == {
        "tasks_invoker": {"pool": "primary", "who": "tasks_invoker/primary"},
        "eu/tasks_invoker": {"pool": "eu", "who": "tasks_invoker/eu"},
        "gateway": {"pool": "primary", "who": "gateway"},
    }
    vm = console(["local.enqueuer_grants", "local.runner_invoker_grants"], {"runner_mode": "vm"}).values
    assert vm == [{}, {}], "pull mode enqueues nothing and has no runner service to invoke"


def test_functions_reach_only_the_inputs_prefix_of_the_inputs_bucket(graph: Graph) -> None:
    """The input store (shared/inputs.py) keeps data: inputs under inputs/ in the bucket
    local.inputs_bucket names: the functions that write and delete them get that prefix
    only, and a lifecycle rule removes what a crash left behind."""
    from shared.inputs import INPUT_KEY_PREFIX

    grant = graph.body("google_storage_bucket_iam_member.function_inputs")
    assert "local.inputs_bucket" in str(grant["bucket"])
    expression = str(grant["condition"][0]["expression"])
    assert "${local.inputs_bucket}/objects/" + INPUT_KEY_PREFIX + '\\")' in expression
    assert f'objectListPrefix\\", \\"\\").startsWith(\\"{INPUT_KEY_PREFIX}\\")' in expression
    rules = graph.body("google_storage_bucket.results")["lifecycle_rule"]
    assert any(f'"{INPUT_KEY_PREFIX}"' in str(rule["condition"][0].get("matches_prefix")) for rule in rules)
    (backstop,) = graph.body("google_storage_bucket.inputs")["lifecycle_rule"]
    assert backstop["condition"][0]["age"] == 1 and "matches_prefix" not in backstop["condition"][0]
    for address, body in graph.nodes.items():
        if address.startswith(
            "google_storage_bucket_iam_member."
        ) and "google_service_account.function" in str(body["member"]):
            assert "condition" in body, f"{address}: a function's bucket grant without the inputs/ condition"


def test_public_results_keep_the_inputs_in_a_private_bucket_of_their_own(graph: Graph) -> None:
    """The finding: with public_results the operator makes the results bucket readable,
    and a bucket allUsers may read is listable too, so the photos waiting under inputs/
    were anyone's. Now public results move the inputs to a bucket that enforces public
    access prevention, the processes are told its name (INPUTS_BUCKET, read by
    shared.inputs.make_input_store) and every runner pool may read and delete there."""
    bucket = graph.body("google_storage_bucket.inputs")
    assert "var.public_results" in str(bucket["count"])
    assert unquote(bucket["public_access_prevention"]) == "enforced"
    assert "cors" not in bucket, "nothing loads inputs from a browser"
    assert "var.public_results" in _locals_text(graph, "inputs_bucket")
    assert "google_storage_bucket.inputs" in _locals_text(graph, "inputs_bucket")
    env = str(graph.body("local.common_env")["INPUTS_BUCKET"])
    assert "var.public_results" in env and "local.inputs_bucket" in env
    runner = graph.body("google_storage_bucket_iam_member.runner_inputs")
    assert "var.public_results" in str(runner["for_each"]) and "local.runner_pools" in str(runner["for_each"])
    assert "google_storage_bucket.inputs" in str(runner["bucket"])
    assert unquote(runner["role"]) == "roles/storage.objectUser"


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


def _per_queue(expression: str) -> str:
    """A queue's rate expression over every queue: ``min(each.value.capacity, N)`` ->
    ``{for key, queue in local.queues : key => min(queue.capacity, N)}``."""
    return "{for key, queue in local.queues : key => " + expression.replace("each.value", "queue") + "}"


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
    per_second, concurrent = console(
        [
            _per_queue(expression_of(rates["max_dispatches_per_second"])),
            _per_queue(expression_of(rates["max_concurrent_dispatches"])),
        ],
        variables,
    ).values
    assert len(concurrent) == shards
    for key in concurrent:
        assert 0 < per_second[key] <= limits.QUEUE_MAX_DISPATCHES_PER_SECOND, per_second
        assert 0 < concurrent[key] <= limits.QUEUE_MAX_CONCURRENT_DISPATCHES, concurrent
        share = -(-slots * instances // shards)
        assert concurrent[key] == min(share, limits.QUEUE_MAX_CONCURRENT_DISPATCHES)
    assert sum(concurrent.values()) >= min(slots * instances, limits.QUEUE_MAX_CONCURRENT_DISPATCHES)


@needs_terraform
def test_each_pools_queues_share_that_pools_slots() -> None:
    """A pool of 40 instances x 4 slots over 2 queues: 80 each; a pool of 3 over 1: 12."""
    pools = {
        "primary": {"max_instances": 3},
        "eu": {"region": "europe-west4", "max_instances": 40, "queue_shards": 2},
    }
    rates = console(
        ["{for key, queue in local.queues : key => [queue.region, min(queue.capacity, 5000)]}"],
        {"engine_slots": 4, "runner_pools": pools},
    ).values[0]
    assert rates == {"0": ["us-central1", 12], "eu/0": ["europe-west4", 80], "eu/1": ["europe-west4", 80]}


def test_queues_are_one_resource_for_each_shard_in_the_dispatchers_order(graph: Graph) -> None:
    """Queues by for_each over local.queues, each in its pool's region; shard 0 of the
    primary pool keeps the old queue's name and address (a moved block: a deleted
    queue's name cannot be reused for days); the functions get every pool's queues
    (RUNNER_POOLS), each runner its own pool's, in shard order."""
    queue = graph.body("google_cloud_tasks_queue.runner")
    assert queue["for_each"] == "${local.queues}"
    assert queue["name"] == "${each.value.name}"
    assert queue["location"] == "${each.value.region}"
    moved = parsed_config()["tasks.tf"]["moved"]
    assert [(str(block["from"]), str(block["to"])) for block in moved] == [
        ("${google_cloud_tasks_queue.runner}", '${google_cloud_tasks_queue.runner["0"]}')
    ], moved
    assert "RUNNER_POOLS" in str(graph.body("local.function_env"))
    pool_env = str(graph.body("local.pool_runner_env"))
    assert "RUNNER_POOLS" in pool_env and "CLOUD_TASKS_QUEUES" in pool_env
    settings = str(graph.body("local.runner_pool_settings"))
    assert (
        "google_cloud_tasks_queue.runner[key].name" in settings and "local.pool_queue_keys[name]" in settings
    )


@needs_terraform
@pytest.mark.parametrize("shards", [1, 3])
def test_queue_names_keep_shard_zero_and_refuse_bad_counts(shards: int) -> None:
    """The default (one pool, primary) is the single-region deployment: same names, same keys."""
    names, queues = console(["local.queue_names", "local.queues"], {"queue": {"shards": shards}}).values
    primary = names["primary"]
    assert primary[0] == f"{REQUIRED_VARIABLES['prefix']}-runner"
    assert primary == [primary[0]] + [f"{primary[0]}-{shard}" for shard in range(1, shards)]
    assert {key: queue["name"] for key, queue in queues.items()} == {
        str(shard): name for shard, name in enumerate(primary)
    }
    for bad in (0, 101, 1.5):
        assert console(["var.queue"], {"queue": {"shards": bad}}).returncode != 0, bad


@needs_terraform
def test_sequential_fields_are_exempt_from_single_field_indexes(graph: Graph) -> None:
    """Timestamps written by the store grow with time: their automatic single-field
    indexes are hotspots (about 500 writes/s) and cost. Exempt them all, keeping only
    the one order a single-field query of the store uses (created_at and finished_at,
    descending), and never a field a composite index needs on its own."""
    from shared.store.firestore import REQUIRED_INDEXES

    field = graph.body("google_firestore_field.sequential")
    assert field["for_each"] == "${local.firestore_field_indexes}"
    assert field["collection"] == "${var.firestore.collection}"
    exempt = evaluate("local.firestore_field_indexes")
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
        zone = evaluate(
            'local.runner_vm_zones["primary"]', {"region": region, "gpu_type": gpu, "runner_mode": "vm"}
        )
        assert zone.startswith(f"{region}-") and zone.rsplit("-", 1)[1] in zones, f"{gpu} in {region}: {zone}"
        # The same table serves a pool in that region.
        pools = {"primary": {}, "other": {"region": region, "gpu_type": gpu}}
        other = evaluate('local.runner_vm_zones["other"]', {"runner_mode": "vm", "runner_pools": pools})
        assert other == zone
    chosen = evaluate(
        'local.runner_vm_zones["primary"]',
        {"region": "europe-west1", "runner_vm": {"zone": "europe-west1-d"}},
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


# --- 17. runner pools per region --------------------------------------------------------


def _moved(file_name: str) -> set[tuple[str, str]]:
    return {(str(block["from"]), str(block["to"])) for block in parsed_config()[file_name].get("moved", [])}


@needs_terraform
def test_the_default_pool_is_the_single_region_deployment_at_its_old_addresses() -> None:
    """Existing tfvars name no pool: one pool, primary, in region with the single-region
    sizes, names and keys; every address that became for_each has a moved block from the
    old one, so the plan of an existing deployment replaces nothing (its runner, its
    queues whose names cannot be reused for days, its accounts and grants)."""
    variables = {"region": "europe-west4", "runner_min_instances": 1, "runner_max_instances": 7}
    pools, urls_free_names = console(
        ["local.runner_pools", "{for name, pool in local.runner_pools : name => pool.runner_name}"], variables
    ).values
    assert pools == {
        "primary": {
            "environments": [],
            "gpu_type": "nvidia-l4",
            "max_instances": 7,
            "min_instances": 1,
            "queue_name": "cswap-runner",
            "queue_shards": 1,
            "region": "europe-west4",
            "runner_name": "cswap-runner",
            "weight": 1,
            "zone": None,
        }
    }
    assert urls_free_names == {"primary": "cswap-runner"}
    assert _moved("runner.tf") == {
        ("${google_cloud_run_v2_service.runner[0]}", '${google_cloud_run_v2_service.runner["primary"]}')
    }
    assert _moved("iam.tf") == {
        ("${google_service_account.runner}", '${google_service_account.runner["primary"]}'),
        ("${google_service_account.tasks_invoker[0]}", '${google_service_account.tasks_invoker["primary"]}'),
        (
            "${google_storage_bucket_iam_member.runner_results}",
            '${google_storage_bucket_iam_member.runner_results["primary"]}',
        ),
        (
            "${google_storage_bucket_iam_member.runner_models}",
            '${google_storage_bucket_iam_member.runner_models["primary"]}',
        ),
        (
            "${google_service_account_iam_member.runner_signs_urls[0]}",
            '${google_service_account_iam_member.runner_signs_urls["primary"]}',
        ),
    }
    graph = build_graph()
    for address in ("google_cloud_run_v2_service.runner", "google_service_account.runner"):
        assert "local.runner_pools" in str(graph.body(address)["for_each"]), address


@needs_terraform
def test_pools_in_other_regions_get_their_own_names_queues_and_vms() -> None:
    pools = {
        "primary": {"max_instances": 2},
        "eu": {"region": "europe-west4", "queue_shards": 2, "weight": 3, "environments": ["comm"]},
    }
    queues, vms, environments = console(
        ["local.queues", "local.runner_vms", "local.pool_runner_environments"],
        {"runner_pools": pools, "runner_mode": "vm", "runner_max_instances": 1},
    ).values
    assert {key: (queue["name"], queue["region"], queue["pool"]) for key, queue in queues.items()} == {
        "0": ("cswap-runner", "us-central1", "primary"),
        "eu/0": ("cswap-runner-eu", "europe-west4", "eu"),
        "eu/1": ("cswap-runner-eu-1", "europe-west4", "eu"),
    }
    assert vms == {
        "cswap-runner-0": {"index": 0, "pool": "primary"},
        "cswap-runner-1": {"index": 1, "pool": "primary"},
        "cswap-runner-eu-0": {"index": 0, "pool": "eu"},
    }
    # A pool's runners serve (and in pull mode claim) the pool's environments only.
    assert environments == {"eu": "comm", "primary": "face_swap,comm"}
    assert "local.pool_runner_environments[name]" in str(build_graph().body("local.pool_runner_env"))


def _runner_pools_json_expression() -> str:
    """local.runner_pool_settings with its provider-made values (emails, queue names,
    URLs) replaced by what they will be, so Terraform evaluates the RUNNER_POOLS it writes."""
    from tests.infra.tfconfig import local_sources

    source = local_sources()["runner_pool_settings"].split("=", 1)[1]
    for provider_made, stand_in in {
        "google_service_account.tasks_invoker[name].email": '"${name}-inv@p.iam.gserviceaccount.com"',
        "google_cloud_tasks_queue.runner[key].name": "local.queues[key].name",
        "local.runner_urls[name]": '"https://${local.runner_pools[name].runner_name}-123.${pool.region}.run.app"',
    }.items():
        assert provider_made in source, provider_made
        source = source.replace(provider_made, stand_in)
    # The console reads one line: object attributes on separate lines need commas there.
    lines = [line.strip() for line in source.splitlines() if line.strip()]
    one_line = lines[0]
    for previous, line in itertools.pairwise(lines):
        one_line += (" " if previous.endswith("{") or line.startswith("}") else ", ") + line
    return f"jsonencode([for name, setting in {one_line} : setting])"


@needs_terraform
def test_the_runner_pools_terraform_writes_are_what_the_settings_accept() -> None:
    """RUNNER_POOLS as Terraform builds it parses in Settings (shared/pools.py), and the
    dispatcher's order then draws only from pools serving the environment."""
    from shared.pools import pool_order
    from shared.settings import Settings

    pools = {
        "primary": {"weight": 2},
        "eu": {"region": "europe-west4", "queue_shards": 2, "environments": ["face_swap"]},
        "standby": {"region": "us-east4", "weight": 0},
    }
    [written] = console([_runner_pools_json_expression()], {"runner_pools": pools}).values

    parsed = Settings(runner_pools=written).runner_pools
    by_name = {pool.name: pool for pool in parsed}
    assert set(by_name) == {"primary", "eu", "standby"}
    assert by_name["eu"].queues == ("cswap-runner-eu", "cswap-runner-eu-1")
    assert by_name["eu"].location == "europe-west4"
    assert by_name["eu"].effective_audience == "https://cswap-runner-eu-123.europe-west4.run.app"
    assert by_name["standby"].weight == 0
    assert [pool.name for pool in pool_order(parsed, "task_x", "comm")][-1] == "standby"
    assert "eu" not in {pool.name for pool in pool_order(parsed, "task_x", "comm")}


@needs_terraform
@pytest.mark.parametrize(
    ("variables", "accepted"),
    [
        ({"runner_pools": {"primary": {}, "eu": {"region": "europe-west4"}}}, True),
        ({"runner_pools": {"primary": {}, "eu": {"region": "europe-west1", "weight": 0}}}, True),
        ({"runner_pools": {"us": {}, "asia": {"region": "asia-southeast1", "max_instances": 4}}}, True),
        ({"runner_pools": {}}, False),
        ({"runner_pools": {"Eu": {}}}, False),
        ({"runner_pools": {"averyveryl": {}}}, False),  # 10 characters: the account id would pass 30
        ({"runner_pools": {"primary": {"region": "Europe West"}}}, False),
        ({"runner_pools": {"primary": {"weight": 0}}}, False),
        ({"runner_pools": {"primary": {"weight": -1}}}, False),
        ({"runner_pools": {"primary": {"weight": 1.5}}}, False),
        ({"runner_pools": {"primary": {"min_instances": 3, "max_instances": 2}}}, False),
        # Cloud Run: bounded by the region's GPU quota (a fleet of thousands); VMs: 100 per pool.
        ({"runner_pools": {"primary": {"max_instances": 3000}}}, True),
        ({"runner_pools": {"primary": {"max_instances": 5001}}}, False),
        ({"runner_pools": {"primary": {"max_instances": 101}}, "runner_mode": "vm"}, False),
        (
            {
                "runner_pools": {
                    "primary": {"queue_shards": 60},
                    "eu": {"region": "europe-west4", "queue_shards": 41},
                }
            },
            False,
        ),
        ({"runner_pools": {"primary": {"gpu_type": "nvidia-a100"}}}, False),
        # Cloud Run offers L4s in six regions only; a VM pool may go elsewhere.
        ({"runner_pools": {"primary": {}, "br": {"region": "southamerica-east1"}}}, False),
        (
            {"runner_pools": {"primary": {}, "br": {"region": "southamerica-east1"}}, "runner_mode": "vm"},
            True,
        ),
        ({"runner_pools": {"primary": {"gpu_type": "nvidia-tesla-t4"}}}, False),
        ({"runner_pools": {"primary": {"gpu_type": "nvidia-tesla-t4"}}, "runner_mode": "vm"}, True),
        ({"runner_pools": {"primary": {}, "big": {"gpu_type": "nvidia-rtx-pro-6000"}}}, False),  # 8 CPU < 20
        ({"runner_pools": {"primary": {"environments": ["comm"]}}}, False),  # face_swap unserved
        (
            {
                "runner_pools": {
                    "primary": {"environments": ["comm"]},
                    "eu": {"region": "europe-west4", "environments": ["face_swap"]},
                }
            },
            True,
        ),
        ({"runner_pools": {"primary": {"environments": ["Bad Env"]}}}, False),
        ({"runner_pools": {"primary": {"zone": "us-central1"}}, "runner_mode": "vm"}, False),
    ],
)
def test_runner_pools_are_validated(variables: dict[str, Any], accepted: bool) -> None:
    result = console(["var.runner_pools"], variables)
    assert (result.returncode == 0) is accepted, f"{variables}: accepted={accepted}\n{result.stderr[-1500:]}"


def _mentions_datetime(annotation: Any) -> bool:
    import datetime as dt
    import typing

    from pydantic import BaseModel

    if annotation is dt.datetime:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return any(_mentions_datetime(field.annotation) for field in annotation.model_fields.values())
    return any(_mentions_datetime(argument) for argument in typing.get_args(annotation))


@needs_terraform
def test_every_timestamp_map_and_list_the_store_writes_is_exempt_from_automatic_indexes(graph: Graph) -> None:
    """Firestore indexes every field, every subfield of a map and every element of a
    list unless exempted. Every field of a task that holds a time (directly or inside a
    map: lease.expires_at) is a sequential value (a hotspot near 500 writes/s), and every
    map or list is index writes nobody reads (a ComfyUI workflow in params: hundreds).
    The queries read top-level fields only, and none of those is exempted outright."""
    import typing

    from shared.store.firestore import REQUIRED_INDEXES, encode_task
    from shared.tasks import Task

    indexes = evaluate("local.firestore_field_indexes")
    sequential = evaluate("local.firestore_sequential_fields")
    unqueried = {name for name, kept in indexes.items() if name not in sequential and kept == []}
    # One resource exempts them all: an empty index_config covers a map's subfields too.
    assert graph.body("google_firestore_field.sequential")["for_each"] == "${local.firestore_field_indexes}"

    timestamps = {name for name, info in Task.model_fields.items() if _mentions_datetime(info.annotation)}
    maps_and_lists = {
        name
        for name, info in Task.model_fields.items()
        if any(
            origin in (dict, list) or (isinstance(origin, type) and hasattr(origin, "model_fields"))
            for origin in (
                typing.get_origin(arg) or arg for arg in (info.annotation, *typing.get_args(info.annotation))
            )
        )
    }
    assert {"redispatched_at", "lease", "created_at"} <= timestamps and {
        "params",
        "attempt_history",
    } <= maps_and_lists
    for name in timestamps - maps_and_lists:
        assert name in sequential, f"{name} holds a time: exempt it in local.firestore_field_indexes"
    for name in maps_and_lists:
        assert name in unqueried, f"{name} is a map or list: exempt it in local.firestore_unqueried_fields"
    # The encoded document's extra fields: the top-level lease time (queried, composite
    # only) and the JSON string a nested array is stored as.
    assert "lease_expires_at" in sequential and "params__json" in unqueried
    document = encode_task(Task(workflow="w", environment="face_swap"))
    composite_fields = {name for index in REQUIRED_INDEXES for name, _ in index.fields}
    assert not (unqueried & (composite_fields | set(document) - set(Task.model_fields))), (
        "a queried field is exempt"
    )


@needs_terraform
def test_the_runner_pools_example_in_the_tfvars_example_is_valid() -> None:
    """The commented example in terraform.tfvars.example passes the variable's validations
    and resolves as its comments say."""
    text = (TERRAFORM_DIR / "terraform.tfvars.example").read_text()
    block = re.search(r"^# runner_pools = \{\n(?:#  .*\n)+# \}\n", text, flags=re.MULTILINE)
    assert block, "terraform.tfvars.example shows no runner_pools example"
    hcl = "\n".join(re.sub(r"\s+#.*$", "", line[2:]) for line in block.group(0).splitlines())
    pools_hcl = hcl.split("=", 1)[1].strip()
    # The console reads one line: object items need commas there.
    one_line = re.sub(r"\}\s*\n\s*", "}, ", pools_hcl).replace("{\n", "{ ").replace("\n", " ")
    resolved = console([f"{{for name, pool in {one_line} : name => pool}}"]).values[0]
    assert set(resolved) == {"primary", "eu", "comfy", "standby"}
    pools = evaluate(
        "{for name, pool in local.runner_pools : name => [pool.region, pool.weight]}",
        {"runner_pools": resolved},
    )
    assert pools == {
        "primary": ["us-central1", 2],
        "eu": ["europe-west4", 1],
        "comfy": ["europe-west1", 1],
        "standby": ["us-east4", 0],
    }
