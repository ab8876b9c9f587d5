"""`make run` then http://127.0.0.1:8080/console: no key to paste, a swap from two files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.console.test_console_browser import SWAP_TIMEOUT_S, ConsolePage
from tests.e2e.conftest import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_open_local_api_needs_no_key_and_swaps_two_files(
    driver: Any, open_stack: Stack, screenshots: Path, photos: dict[str, Path]
) -> None:
    driver.set_window_size(1100, 1000)
    page = ConsolePage(driver, open_stack, screenshots)

    page.open(signed_out=False)

    page.wait(page.signed_in, "the task list without a key")
    assert "open mode" in page.find("#notice").text
    assert page.find("#nav-admin").is_displayed(), "the open local API is its own admin"
    task_id = page.submit_swap(photos["source"], photos["target"])
    page.wait(lambda: page.badge(task_id) == "COMPLETED", "the swap to complete", SWAP_TIMEOUT_S)
    image = page.wait(lambda: page.card(task_id).find_element("css selector", "img.result"), "the result")
    page.wait(lambda: page.image_loaded(image), "the result image to load")
    page.shot("11-open-mode-swap")
    assert page.driver.execute_script("return sessionStorage.getItem('comfyswap.apiKey')") == ""
