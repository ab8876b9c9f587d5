"""The real-peer tier: the runner against the real ComfyUI and the real FaceFusion.

Each test module declares its peer with ``pytestmark = pytest.mark.real_peer("comfyui")``
(or ``"facefusion"``) and asks for it with ``require_peer``. A missing peer is a skip with
the reason locally, and a failure where the tier is required (``REAL_PEERS_REQUIRED=1``,
which `.ci/run` sets, or ``CI`` set): `.ci/run` installs both with `make peers`, so a
missing one there is a broken install, never a reason to pass.

The summary line at the end of the session says how many tests ran against each real
peer: ``real peers: comfyui 20 passed, facefusion 9 passed, 0 skipped``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.peers import comfyui_peer
from tests.servers import ServerProcess, wait_until

PEERS = ("comfyui", "facefusion")
_peer_of: dict[str, str] = {}
_outcomes: dict[str, collections.Counter[str]] = {peer: collections.Counter() for peer in PEERS}


def in_ci() -> bool:
    def truthy(name: str) -> bool:
        return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")

    return truthy("REAL_PEERS_REQUIRED") or truthy("CI")


def require_peer(installed: bool, reason: str) -> None:
    """Skip (locally) or fail (in CI) when the peer is not installed."""
    if installed:
        return
    if in_ci():
        pytest.fail(f"{reason}; CI must run the real-peer tier, not skip it", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("real_peer")
        if marker is not None and marker.args:
            _peer_of[item.nodeid] = str(marker.args[0])


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    peer = _peer_of.get(report.nodeid)
    if peer is None:
        return
    counts = _outcomes.setdefault(peer, collections.Counter())
    if report.skipped:
        counts["skipped"] += 1
    elif report.failed:
        counts["failed"] += 1
    elif report.when == "call" and report.passed:
        counts["passed"] += 1


def summary_line() -> str:
    parts = []
    for peer, counts in _outcomes.items():
        part = f"{peer} {counts['passed']} passed"
        if counts["failed"]:
            part += f" ({counts['failed']} failed)"
        parts.append(part)
    skipped = sum(counts["skipped"] for counts in _outcomes.values())
    return f"real peers: {', '.join(parts)}, {skipped} skipped"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _peer_of:
        return
    terminalreporter.write_line(summary_line())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A skip can also come from inside a test (pytest.skip); in CI none is acceptable.
    skipped = sum(counts["skipped"] for counts in _outcomes.values())
    if in_ci() and skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- the real ComfyUI ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RealComfyUI:
    server: ServerProcess
    base_dir: Path  # input/, output/, temp/, models/ of this ComfyUI

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"


@pytest.fixture(scope="session")
def real_comfyui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealComfyUI]:
    """The real ComfyUI, started once per session on 127.0.0.1 (12-40 s to get ready)."""
    require_peer(comfyui_peer.installed(), comfyui_peer.missing_reason())
    base_dir = tmp_path_factory.mktemp("comfyui-real")
    server = comfyui_peer.start_real_comfyui(base_dir)
    yield RealComfyUI(server, base_dir)
    server.stop()


@pytest.fixture
def comfyui_idle(real_comfyui: RealComfyUI) -> RealComfyUI:
    """The session's ComfyUI with an empty queue (a test's leftovers must not slow the next)."""
    httpx.post(real_comfyui.url + "/queue", json={"clear": True}, timeout=10)
    httpx.post(real_comfyui.url + "/interrupt", timeout=10)
    wait_until(
        lambda: not httpx.get(real_comfyui.url + "/queue", timeout=10).json()["queue_running"],
        timeout_s=60,
        what="the real ComfyUI's queue to empty",
    )
    return real_comfyui
