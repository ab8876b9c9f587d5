"""The web console in a real browser: what a person does with it, step by step.

Each test opens the page afresh (sessionStorage cleared) and signs in itself; every
step leaves a screenshot in build/console/.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.console.conftest import KEYS
from tests.e2e.conftest import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SWAP_TIMEOUT_S = 120.0


def _data_url(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


class ConsolePage:
    """The console as the tests drive it: by the labels and buttons a person sees."""

    def __init__(self, driver: Any, stack: Stack, screenshots: Path) -> None:
        self.driver = driver
        self.stack = stack
        self.screenshots = screenshots

    def open(self, *, signed_out: bool = True) -> None:
        # Forget the tab's key on another page of the same origin: the console itself would
        # sign in with it while it loads (and write it back).
        self.driver.get(f"{self.stack.api.url}/api/health")
        self.driver.execute_script("sessionStorage.clear()")
        self.driver.get(f"{self.stack.api.url}/console")
        if signed_out:
            self.wait(lambda: self.find("#signin-form").is_displayed(), "the sign-in form")

    def find(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def find_all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def wait(self, condition: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        def check(_: Any) -> Any:
            try:
                return condition()
            except (StaleElementReferenceException, WebDriverException):
                return False

        try:
            return WebDriverWait(self.driver, timeout_s, poll_frequency=0.2).until(check)
        except Exception:
            self.shot(f"timeout-{what.replace(' ', '-')[:40]}")
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for {what}; page says: "
                f"{self.find('main').text[:2000]}\nrunner log: {self.stack.runner.log()[-2000:]}"
            ) from None

    def image_loaded(self, image: Any) -> bool:
        return bool(
            self.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
        )

    def shot(self, name: str) -> Path:
        path = self.screenshots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def sign_in(self, key: str) -> None:
        from selenium.webdriver.common.keys import Keys

        field = self.find("#api-key")
        field.clear()
        field.send_keys(key, Keys.ENTER)  # the keyboard, as a person would

    def signed_in(self) -> bool:
        return bool(self.find("#nav").is_displayed() and self.find("#view-tasks").is_displayed())

    def go(self, view: str) -> None:
        self.find(f'#nav [data-view="{view}"]').click()
        self.wait(lambda: self.find(f"#view-{view}").is_displayed(), f"the {view} view")

    def submit_swap(self, source: Path, target: Path) -> str:
        """Choose two files from disk and submit; returns the new task's id."""
        self.go("swap")
        before = {card.get_attribute("id") for card in self.find_all("#task-list > li")}
        self.find("#source-file").send_keys(str(source))
        self.find("#target-file").send_keys(str(target))
        self.wait(lambda: "KB" in self.find("#drop-target .dropzone span").text, "the target file's name")
        self.find("#swap-resolution").clear()
        self.find("#swap-resolution").send_keys("512x512")
        self.find("#swap-form button[type=submit]").click()
        self.wait(lambda: self.find("#view-tasks").is_displayed(), "the task list after submitting")
        card = self.wait(
            lambda: next(
                (c for c in self.find_all("#task-list > li") if c.get_attribute("id") not in before), None
            ),
            "the new task's card",
        )
        return str(card.get_attribute("id")).removeprefix("task-")

    def card(self, task_id: str) -> Any:
        return self.find(f"#task-{task_id}")

    def badge(self, task_id: str) -> str:
        return str(self.card(task_id).find_element("css selector", ".badge").text)


@pytest.fixture
def page(driver: Any, stack: Stack, screenshots: Path) -> ConsolePage:
    driver.set_window_size(1100, 1000)
    console = ConsolePage(driver, stack, screenshots)
    console.open()
    return console


def test_a_wrong_key_is_refused_with_a_clear_message(page: ConsolePage) -> None:
    page.shot("01-sign-in")

    page.sign_in("csk_not_a_key_anyone_issued")

    message = page.wait(lambda: page.find("#signin-error").text, "the refusal message")
    page.shot("02-wrong-key-refused")
    assert "refused" in message and "unknown or was revoked" in message, message
    assert not page.find("#nav").is_displayed()
    assert page.driver.execute_script("return sessionStorage.length") == 0


