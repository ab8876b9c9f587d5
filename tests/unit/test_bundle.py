"""Each function's bundle (make bundle), installed from its own requirements.txt into a clean
virtualenv, serves real requests through functions-framework.

The dev venv has every extra installed, so a bundle test run there would pass even when a
function's requirements.txt missed a package. Here each bundle gets a venv of its own,
made with nothing but ``pip install --require-hashes -r requirements.txt`` (pip's cache
makes that quick). The venv is kept under build/bundle-venvs/, named by the digest of the
requirements it was built from, and reused while they are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import ServerProcess, free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / "build" / "bundle-venvs"
FUNCTIONS = ("create_task", "get_task", "fetch_task")

pytestmark = pytest.mark.slow

PROBE = """
import importlib.util, json, sys
import main, shared
print(json.dumps({
    "shared": shared.__file__,
    "absent": [name for name in sys.argv[1:] if importlib.util.find_spec(name) is not None],
}))
"""
# Packages of other components: a function bundle that could import one carries too much.
NOT_IN_A_FUNCTION = ["psutil", "rich", "numpy", "cv2", "av", "websockets"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bundle_functions.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


def bundle_venv(requirements: Path) -> Path:
    """A venv with exactly these requirements installed (built once per distinct file)."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    venv = VENVS / digest
    if (venv / ".complete").is_file():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--require-hashes",
            "-r",
            str(requirements),
        ],
        check=True,
        timeout=600,
    )
    (venv / ".complete").write_text(requirements.read_text())
    return venv


@pytest.fixture(scope="module", params=FUNCTIONS)
def served(
    request, bundles: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, str]]:
    """(function name, bundle folder, base URL) of the bundle served by functions-framework."""
    name = request.param
    folder = bundles / name
    venv = bundle_venv(folder / "requirements.txt")
    data_dir = tmp_path_factory.mktemp(f"{name}-data")
    port = free_port()
    server: ServerProcess = start_server(
        name,
        [
            str(venv / "bin" / "functions-framework"),
            f"--target={name}",
            "--source=main.py",
            "--host=127.0.0.1",
            f"--port={port}",
        ],
        url=f"http://127.0.0.1:{port}",
        log_dir=data_dir / "logs",
        env={"DATA_DIR": str(data_dir), "PYTHONPATH": "", "PATH": f"{venv / 'bin'}:/usr/bin:/bin"},
        health_path="/api/health",
        timeout_s=60,
        cwd=folder,
    )
    try:
        yield name, folder, server.url
    finally:
        server.stop()


def test_bundle_imports_its_own_shared_copy_and_nothing_of_other_components(served):
    name, folder, _ = served
    venv = bundle_venv(folder / "requirements.txt")

    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", PROBE, *NOT_IN_A_FUNCTION],
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(folder / ".data"), "HOME": str(folder)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer = json.loads(result.stdout.strip().splitlines()[-1])

    assert Path(answer["shared"]).resolve().is_relative_to(folder.resolve()), answer["shared"]
    assert answer["absent"] == [], f"{name}'s venv can import {answer['absent']}"


def test_bundle_answers_its_routes_through_functions_framework(served):
    name, _, url = served
    with httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/api/health")
        assert health.status_code == 200 and health.json()["status"] == "healthy"

        if name == "create_task":
            task_data = {
                "source_url": "https://example.com/face.jpg",
                "target_url": "https://example.com/t.jpg",
            }
            created = client.post("/api/tasks/create", json={"workflow": "face_swap", "task_data": task_data})
            assert created.status_code == 200 and created.json()["taskId"].startswith("task_"), created.text
            refused = client.post("/api/tasks/create", json={"workflow": "face_swap", "task_data": {}})
            assert refused.status_code == 400 and "source_url" in refused.text, refused.text
        elif name == "get_task":
            response = client.get("/api/tasks/task_doesnotexist")
            assert response.status_code == 404, response.text
            # The bundle ships and serves the web console (shared/console).
            for path in ("/console", "/console/console.js", "/console/console.css"):
                asset = client.get(path)
                assert asset.status_code == 200 and len(asset.content) > 500, (path, asset.status_code)
            assert client.get("/console").headers["content-type"].startswith("text/html")
        else:
            response = client.get("/api/comm/task/fetch", params={"worker_id": "bundle-test"})
            assert response.status_code in (200, 204), response.text
