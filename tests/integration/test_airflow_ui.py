"""A person in the Airflow UI: log in, open the DAG, trigger it with the Params form, watch it.

Headless Chromium (Debian's ``chromium`` + ``chromium-driver``, installed by ``make
browser-deps``) driven by Selenium against the session's ``airflow standalone``. The
selectors are the ``data-testid`` and ``name`` attributes that Airflow 3.3's React UI
renders (found by saving the page source while writing this test).

Screenshots of each step go to ``test-artifacts/airflow-ui/``; on a failure the screenshot
and the page source of the moment are saved beside them and named in the error.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pytest

from kv_export.store import open_store
from tests.conftest import KEY, REPO

if TYPE_CHECKING:  # imported by pytest_plugins, so that pytest rewrites its asserts
    from tests.airflow_server import AirflowServer, AirflowSetup

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytest_plugins = ["tests.airflow_server"]
pytestmark = [
    pytest.mark.airflow,
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.timeout(900),  # above the harness's and this file's own deadlines
]

ARTIFACTS = REPO / "test-artifacts" / "airflow-ui"
UI_DAG_ID = "batchscore"  # the generic DAG: its form has every field, whatever jobs exist
UI_TIMEOUT = 60.0
RUN_TIMEOUT = 300.0


@pytest.fixture(scope="session", autouse=True)
def browser_installed() -> None:
    """No browser fails the test, it does not skip it: the UI is what this test checks.

    Autouse and session-scoped, so it runs before the session's Airflow starts.
    """
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing = " and ".join(
            name
            for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER))
            if found is None
        )
        pytest.fail(
            f"{missing} not found on PATH: the Airflow UI test drives headless Chromium. "
            "Run `make browser-deps` (Debian packages chromium and chromium-driver).",
            pytrace=False,
        )


@pytest.fixture
def browser() -> Iterator[Any]:
    assert CHROMIUM is not None and CHROMEDRIVER is not None  # else browser_installed failed
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    # An explicit driver path: selenium-manager cannot download one here.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(UI_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


class Evidence:
    """Numbered screenshots of the steps; screenshot + page source when a step fails."""

    def __init__(self, driver: Any, folder: Path) -> None:
        self.driver = driver
        self.folder = folder
        self.count = 0
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def failure(self) -> str:
        try:
            screenshot = self.shot("failure")
            source = screenshot.with_suffix(".html")
            source.write_text(self.driver.page_source)
            return f"screenshot {screenshot}, page source {source}, URL {self.driver.current_url}"
        except Exception as exc:  # the browser itself may be what failed
            return f"none saved ({exc!r}); earlier screenshots in {self.folder}"


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # React re-renders replace elements between finding and using them: look again.
    wait = WebDriverWait(
        driver, timeout, poll_frequency=0.5, ignored_exceptions=[StaleElementReferenceException]
    )
    try:
        return wait.until(condition)
    except TimeoutException:
        raise AssertionError(f"UI: {what} did not happen within {timeout:.0f} s") from None


def css(selector: str) -> Callable[[Any], Any]:
    from selenium.webdriver.common.by import By

    def visible(driver: Any) -> Any:
        for element in driver.find_elements(By.CSS_SELECTOR, selector):
            if element.is_displayed() and element.is_enabled():
                return element
        return False

    return visible


def fill(driver: Any, name: str, value: str) -> None:
    """Type into a form field as a person does.

    The form re-renders on every change and a fast burst of keystrokes can lose one, so
    a field that does not show the value is cleared and typed again, key by key.
    """
    from selenium.webdriver.common.keys import Keys

    field = wait_for(driver, css(f"input[name={name}]"), f"form field {name}", UI_TIMEOUT)
    for attempt in range(4):
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        for chunk in [value] if attempt == 0 else list(value):
            field.send_keys(chunk)
            time.sleep(0.01 * attempt)
        time.sleep(0.3)
        if field.get_attribute("value") == value:
            return
    raise AssertionError(f"form field {name} shows {field.get_attribute('value')!r}, not {value!r}")


def test_trigger_from_the_ui_form_and_watch_the_run_succeed(
    browser: Any, airflow: AirflowSetup, dataset: Path
) -> None:
    server = airflow.server
    dag_id = UI_DAG_ID
    server.wait_for_dag(dag_id)
    store_url = f"lmdb://{airflow.scratch / 'ui-store'}"
    evidence = Evidence(browser, ARTIFACTS)
    print(f"\nAirflow UI screenshots: {ARTIFACTS}")
    try:
        log_in(browser, evidence, server, f"/dags/{dag_id}")
        run_id = trigger_with_the_form(
            browser,
            evidence,
            {
                "element_input_path": str(dataset),
                "element_namespace": "ui",
                "element_store_url": store_url,
            },
        )
        state = watch_the_run(browser, evidence)
    except Exception as exc:
        raise AssertionError(f"{exc}\nUI evidence: {evidence.failure()}") from exc
    if state != "Success":
        raise AssertionError(
            f"the UI shows run {run_id} as {state!r}\nUI evidence: {evidence.failure()}\n"
            + server.describe_run(dag_id, run_id)
        )

    # The run that the UI shows is the one the form asked for, and it published.
    run = server.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}").json()
    assert run["state"] == "success" and run["run_type"] == "manual"
    assert run["conf"]["input_path"] == str(dataset) and run["conf"]["namespace"] == "ui"
    assert run["conf"]["store_url"] == store_url and run["conf"]["key_column"] == KEY
    live = open_store(store_url).state("ui").live_info()
    assert live is not None and live.key_count == 12_000


def log_in(driver: Any, evidence: Evidence, server: AirflowServer, path: str) -> None:
    """Open ``path``; SimpleAuthManager's login page comes first and leads back to it."""
    from selenium.webdriver.common.by import By

    driver.get(server.base + path)
    wait_for(driver, css("input[name=username]"), "the login page", UI_TIMEOUT)
    evidence.shot("login")
    driver.find_element(By.NAME, "username").send_keys(server.username)
    driver.find_element(By.NAME, "password").send_keys(server.password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(driver, css("[data-testid=trigger-dag-button]"), "the DAG page", UI_TIMEOUT)
    evidence.shot("dag")


def trigger_with_the_form(driver: Any, evidence: Evidence, fields: dict[str, str]) -> str:
    """Open the trigger dialog, fill the Params form, trigger; return the new run's id.

    The dialog's "Unpause on trigger" box is ticked by default, so a paused DAG runs too.
    """
    wait_for(
        driver, css("[data-testid=trigger-dag-button]"), "the Trigger button", UI_TIMEOUT
    ).click()
    wait_for(driver, css("input[name=element_input_path]"), "the trigger form", UI_TIMEOUT)
    for name, value in fields.items():
        fill(driver, name, value)
    evidence.shot("form")
    submit = wait_for(
        driver, css("[data-testid=trigger-dag-submit]"), "an enabled Trigger button", UI_TIMEOUT
    )
    submit.click()
    # The UI opens the new run's page: /dags/<dag_id>/runs/<run_id>
    wait_for(driver, lambda d: "/runs/" in d.current_url, "the new run's page", UI_TIMEOUT)
    return unquote(driver.current_url.split("/runs/", 1)[1].split("/")[0].split("?")[0])


def watch_the_run(driver: Any, evidence: Evidence) -> str:
    """Watch the run page's state badge (the UI refreshes it) until the run ends."""
    # Read in one script call: the badge is re-rendered while the run progresses.
    read_badge = (
        "const e = document.querySelector('[data-testid=header-card] [data-testid=state-badge]');"
        "return e ? e.textContent : '';"
    )
    deadline = time.monotonic() + RUN_TIMEOUT
    reloaded = time.monotonic()
    state = ""
    while time.monotonic() < deadline:
        state = str(driver.execute_script(read_badge)).strip()
        if state in ("Success", "Failed"):
            evidence.shot(f"run-{state.lower()}")
            return state
        if time.monotonic() - reloaded > 60:  # in case the page stopped polling
            driver.refresh()
            reloaded = time.monotonic()
        time.sleep(1)
    raise AssertionError(f"the run page still shows {state!r} after {RUN_TIMEOUT:.0f} s")