def test_swap_from_two_files_shows_the_result_image(page: ConsolePage, photos: dict[str, Path]) -> None:
    page.sign_in(KEYS["client"])
    page.wait(page.signed_in, "the signed-in task list")
    assert not page.find("#nav-admin").is_displayed(), "a client key must not see the admin view"

    page.go("swap")
    page.find("#source-file").send_keys(str(photos["source"]))
    page.find("#target-file").send_keys(str(photos["target"]))
    page.wait(
        lambda: (page.find("#drop-source img.preview").get_attribute("src") or "").startswith("blob:"),
        "the face photo's preview",
    )
    page.shot("03-swap-form-with-two-files")
    models = [option.get_attribute("value") for option in page.find_all("#swap-model option")]
    assert models[0] == "inswapper_128_fp16" and len(models) > 1, models  # the engine's, from the runner
    task_id = page.submit_swap(photos["source"], photos["target"])

    page.wait(lambda: page.badge(task_id) == "COMPLETED", "the swap to complete", SWAP_TIMEOUT_S)
    image = page.wait(
        lambda: page.card(task_id).find_element("css selector", "img.result"), "the result image"
    )
    page.wait(
        lambda: page.driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", image
        ),
        "the result image to load",
    )
    page.driver.execute_script("arguments[0].scrollIntoView()", page.card(task_id))
    page.shot("04-swap-result")

    assert page.driver.execute_script("return arguments[0].naturalWidth", image) == 512
    download = page.card(task_id).find_element("css selector", "figcaption a")
    assert download.get_attribute("download").startswith(task_id)
    assert download.get_attribute("href").startswith("blob:"), "a result on this host is fetched with the key"
    timings = page.card(task_id).find_element("css selector", "dl").text
    assert "engine" in timings and "total" in timings, timings
    assert (
        page.stack.client.get(f"/api/tasks/{task_id}", headers={"X-API-Key": KEYS["client"]}).json()["status"]
        == "COMPLETED"
    )

    # Nothing of the faces is kept past the tab: no storage but the key, and signing out
    # revokes the result's object URL.
    stored = page.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "indexedDB.databases().then(dbs => done({local: localStorage.length, idb: dbs.length,"
        " session: Object.keys(sessionStorage)}));"
    )
    assert stored == {"local": 0, "idb": 0, "session": ["comfyswap.apiKey"]}
    blob_url = image.get_attribute("src")
    page.find("#sign-out").click()
    revoked = page.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(() => done('readable'), () => done('revoked'));",
        blob_url,
    )
    assert revoked == "revoked"


def test_progress_shows_and_a_running_task_can_be_cancelled(
    page: ConsolePage, photos: dict[str, Path]
) -> None:
    page.sign_in(KEYS["client"])
    page.wait(page.signed_in, "the signed-in task list")

    task_id = page.submit_swap(photos["source"], photos["clip"])

    def mid_video() -> bool:
        bar = page.card(task_id).find_element("css selector", "progress")
        return page.badge(task_id) == "PROCESSING" and float(bar.get_attribute("value") or 0) > 0

    page.wait(mid_video, "the video swap to show progress", SWAP_TIMEOUT_S)
    stage = page.card(task_id).find_element("css selector", ".stage").text
    page.shot("05-progress")
    assert stage.startswith("Stage:") and " of " in stage, stage

    # With the keyboard (Enter on the focused button); the card re-renders as progress moves,
    # so a stale button is looked up again.
    page.wait(
        lambda: page.card(task_id).find_element("css selector", "button.cancel").send_keys("\n") or True,
        "the cancel button to take Enter",
    )
    page.wait(lambda: page.badge(task_id) == "CANCELLED", "the task to show CANCELLED")
    page.shot("06-cancelled")

    view = page.stack.client.get(f"/api/tasks/{task_id}", headers={"X-API-Key": KEYS["client"]}).json()
    assert view["status"] == "CANCELLED"
    assert not page.card(task_id).find_elements("css selector", "button.cancel")


