"""The console's browser tests: a real headless Chromium (Debian's package) driven by
Selenium, against the embedded stack (dev server + runner as subprocesses) with API keys.

Chromium and chromedriver come from Debian (scripts/install_browser.sh, run by
`make install`); both paths are given, so Selenium Manager never looks for a browser.
Screenshots of each step go to build/console/ (git-ignored).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfyswap.samples import ASTRONAUT_PNG, GRACE_HOPPER_JPG
from shared.auth import hash_api_key
from tests.e2e.conftest import Stack, start_stack
from tests.faceswap.media import write_clip

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "build" / "console"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# No GPU, no sandbox (root in a container), and nothing that phones home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

KEYS = {
    "client": "csk_console_test_client_key",
    "admin": "csk_console_test_admin_key",
    "runner": "csk_console_test_runner_key",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    skip = pytest.mark.skip(
        reason="Debian's chromium and chromium-driver are not installed (bash scripts/install_browser.sh)"
    )
    for item in items:
        if "tests/console/" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    entries = ",".join(
        [
            f"{hash_api_key(KEYS['client'])}:alice:client",
            f"{hash_api_key(KEYS['admin'])}:operator:admin",
            f"{hash_api_key(KEYS['runner'])}:runner-fleet:runner",
        ]
    )
    with start_stack(
        tmp_path_factory.mktemp("console-stack"),
        {
            "API_KEYS": entries,
            "RUNNER_API_KEY": KEYS["runner"],
            "RATE_LIMIT_BURST": "100000",
            # The 400-frame clip swaps in ~6 s on a quiet machine: progress every 0.5 s
            # shows mid-video in the page well before it ends.
            "PROGRESS_INTERVAL_S": "0.5",
        },
    ) as running:
        yield running


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`make run` as it comes: no API_KEYS, the API open to whoever reaches 127.0.0.1."""
    with start_stack(tmp_path_factory.mktemp("console-open-stack")) as running:
        yield running


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The files `make demo` swaps (what a person picks from disk), a clip of the
    astronaut long enough to cancel mid-swap and a short one to watch."""
    folder = tmp_path_factory.mktemp("console-media")
    clip, short_clip = folder / "astronaut.mp4", folder / "astronaut-short.mp4"
    # Long enough that a cancel lands mid-swap on a quiet machine too (progress is written every 2 s).
    write_clip(clip, frame_count=400, size=256, audio_codec=None)
    write_clip(short_clip, frame_count=12, size=256)
    return {"source": GRACE_HOPPER_JPG, "target": ASTRONAUT_PNG, "clip": clip, "short_clip": short_clip}


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1100,1000"):
        options.add_argument(flag)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(profile.parent / "chromedriver.log"))
    browser = webdriver.Chrome(service=service, options=options)
    browser.set_page_load_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
