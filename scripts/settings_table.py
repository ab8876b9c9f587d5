"""Print the README's settings table from shared.settings.Settings (one source of truth).

Usage: python scripts/settings_table.py [--write]   (--write updates README.md in place;
tests/unit/test_docs.py checks the README holds the current table)
"""

from __future__ import annotations

import sys
from pathlib import Path

from shared.settings import Settings

START, END = "<!-- settings:start -->", "<!-- settings:end -->"


# Sections of the README table, by what a setting is about: the first section with a rule
# the name starts with wins; a setting that fits none is listed under OTHER.
OTHER = "Other"
SECTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("Service and local run", ("app_env", "log_level", "task_api_url", "api_host", "api_port", "data_dir")),
    (
        "Task store, dispatch and the reaper",
        (
            "task_store",
            "firestore_",
            "dispatch_mode",
            "pull_source",
            "cloud_tasks_",
            "google_cloud_project",
            "lease_seconds",
            "max_attempts",
            "task_retention_days",
            "reaper_",
            "runner_oidc_audience",
            "google_oidc_certs_url",
            "cloud_run_invoker_iam",
            "k_service",
        ),
    ),
    ("Runner", ("runner_", "shutdown_grace_s", "progress_interval_s", "engine_slots", "task_timeout_s")),
    ("ComfyUI", ("comfyui_",)),
    ("Face swap (CPU engine, FaceFusion)", ("face_swap_", "facefusion_")),
    (
        "Storage of results",
        (
            "storage_",
            "gcs_",
            "inputs_bucket",
            "google_application_credentials",
            "r2_",
            "cf_images_",
            "local_storage_base_url",
            "signed_url",
            "result_url_secret",
            "orphan_sweep_",
        ),
    ),
    ("Inputs and limits", ("fetch_", "max_")),
    ("Access: keys, rate limits, webhooks", ("api_keys", "rate_limit_", "webhook_")),
]


def section_of(name: str) -> str:
    for title, rules in SECTIONS:
        if any(name.startswith(rule) for rule in rules):
            return title
    return OTHER


def _shown(default: object) -> str:
    if default in (None, "", ()):
        return "(empty)"
    if isinstance(default, tuple):
        return f"`{','.join(str(item) for item in default)}`"
    return f"`{default}`"


def settings_table() -> str:
    rows: dict[str, list[str]] = {title: [] for title, _ in [*SECTIONS, (OTHER, ())]}
    for name, field in Settings.model_fields.items():
        env, _, meaning = (field.description or "").partition(": ")
        rows[section_of(name)].append(f"| `{env}` | {_shown(field.default)} | {meaning} |")
    parts = []
    for title, lines in rows.items():
        if lines:
            parts += [f"**{title}**", "", "| variable | default | meaning |", "|---|---|---|", *lines, ""]
    return "\n".join(parts).rstrip("\n")


def write_readme(readme: Path) -> None:
    text = readme.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:start] + "\n" + settings_table() + "\n" + text[end:])


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_readme(Path(__file__).resolve().parent.parent / "README.md")
    else:
        print(settings_table())