def test_admin_sees_the_queue_runners_and_engines(page: ConsolePage, photos: dict[str, Path]) -> None:
    # One failure in the last hour: a template task on a stack without ComfyUI.
    failing = page.stack.client.post(
        "/api/tasks/create",
        json={"workflow": "invert_image", "task_data": {"image_url": _data_url(photos["target"])}},
        headers={"X-API-Key": KEYS["client"]},
    ).json()["taskId"]
    ended = page.stack.client.get(
        f"/api/tasks/{failing}", params={"wait": 20}, headers={"X-API-Key": KEYS["client"]}
    ).json()
    assert ended["status"] == "FAILED", ended
    page.sign_in(KEYS["admin"])
    page.wait(page.signed_in, "the signed-in task list")
    page.wait(lambda: page.find("#nav-admin").is_displayed(), "the admin tab")

    page.go("admin")
    page.wait(lambda: page.find("#fig-queue").text.isdigit(), "the queue length")
    page.wait(lambda: page.find("#engines table"), "the engine health table")
    page.shot("07-admin")

    stats = page.stack.client.get("/api/admin/stats", headers={"X-API-Key": KEYS["admin"]}).json()
    assert page.find("#fig-queue").text == str(stats["queue"]["queue_length"])
    finished = stats["last_hour"]["finished"]
    assert page.find("#fig-finished").text.startswith(f"{finished['completed']} done")
    assert page.find("#chart-throughput svg").get_attribute("role") == "img"
    assert len(page.find_all("#chart-throughput svg rect")) >= 1
    failures = page.find("#chart-failures svg").get_attribute("aria-label")
    code = ended["error"]["code"]
    assert f"{code}: {stats['last_hour']['failures_by_code'][code]}" in failures, failures
    engines = page.find("#engines").text
    assert "face_swap" in engines and "available" in engines and "local" in engines, engines


def test_admin_route_refuses_a_client_key(stack: Stack) -> None:
    answer = stack.client.get("/api/admin/stats", headers={"X-API-Key": KEYS["client"]})

    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "admin_required"


def test_the_console_fits_a_phone_screen(page: ConsolePage) -> None:
    page.driver.set_window_size(390, 844)
    page.sign_in(KEYS["client"])
    page.wait(page.signed_in, "the signed-in task list")
    page.go("swap")
    page.shot("08-phone")

    overflow = page.driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px on a phone"


def test_a_template_runs_from_its_schema_form_and_its_failure_reads_in_plain_words(
    page: ConsolePage, photos: dict[str, Path]
) -> None:
    page.sign_in(KEYS["client"])
    page.wait(page.signed_in, "the signed-in task list")
    page.go("template")
    page.wait(lambda: page.find_all("#template-name option"), "the templates")
    before = {card.get_attribute("id") for card in page.find_all("#task-list > li")}

    from selenium.webdriver.support.ui import Select

    Select(page.find("#template-name")).select_by_value("invert_image")
    page.wait(lambda: page.find("#tpl-width").get_attribute("type") == "number", "the form from the schema")
    assert page.find("#tpl-width").get_attribute("max"), "bounds come from the JSON Schema"
    page.find("#tpl-image_url-file").send_keys(str(photos["target"]))
    page.find("#tpl-width").clear()
    page.find("#tpl-width").send_keys("256")
    page.shot("09-template-form")
    page.find("#template-form button[type=submit]").click()

    card = page.wait(
        lambda: next(
            (c for c in page.find_all("#task-list > li") if c.get_attribute("id") not in before), None
        ),
        "the template task's card",
    )
    task_id = str(card.get_attribute("id")).removeprefix("task-")
    # This stack has no ComfyUI: the task fails, and the card says so in words.
    page.wait(lambda: page.badge(task_id) == "FAILED", "the template task to fail", SWAP_TIMEOUT_S)
    failure = page.card(task_id).find_element("css selector", ".failure")
    page.shot("10-failed-in-plain-words")
    answer = page.stack.client.get(f"/api/tasks/{task_id}", headers={"X-API-Key": KEYS["client"]})
    task = answer.json()["task"]
    assert task["params"]["input_data"]["template_params"]["width"] == 256
    assert task["error"]["code"] in failure.text and task["error"]["message"] in failure.text
    assert "ComfyUI" in failure.find_element("css selector", ".plain").text, failure.text


