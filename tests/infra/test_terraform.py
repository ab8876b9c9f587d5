"""Structure of infra/terraform, checked offline.

No provider can be downloaded here, so `terraform validate/plan` cannot run. These
tests parse every .tf file with python-hcl2 and check what a plan would otherwise
catch (undeclared variables, locals and resources) plus the project's rules: typed and
described variables, alphabetical variables.tf and outputs.tf, least-privilege IAM,
private buckets, no secret in outputs, and the gateway's routes. `terraform fmt` and
checkov run when their binaries exist (scripts/install_checkov.sh installs checkov).
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

from tests.infra.tfconfig import parse_dir, parse_file, unquote, walk_strings

REPO_ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = REPO_ROOT / "infra" / "terraform"
OPENAPI_TEMPLATE = TERRAFORM_DIR / "templates" / "openapi2.yaml.tftpl"
CHECKOV = REPO_ROOT / ".tools" / "checkov-venv" / "bin" / "checkov"

# The public routes clients reach through the gateway (docs: DESIGN section 3).
PUBLIC_ROUTES = {
    ("POST", "/api/tasks/create"),
    ("POST", "/api/face-swap/create-task"),
    ("GET", "/api/tasks/{task_id}"),
    ("GET", "/api/tasks"),
    ("POST", "/api/tasks/{task_id}/cancel"),
    ("DELETE", "/api/tasks/{task_id}"),
    ("GET", "/api/comm/task/fetch"),
    ("GET", "/api/health"),
    ("GET", "/api/status"),
    ("POST", "/api/face-swap/process"),
    ("GET", "/api/face-swap/health"),
    ("GET", "/api/face-swap/workflows"),
    ("GET", "/api/face-swap/queue-status"),
    ("GET", "/api/comfyui-queue-status"),
    ("GET", "/api/comfyui-system-stats"),
    ("POST", "/api/comfyui-interrupt"),
    ("GET", "/api/admin/stats"),
    ("GET", "/console"),
    ("GET", "/console/{asset}"),
    ("GET", "/api/runner/health"),
    ("GET", "/api/openapi.json"),
}
PRIMITIVE_ROLES = {"roles/owner", "roles/editor", "roles/viewer"}
PUBLIC_MEMBERS = ("allUsers", "allAuthenticatedUsers")


# --- helpers ---------------------------------------------------------------------------


_unquote = unquote
_walk_strings = walk_strings


def _tf_files() -> list[Path]:
    return sorted(TERRAFORM_DIR.glob("*.tf"))


_parse = parse_file


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict[str, Any]]:
    return parse_dir(TERRAFORM_DIR)


def _blocks(parsed: dict[str, dict[str, Any]], kind: str) -> list[tuple[str, dict[str, Any]]]:
    """Top-level blocks of one kind across all files: [(file name, block)]."""
    return [(name, block) for name, tree in parsed.items() for block in tree.get(kind, [])]


def _labelled(parsed: dict[str, dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """`variable "x" {}` / `output "x" {}` blocks by unquoted label."""
    found: dict[str, dict[str, Any]] = {}
    for _, block in _blocks(parsed, kind):
        for label, body in block.items():
            found[_unquote(label)] = body
    return found


def _resources(
    parsed: dict[str, dict[str, Any]], kind: str = "resource"
) -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for _, block in _blocks(parsed, kind):
        for type_label, named in block.items():
            for name_label, body in named.items():
                found[(_unquote(type_label), _unquote(name_label))] = body
    return found


def _all_expressions(parsed: dict[str, dict[str, Any]]) -> str:
    return "\n".join(_walk_strings(parsed))


def _attribute_values(node: Any, names: set[str]) -> list[Any]:
    """Values of attributes called one of ``names`` anywhere in a parsed tree."""
    values: list[Any] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in names:
                values.append(value)
            values.extend(_attribute_values(value, names))
    elif isinstance(node, list):
        for item in node:
            values.extend(_attribute_values(item, names))
    return values


def _render_openapi(template: str) -> dict[str, Any]:
    """Render the OpenAPI template the way templatefile would, with dummy values."""
    without_directives = re.sub(r"^%\{[^}]*\}~?\s*$\n?", "", template, flags=re.MULTILINE)
    rendered = re.sub(r"\$\{[a-z_]+\}", "https://backend.example", without_directives)
    return yaml.safe_load(rendered)


# --- parse and declarations --------------------------------------------------------------


def test_every_tf_file_parses() -> None:
    files = _tf_files()
    assert files, f"no .tf files under {TERRAFORM_DIR}"
    for path in files:
        _parse(path)  # raises on a syntax error, naming nothing else: let it


def test_expected_files_exist() -> None:
    expected = {
        "apis.tf", "firestore.tf", "functions.tf", "gateway.tf", "iam.tf", "main.tf", "monitoring.tf",
        "outputs.tf", "registry.tf", "runner.tf", "scheduler.tf", "secrets.tf", "storage.tf", "tasks.tf",
        "variables.tf", "versions.tf",
    }  # fmt: skip
    assert expected <= {path.name for path in _tf_files()}


def test_main_tf_holds_only_locals(parsed: dict[str, dict[str, Any]]) -> None:
    assert set(parsed["main.tf"]) == {"locals"}


def test_versions_pin_terraform_and_provider_ranges(parsed: dict[str, dict[str, Any]]) -> None:
    terraform_block = parsed["versions.tf"]["terraform"][0]
    assert ">= 1.9" in terraform_block["required_version"]  # cross-variable validations
    providers = terraform_block["required_providers"][0]
    for provider in ("google", "google-beta"):
        version = providers[provider]["version"]
        assert re.search(r">=\s*[0-9]", version), f"{provider} needs a lower bound"
        assert re.search(r"(?<![<>])<\s*[0-9]", version), f"{provider} needs an upper bound"


def test_every_variable_is_typed_and_described(parsed: dict[str, dict[str, Any]]) -> None:
    variables = _labelled(parsed, "variable")
    assert variables
    for name, body in variables.items():
        assert "type" in body, f"variable {name} has no type"
        description = _unquote(str(body.get("description", "")))
        assert len(description) > 10, f"variable {name} needs a description"


def test_validation_blocks_have_messages(parsed: dict[str, dict[str, Any]]) -> None:
    for name, body in _labelled(parsed, "variable").items():
        for validation in body.get("validation", []):
            assert "condition" in validation, name
            assert len(_unquote(validation.get("error_message", ""))) > 15, f"variable {name}: vague message"


def test_core_variables_validate_their_values(parsed: dict[str, dict[str, Any]]) -> None:
    variables = _labelled(parsed, "variable")
    for name in (
        "project_id",
        "region",
        "prefix",
        "runner_mode",
        "gpu_type",
        "engine_slots",
        "storage_provider",
    ):
        assert variables[name].get("validation"), f"variable {name} needs a validation block"
    runner_mode_rule = json.dumps(variables["runner_mode"]["validation"])
    assert "cloud_run" in runner_mode_rule
    assert "vm" in runner_mode_rule


def test_sensitive_variables_have_no_default(parsed: dict[str, dict[str, Any]]) -> None:
    for name, body in _labelled(parsed, "variable").items():
        if body.get("sensitive") is True:
            assert "default" not in body, f"sensitive variable {name} must not carry a default"


def test_every_var_reference_is_declared(parsed: dict[str, dict[str, Any]]) -> None:
    declared = set(_labelled(parsed, "variable"))
    text = _all_expressions(parsed)
    referenced = set(re.findall(r"\bvar\.([A-Za-z_][A-Za-z0-9_]*)", text))
    assert referenced - declared == set(), "undeclared variables"
    assert declared - referenced == set(), "variables nothing uses"


def test_every_local_reference_is_declared(parsed: dict[str, dict[str, Any]]) -> None:
    declared = {name for _, block in _blocks(parsed, "locals") for name in block}
    text = _all_expressions(parsed)
    referenced = set(re.findall(r"\blocal\.([A-Za-z_][A-Za-z0-9_]*)", text))
    assert referenced - declared == set(), "undeclared locals"
    assert declared - referenced == set(), "locals nothing uses"


def test_every_resource_reference_is_declared(parsed: dict[str, dict[str, Any]]) -> None:
    resources = set(_resources(parsed))
    data_sources = set(_resources(parsed, "data"))
    # A moved block's `from` names an address that no longer exists: that is its point.
    text = _all_expressions(
        {
            name: {
                kind: [{key: value for key, value in block.items() if key != "from"} for block in blocks]
                if kind == "moved"
                else blocks
                for kind, blocks in tree.items()
            }
            for name, tree in parsed.items()
        }
    )
    # Strip quoted literals inside expressions: they hold role names, filters, hosts.
    for type_name, name in re.findall(
        r"(?<![\w.\"/-])([a-z][a-z0-9]*_[a-z0-9_]+)\.([a-z_][a-z0-9_-]*)", text
    ):
        if type_name.split("_")[0] in {"google", "archive"}:
            assert (type_name, name) in resources, f"{type_name}.{name} is referenced but not declared"
    for type_name, name in re.findall(r"\bdata\.([a-z0-9_]+)\.([a-z_][a-z0-9_-]*)", text):
        assert (type_name, name) in data_sources, f"data.{type_name}.{name} is referenced but not declared"


def test_for_each_uses_maps_or_sets_not_lists(parsed: dict[str, dict[str, Any]]) -> None:
    for (type_name, name), body in _resources(parsed).items():
        for_each = body.get("for_each")
        if isinstance(for_each, list):
            pytest.fail(f"{type_name}.{name}: for_each over a literal list; use a map or toset()")


# --- ordering -------------------------------------------------------------------------------


@pytest.mark.parametrize(("file_name", "kind"), [("variables.tf", "variable"), ("outputs.tf", "output")])
def test_blocks_are_alphabetical(parsed: dict[str, dict[str, Any]], file_name: str, kind: str) -> None:
    names = [_unquote(label) for block in parsed[file_name].get(kind, []) for label in block]
    assert names == sorted(names), f"{file_name} is not alphabetical"
    assert all(kind not in tree for other, tree in parsed.items() if other != file_name), (
        f"{kind} blocks belong in {file_name} only"
    )


# --- security rules ------------------------------------------------------------------------


def test_no_primitive_roles(parsed: dict[str, dict[str, Any]]) -> None:
    text = _all_expressions(parsed)
    for role in PRIMITIVE_ROLES:
        assert re.search(rf"{re.escape(role)}\b", text) is None, f"{role} is granted somewhere"


def test_no_public_members(parsed: dict[str, dict[str, Any]]) -> None:
    text = "\n".join(path.read_text() for path in TERRAFORM_DIR.rglob("*.tf*"))
    for member in PUBLIC_MEMBERS:
        assert member not in text, f"{member} appears in infra/terraform"


# A filtered copy of another resource's grants: {for who, grant in <grants> : who => grant if ...}.
FILTERED_GRANTS = r"\{for [a-z_]+, grant in (google_[a-z0-9_]+_iam_member)\.([a-z_]+) : [a-z_]+ => grant if "


def _assert_local_members_are_service_accounts(
    parsed: dict[str, dict[str, Any]], resource: str, local_name: str
) -> None:
    """A grant per (member, something) pair built in a local: every member it can hold
    is one of this deployment's service accounts, named in that local or in the locals
    it draws its members from."""
    locals_ = {key: value for _, block in _blocks(parsed, "locals") for key, value in block.items()}
    pending, seen, granted_all = [local_name], set(), []
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        text = str(locals_[name])
        # Entries that are objects name their account as `member = ...`; plain maps map
        # a name straight to it.
        granted_all += re.findall(r"\bmember = ([^\n,}()]+)", text)
        granted_all += [
            granted
            for granted in re.findall(r"(?:=>|[a-z_]+ =) ([^\n,}()]+)", text)
            if granted.strip().startswith("google_service_account.")
        ]
        pending += [
            other for other in re.findall(r"\blocal\.([a-z_]+)", text) if "member" in str(locals_[other])
        ]
    granted_all = [
        granted for granted in granted_all if not granted.strip().startswith(("each.", "enqueuer."))
    ]
    assert len(granted_all) >= 2, f"{resource}: no members found in local.{local_name}"
    for granted in granted_all:
        assert re.fullmatch(r"google_service_account\.[a-z_]+(\[[a-z0-9_]+\])?\.member", granted.strip()), (
            f"{resource} grants to {granted}, not to this deployment's service accounts"
        )


def test_iam_members_are_service_accounts(parsed: dict[str, dict[str, Any]]) -> None:
    for (type_name, name), body in _resources(parsed).items():
        if type_name.endswith("_iam_member"):
            member = str(body["member"])
            if member == "${each.value}":
                members = re.findall(r"= ([^\n,}]+)", str(body["for_each"]))
                assert members, f"{type_name}.{name}: no members found in its for_each"
                for granted in members:
                    assert re.fullmatch(
                        r"google_service_account\.[a-z_]+(\[0\])?\.member", granted.strip()
                    ), f"{type_name}.{name} grants to {granted}, not to this deployment's service accounts"
                continue
            members_local = re.fullmatch(r"\$\{local\.([a-z_]+)\[each\.value\.who\]\}", member)
            if members_local:
                # The member is looked up by name in a local that maps names to accounts.
                _assert_local_members_are_service_accounts(
                    parsed, f"{type_name}.{name}", members_local.group(1)
                )
                continue
            local_source = re.fullmatch(r"\$\{local\.([a-z_]+)\}", str(body.get("for_each", "")))
            if member == "${each.value.member}" and local_source:
                _assert_local_members_are_service_accounts(
                    parsed, f"{type_name}.{name}", local_source.group(1)
                )
                continue
            if member == "${each.value.member}":
                # One grant per grant of another IAM resource, whose members this test checks.
                source = re.search(
                    r"\b(google_[a-z0-9_]+_iam_member)\.([a-z_]+)\b(?: : \{\})?\}$", str(body["for_each"])
                ) or re.search(
                    FILTERED_GRANTS,
                    str(body["for_each"]),
                )
                assert source, f"{type_name}.{name}: for_each must be another grant"
                assert (source.group(1), source.group(2)) in _resources(parsed)
                continue
            assert re.fullmatch(r"\$\{google_service_account\.[a-z_]+(\[[^\]]+\])?\.member\}", member), (
                f"{type_name}.{name} grants to {member}, not to one of this deployment's service accounts"
            )


def test_buckets_are_uniform_and_private(parsed: dict[str, dict[str, Any]]) -> None:
    buckets = {key: body for key, body in _resources(parsed).items() if key[0] == "google_storage_bucket"}
    assert {name for _, name in buckets} >= {"results", "sources"}
    for (_, name), body in buckets.items():
        assert body.get("uniform_bucket_level_access") is True, f"bucket {name}: uniform access off"
        prevention = _unquote(str(body.get("public_access_prevention", "")))
        assert prevention == "enforced" or prevention.startswith("${var."), (
            f"bucket {name}: public_access_prevention must be enforced unless a variable asks otherwise"
        )


def test_results_bucket_expires_results_and_has_no_versioning(parsed: dict[str, dict[str, Any]]) -> None:
    results = _resources(parsed)[("google_storage_bucket", "results")]
    assert results["versioning"][0]["enabled"] is False
    rule = results["lifecycle_rule"][0]
    assert rule["condition"][0]["age"] == "${var.result_retention_days}"
    assert _unquote(rule["action"][0]["type"]) == "Delete"
    assert "var.public_results" in str(results["public_access_prevention"])


def test_outputs_expose_no_secret(parsed: dict[str, dict[str, Any]]) -> None:
    for name, body in _labelled(parsed, "output").items():
        value = json.dumps(body.get("value"))
        assert body.get("sensitive") is not True, f"output {name} is sensitive: secrets stay out of outputs"
        for marker in ("secret_data", "key_string", "secret_values", "google_secret_manager_secret_version"):
            assert marker not in value, f"output {name} exposes {marker}"


def test_secrets_are_resources_only(parsed: dict[str, dict[str, Any]]) -> None:
    locals_block = next(block for _, block in _blocks(parsed, "locals") if "secrets" in block)
    secrets = {_unquote(key) for key in locals_block["secrets"]}
    assert {"r2-access-key", "r2-secret-key", "cf-images-api-token", "webhook-signing-secret"} <= secrets
    versions = [key for key in _resources(parsed) if key[0] == "google_secret_manager_secret_version"]
    for key in versions:
        data = str(_resources(parsed)[key]["secret_data"])
        assert "var.secret_values" in data or "key_string" in data, (
            f"{key}: secret data from an unexpected source"
        )


# --- component wiring --------------------------------------------------------------------


def test_functions_are_python311_with_the_settings_env(parsed: dict[str, dict[str, Any]]) -> None:
    function = _resources(parsed)[("google_cloudfunctions2_function", "api")]
    build = function["build_config"][0]
    assert _unquote(build["runtime"]) == "python311"
    assert build["entry_point"] == "${each.key}"
    source_object = _resources(parsed)[("google_storage_bucket_object", "function_source")]
    assert "output_md5" in source_object["name"], "function zips must be named by their md5"

    locals_text = "\n".join(_walk_strings([block for _, block in _blocks(parsed, "locals")]))
    for env_name in (
        "TASK_STORE", "DISPATCH_MODE", "GOOGLE_CLOUD_PROJECT", "CLOUD_TASKS_QUEUE", "CLOUD_TASKS_LOCATION",
        "CLOUD_TASKS_INVOKER_EMAIL", "RUNNER_URL", "STORAGE_PROVIDER", "STORAGE_FALLBACK", "GCS_BUCKET_NAME",
        "API_KEYS", "ENGINE_SLOTS", "TASK_API_URL", "RUNNER_OIDC_AUDIENCE",
    ):  # fmt: skip
        assert re.search(rf"\b{env_name}\b", locals_text), f"{env_name} is never set"


def test_env_names_are_settings_names(parsed: dict[str, dict[str, Any]]) -> None:
    """Every env var Terraform sets is one shared/settings.py reads (or a planned one)."""
    settings_source = (REPO_ROOT / "shared" / "settings.py").read_text()
    known = {name.upper() for name in re.findall(r"^    ([a-z0-9_]+): ", settings_source, flags=re.MULTILINE)}
    # THREADS: functions-framework's gunicorn threads (functions_framework/_http/gunicorn.py).
    known |= {"GOOGLE_CLOUD_PROJECT", "THREADS"}
    planned: set[str] = set()
    locals_blocks = [block for _, block in _blocks(parsed, "locals")]
    env_maps = [
        block[name]
        for block in locals_blocks
        for name in block
        if name.endswith("_env") and name != "runner_secret_env" and name != "function_secret_env"
    ]
    env_names = {key for env_map in env_maps if isinstance(env_map, dict) for key in env_map}
    secret_envs = {
        _unquote(secret["env"])
        for block in locals_blocks
        if "secrets" in block
        for secret in block["secrets"].values()
    }
    unknown = (env_names | secret_envs) - known - planned
    assert unknown == set(), f"env vars no setting reads: {sorted(unknown)}"


def test_runner_is_a_gpu_service_with_no_cpu_throttling(parsed: dict[str, dict[str, Any]]) -> None:
    runner = _resources(parsed)[("google_cloud_run_v2_service", "runner")]
    template = runner["template"][0]
    # One service per runner pool, each with its pool's GPU (var.gpu_type by default).
    assert runner["for_each"] == "${local.push_mode ? local.runner_pools : {}}"
    assert template["node_selector"][0]["accelerator"] == "${each.value.gpu_type}"
    assert "gpu_zonal_redundancy_disabled" in template
    assert template["max_instance_request_concurrency"] == "${var.engine_slots}"
    container = template["containers"][0]
    resources = container["resources"][0]
    assert resources["cpu_idle"] is False
    assert any("nvidia.com/gpu" in key for key in resources["limits"])
    probe = container["startup_probe"][0]["http_get"][0]
    assert _unquote(probe["path"]) == "/api/health"
    assert container["volume_mounts"][0]["mount_path"] == '"/models"'
    assert "gcs" in template["volumes"][0]
    assert "3600" in json.dumps(runner) or "var.runner.timeout_s" in template["timeout"]


def test_vm_runner_has_a_gpu_and_terminates_on_maintenance(parsed: dict[str, dict[str, Any]]) -> None:
    vm = _resources(parsed)[("google_compute_instance", "runner")]
    # Each VM carries its pool's GPU (var.gpu_type unless the pool names one).
    assert vm["guest_accelerator"][0]["type"] == "${local.runner_pools[each.value.pool].gpu_type}"
    assert _unquote(vm["scheduling"][0]["on_host_maintenance"]) == "TERMINATE"
    startup = (TERRAFORM_DIR / "templates" / "runner_vm_startup.sh.tftpl").read_text()
    assert "docker run" in startup
    assert "--env-file" in startup
    locals_text = "\n".join(_walk_strings([block for _, block in _blocks(parsed, "locals")]))
    assert "TASK_API_URL" in locals_text
    assert '"pull"' in locals_text


def test_queue_concurrency_follows_engine_slots(parsed: dict[str, dict[str, Any]]) -> None:
    queue = _resources(parsed)[("google_cloud_tasks_queue", "runner")]
    assert queue["rate_limits"][0]["max_concurrent_dispatches"] == "${min(each.value.capacity, 5000)}"
    retry = queue["retry_config"][0]
    assert {"max_attempts", "min_backoff", "max_backoff", "max_doublings"} <= set(retry)
    # Each queue's capacity is its share of its pool's slots: engine_slots x the pool's instances.
    queues = next(block for _, block in _blocks(parsed, "locals") if "queues" in block)["queues"]
    assert "var.engine_slots * local.runner_pools[name].max_instances / length(names)" in queues


def test_function_accounts_can_enqueue_and_mint_invoker_tokens(parsed: dict[str, dict[str, Any]]) -> None:
    resources = _resources(parsed)
    assert _unquote(resources[("google_cloud_tasks_queue_iam_member", "enqueuer")]["role"]) == (
        "roles/cloudtasks.enqueuer"
    )
    acts_as = resources[("google_service_account_iam_member", "acts_as_invoker")]
    assert _unquote(acts_as["role"]) == "roles/iam.serviceAccountUser"
    assert "tasks_invoker" in acts_as["service_account_id"]
    invokers = resources[("google_cloud_run_v2_service_iam_member", "runner_invokers")]
    assert invokers["for_each"] == "${local.runner_invoker_grants}"
    locals_text = json.dumps(
        [block for _, block in _blocks(parsed, "locals") if "runner_invoker_members" in block]
    )
    assert "google_service_account.gateway.member" in locals_text
    assert "google_service_account.tasks_invoker[pool].member" in locals_text


def test_monitoring_has_metrics_dashboard_and_alerts(parsed: dict[str, dict[str, Any]]) -> None:
    resources = _resources(parsed)
    metrics = {
        name: body for (type_name, name), body in resources.items() if type_name == "google_logging_metric"
    }
    assert "task_finished" in metrics
    assert 'jsonPayload.event=\\"task_finished\\"' in metrics["task_finished"]["filter"]
    assert set(metrics["task_finished"]["label_extractors"]) == {"outcome", "code", "engine"}
    assert "queue_wait_s" in metrics["queue_wait"]["value_extractor"]
    assert "engine_s" in metrics["engine_time"]["value_extractor"]
    assert ("google_monitoring_dashboard", "comfyswap") in resources
    alerts = {name for (type_name, name) in resources if type_name == "google_monitoring_alert_policy"}
    assert "runner_down" in alerts
    # The threshold alerts are one resource made for_each over their definitions.
    assert (
        resources[("google_monitoring_alert_policy", "threshold")]["for_each"] == "${local.threshold_alerts}"
    )
    threshold_alerts = next(
        block["threshold_alerts"]
        for tree in parsed.values()
        for block in tree.get("locals", [])
        if "threshold_alerts" in block
    )
    assert {"failure_rate", "backlog_age"} <= set(threshold_alerts)
    # ...and the two that were resources of their own keep their state (moved, not re-created).
    moved = {(str(block["from"]), str(block["to"])) for block in parsed["monitoring.tf"].get("moved", [])}
    assert moved == {
        (
            f"${{google_monitoring_alert_policy.{name}}}",
            f'${{google_monitoring_alert_policy.threshold["{name}"]}}',
        )
        for name in ("failure_rate", "backlog_age")
    }


def test_firestore_indexes_match_the_store(parsed: dict[str, dict[str, Any]]) -> None:
    """Terraform's indexes (infra/firestore_indexes.json, else the fallback) = the store's."""
    firestore_module = pytest.importorskip("shared.store.firestore", reason="Firestore store not importable")
    required = getattr(firestore_module, "REQUIRED_INDEXES", None)
    if required is None:
        pytest.skip("shared.store.firestore has no REQUIRED_INDEXES")
    expected = {tuple(spec.fields) for spec in required if spec.collection == "tasks"}

    indexes_file = REPO_ROOT / "infra" / "firestore_indexes.json"
    if indexes_file.exists():
        document = json.loads(indexes_file.read_text())
        actual = {
            tuple((field["fieldPath"], field["order"]) for field in index["fields"])
            for index in document["indexes"]
            if index["collectionGroup"] == "tasks"
        }
    else:
        main_locals = parsed["main.tf"]["locals"][0]
        actual = {
            tuple((_unquote(field), _unquote(order)) for field, order in fields)
            for fields in main_locals["firestore_indexes_fallback"]
        }
    assert actual == expected


# --- gateway -------------------------------------------------------------------------------


def test_openapi_template_routes_are_the_public_routes() -> None:
    document = _render_openapi(OPENAPI_TEMPLATE.read_text())
    assert document["swagger"] == "2.0"
    routes = {
        (method.upper(), path) for path, operations in document["paths"].items() for method in operations
    }
    assert routes == PUBLIC_ROUTES


def test_openapi_operations_reach_a_backend_with_its_own_token() -> None:
    document = _render_openapi(OPENAPI_TEMPLATE.read_text())
    template = OPENAPI_TEMPLATE.read_text()
    assert re.search(
        r"securityDefinitions:\s*\n(?:\s+#.*\n)*\s+api_key:\s*\n\s+type: apiKey\s*\n\s+name: x-api-key",
        template,
    )
    operation_ids = set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            backend = operation["x-google-backend"]
            assert backend["jwt_audience"] == backend["address"], f"{method} {path}"
            assert backend["path_translation"] == "APPEND_PATH_TO_ADDRESS", f"{method} {path}"
            operation_ids.add(operation["operationId"])
            # Open: liveness, and the console's static files (its API calls carry the key).
            if path not in {"/api/health", "/api/openapi.json", "/console", "/console/{asset}"}:
                assert "security" not in operation or operation["security"], f"{method} {path} is open"
    assert len(operation_ids) == len(PUBLIC_ROUTES), "operationIds must be unique"


def test_openapi_backends_match_the_function_routes() -> None:
    """Each function path in the template goes to a function that declares it."""
    template = OPENAPI_TEMPLATE.read_text()
    blocks = re.split(r"\n  (?=/)", template.split("\npaths:\n", 1)[1])
    for block in blocks:
        path = block.split(":", 1)[0].strip()
        backend = re.search(r"address: \$\{([a-z_]+)_url\}", block)
        assert backend, path
        function_main = REPO_ROOT / "functions" / backend.group(1) / "main.py"
        if backend.group(1) == "runner" or not function_main.exists():
            continue
        declared_paths = re.findall(r'Route\("[A-Z]+", "([^"]+)"', function_main.read_text())
        assert path in declared_paths, f"{path} goes to {backend.group(1)}, which does not route it"


def test_function_entry_points_exist() -> None:
    for name in ("create_task", "get_task", "fetch_task"):
        main = REPO_ROOT / "functions" / name / "main.py"
        if not main.exists():
            pytest.skip(f"{main} not written yet")
        assert re.search(rf"@functions_framework\.http\s*\ndef {name}\(", main.read_text()), (
            f"functions/{name}/main.py must define the entry point {name}"
        )


def test_reaper_route_exists_where_the_schedule_calls_it(parsed: dict[str, dict[str, Any]]) -> None:
    reaper = _labelled(parsed, "variable")["reaper"]
    default_target = re.search(
        r'target\s*=\s*optional\(string, "([a-z_]+)"\)', json.dumps(reaper["type"]).replace('\\"', '"')
    )
    default_path = re.search(
        r'path\s*=\s*optional\(string, "([^"]+)"\)', json.dumps(reaper["type"]).replace('\\"', '"')
    )
    assert default_target
    assert default_path
    main = REPO_ROOT / "functions" / default_target.group(1) / "main.py"
    if not main.exists():
        pytest.skip(f"{main} not written yet")
    assert f'Route("POST", "{default_path.group(1)}"' in main.read_text()


# --- tools ---------------------------------------------------------------------------------


def test_terraform_fmt_is_clean() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not on PATH")
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(TERRAFORM_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"terraform fmt would change files:\n{result.stdout}"


def test_checkov_finds_no_failed_check() -> None:
    if not CHECKOV.exists():
        pytest.skip("checkov not installed: run scripts/install_checkov.sh")
    result = subprocess.run(
        [str(CHECKOV), "-d", str(TERRAFORM_DIR), "--skip-download", "--quiet", "--compact", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{check['check_id']} {check['resource']}"
        for entry in reports
        for check in entry.get("results", {}).get("failed_checks", [])
    ]
    passed = sum(entry.get("summary", {}).get("passed", 0) for entry in reports)
    assert failed == [], "checkov failed checks:\n" + "\n".join(failed)
    assert passed > 0, "checkov passed nothing: did it parse the files?"


# --- runner image ----------------------------------------------------------------------------


def _requirement_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_builds_the_runner_image_as_designed() -> None:
    dockerfile = (REPO_ROOT / "gpu_runner" / "Dockerfile").read_text()
    assert re.search(r"nvidia/cuda:12\.[0-9.]+-cudnn-runtime-ubuntu22\.04", dockerfile)
    assert "python3.11" in dockerfile
    assert "requirements/runner.txt" in dockerfile
    assert re.search(r"^ARG COMFYUI_REF=\S+", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^ARG FACEFUSION_VERSION=3\.\d+\.\d+", dockerfile, flags=re.MULTILINE)
    assert "scripts/fetch_models.py" in dockerfile
    assert re.search(r"^USER (?!root)\S+", dockerfile, flags=re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile
    assert "/api/health" in dockerfile
    assert 'ENTRYPOINT ["python", "-m", "gpu_runner.supervisor"]' in dockerfile
    assert len(re.findall(r"^FROM ", dockerfile, flags=re.MULTILINE)) >= 2, "multi-stage build"
    # Every file the build copies is in the build context (.dockerignore keeps it).
    ignored = _requirement_lines((REPO_ROOT / ".dockerignore").read_text())
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, flags=re.MULTILINE):
        for path in source.split():
            assert (REPO_ROOT / path).exists(), f"COPY {path}: no such file"
            assert path.rstrip("/") not in ignored, f"COPY {path}: excluded by .dockerignore"
