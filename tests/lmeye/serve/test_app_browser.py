"""The web demo in headless Chromium (Debian's chromium + chromedriver, driven by selenium).

`make test` installs them when missing; the browser tests skip only where they are truly absent."""

from __future__ import annotations

import os
import shutil

import pytest
from lingcloud_testing import free_port

from lmeye.serve.app import NO_DEMO, DemoHandlers, build_app

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
needs_browser = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="chromium/chromedriver not installed (`make test` installs them: apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def app_url(assistant, served):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    demos = {p.name: str(p) for p in list(served["images"].values())[:2]}
    app = build_app(assistant, demos)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1600"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # a Service: no Selenium Manager lookup
    yield driver
    driver.quit()


def _page(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]")))
    return wait


def _ask(browser, wait, question: str) -> str:
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    box.clear()
    box.send_keys(question)
    answer = browser.find_element(By.CSS_SELECTOR, "#answer textarea")
    before = answer.get_attribute("value")
    browser.find_element(By.CSS_SELECTOR, "#ask").click()
    seen: list[str] = []

    def done(_):  # the last value the generator yields ends with the question it echoes
        value = answer.get_attribute("value")
        seen.append(value)
        return value != before and value.endswith(question) and value
    try:
        return wait.until(done)
    except Exception:  # noqa: BLE001 - show what the page had
        pytest.fail(f"no answer on the page; last values seen: {seen[-3:]}")


def _upload(browser, path: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(path)


def _status(browser, wait, contains: str) -> str:
    from selenium.webdriver.common.by import By

    wait.until(lambda d: contains in d.find_element(By.CSS_SELECTOR, "#status").text)
    return browser.find_element(By.CSS_SELECTOR, "#status").text


@needs_browser
def test_upload_ask_and_read_the_streamed_answer(browser, app_url, assistant, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    wait = _page(browser, app_url)
    path = str(next(iter(served["images"].values())))
    _upload(browser, path)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#preview img")))
    _status(browser, wait, "Image:")
    question = "What colour is the shape?"
    assert _ask(browser, wait, question) == assistant.ask(path, question)


@needs_browser
def test_bad_upload_shows_an_error_and_the_app_keeps_serving(browser, app_url, assistant, tmp_path):
    wait = _page(browser, app_url)
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"these bytes are no PNG")
    _upload(browser, str(bad))
    text = _status(browser, wait, "Error")
    assert "not_an_image.png" in text and "not an image" in text
    question = "Is anybody there?"
    assert _ask(browser, wait, question) == assistant.ask(None, question)


def test_demo_pick_and_handlers_without_a_browser(assistant, served, tmp_path):
    path = str(next(iter(served["images"].values())))
    h = DemoHandlers(assistant, {"one.png": path})
    state, preview, status = h.on_pick("one.png")
    assert state == path and preview is not None and status == "Image: one.png"
    assert h.on_pick(NO_DEMO)[0] is None
    assert h.on_pick("other.png")[2].startswith("**Error:** other.png")
    *_, (answer, status) = h.on_ask(path, "Which shape?")
    assert answer == assistant.ask(path, "Which shape?") and status == ""
    assert list(h.on_ask(None, "   ")) == [("", "**Error:** the question is empty")]
