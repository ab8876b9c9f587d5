"""Each function's bundle (make bundle) imports on its own and serves a request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, sys
from functions_framework import create_app
app = create_app(target=sys.argv[1], source="main.py")
import shared
client = app.test_client()
response = client.get("/api/health")
print(json.dumps({"status": response.status_code, "body": response.get_json(), "shared": shared.__file__}))
"""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bundle_functions.py"), "--out", str(out)], check=True
    )
    return out


@pytest.mark.parametrize("name", ["create_task", "get_task", "fetch_task"])
def test_bundle_imports_its_own_shared_copy_and_answers(bundles, name, tmp_path):
    folder = bundles / name
    assert (folder / "shared" / "service.py").is_file() and (folder / "requirements.txt").is_file()

    result = subprocess.run(
        [sys.executable, "-c", PROBE, name],
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer = json.loads(result.stdout.strip().splitlines()[-1])

    assert answer["status"] == 200 and answer["body"]["status"] == "healthy"
    assert Path(answer["shared"]).resolve().is_relative_to(folder.resolve()), answer["shared"]


def test_bundle_requirements_pin_what_the_shared_code_imports(bundles):
    requirements = (bundles / "create_task" / "requirements.txt").read_text()
    for package in (
        "functions-framework",
        "google-cloud-firestore",
        "google-cloud-tasks",
        "pydantic-settings",
        "httpx",
    ):
        assert package in requirements


CONSOLE_PROBE = """
import json, sys
from functions_framework import create_app
client = create_app(target="get_task", source="main.py").test_client()
answers = {path: client.get(path) for path in ("/console", "/console/console.js", "/console/console.css")}
print(json.dumps({path: [r.status_code, len(r.data), r.content_type] for path, r in answers.items()}))
"""


def test_get_task_bundle_ships_and_serves_the_console(bundles, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", CONSOLE_PROBE],
        cwd=bundles / "get_task",
        env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answers = json.loads(result.stdout.strip().splitlines()[-1])

    for path, (status, size, _) in answers.items():
        assert status == 200 and size > 500, (path, status, size)
    assert answers["/console"][2].startswith("text/html")
    assert (bundles / "get_task" / "shared" / "console" / "console.js").is_file()