def test_a_file_dropped_on_the_face_zone_is_chosen_and_previewed(page: ConsolePage) -> None:
    page.sign_in(KEYS["client"])
    page.wait(page.signed_in, "the signed-in task list")
    page.go("swap")

    # A real drop event carrying a real PNG file (drawn in the page: WebDriver cannot drag
    # from the desktop).
    page.driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const canvas = document.createElement("canvas");
        canvas.width = canvas.height = 64;
        canvas.getContext("2d").fillRect(0, 0, 32, 32);
        canvas.toBlob((blob) => {
          const transfer = new DataTransfer();
          transfer.items.add(new File([blob], "dropped-face.png", { type: "image/png" }));
          const zone = document.querySelector("#drop-source .dropzone");
          const init = { dataTransfer: transfer, bubbles: true, cancelable: true };
          zone.dispatchEvent(new DragEvent("dragover", init));
          zone.dispatchEvent(new DragEvent("drop", init));
          done();
        }, "image/png");
        """
    )

    assert page.find("#drop-source .dropzone span").text.startswith("dropped-face.png")
    preview = page.find("#drop-source img.preview")
    assert preview.is_displayed() and preview.get_attribute("src").startswith("blob:")


def test_a_video_result_plays_in_the_page_and_downloads(page: ConsolePage, photos: dict[str, Path]) -> None:
    page.sign_in(KEYS["client"])
    page.wait(page.signed_in, "the signed-in task list")

    task_id = page.submit_swap(photos["source"], photos["short_clip"])

    page.wait(lambda: page.badge(task_id) == "COMPLETED", "the video swap to complete", SWAP_TIMEOUT_S)
    video = page.wait(lambda: page.card(task_id).find_element("css selector", "video"), "the result video")
    duration = page.wait(
        lambda: page.driver.execute_script(
            "return arguments[0].readyState >= 1 && arguments[0].duration", video
        ),
        "the video's metadata",
    )
    page.driver.execute_script("arguments[0].scrollIntoView()", page.card(task_id))
    page.shot("12-video-result")
    assert duration == pytest.approx(12 / 25, abs=0.1)
    assert video.get_attribute("controls") is not None
    download = page.card(task_id).find_element("css selector", "figcaption a")
    assert download.text == "Download video" and download.get_attribute("download").endswith(".mp4")


def test_the_console_works_from_the_keyboard(page: ConsolePage) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    page.sign_in(KEYS["client"])  # typed, then Enter
    page.wait(page.signed_in, "the signed-in task list")
    page.find('#nav [data-view="tasks"]').send_keys(Keys.ENTER)  # focus moves to the view opened
    assert page.driver.execute_script("return document.activeElement.id") == "main"

    def focused_view() -> str | None:
        return page.driver.execute_script("return document.activeElement.dataset.view || null")

    for _ in range(6):  # back up through the nav: Sign out, Run a template, New face swap
        ActionChains(page.driver).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
        if focused_view() == "swap":
            break
    assert focused_view() == "swap", "Shift+Tab does not reach the New face swap button"
    outline = page.driver.execute_script("return getComputedStyle(document.activeElement).outlineStyle")
    ActionChains(page.driver).send_keys(Keys.ENTER).perform()

    page.wait(lambda: page.find("#view-swap").is_displayed(), "Enter to open the face swap form")
    assert outline != "none", "the focused button shows no focus ring"
    assert page.find("#source-file").is_enabled()
