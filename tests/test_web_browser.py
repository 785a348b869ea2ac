"""The page end to end in headless Chromium (Selenium + Debian's chromium and chromium-driver): upload an image
and see the ids and the reconstruction appear, ask a question, type a prompt and see a drawn image; saves
docs/screenshots/web.png. Run with `make test-browser` (installs what it needs).

Models: the bundled tiny ones when their decoder and LM are in this install (the screenshot for the README),
else the micro ones of test_web; SEEDTOK_BROWSER_MODELS=micro|tiny forces one."""

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from seedtok.fileio import atomic_write  # noqa: E402
from seedtok.web import Engine, ServerThread, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "screenshots" / "web.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def tiny_bundled() -> bool:
    weights = ROOT / "seedtok" / "weights"
    return (weights / "tiny" / "decoder" / "model_index.json").is_file() and \
        (weights / "tiny-lm" / "config.json").is_file()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    choice = os.environ.get("SEEDTOK_BROWSER_MODELS", "auto")
    if choice == "tiny" or (choice == "auto" and tiny_bundled()):
        return Engine.load("tiny", "tiny")
    from test_web import micro_models

    tokenizer, lm = micro_models(tmp_path_factory.mktemp("browser"))
    return Engine(tokenizer, lm, model_name="micro (random weights)", lm_name="micro (random weights)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver: run `make test-browser`")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # headless, as root in a container, and quiet on a machine without network (no background connections)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1100,1250",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # the driver path is given, so Selenium Manager never tries to download one
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_upload_ask_and_draw_in_chromium(engine, browser, tmp_path):
    from seedtok.data.emoji import EmojiWorld

    sample = EmojiWorld("test", 0)[3]
    picture = tmp_path / "scene.png"
    sample.image.resize((256, 256)).save(picture)
    with ServerThread(create_app(engine)) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda d: "tokenizer" in d.find_element(By.ID, "models").text)

        browser.find_element(By.ID, "file").send_keys(str(picture))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#ids span")) == engine.tokenizer.num_tokens)
        wait.until(lambda d: (d.find_element(By.ID, "recon").get_attribute("src") or "").startswith("data:image/png"))
        wait.until(lambda d: d.find_element(By.ID, "caption").text.strip() != "")
        shown = [int(s.text) for s in browser.find_elements(By.CSS_SELECTOR, "#ids span")]
        assert shown == engine.tokenize([picture])[0].tolist()
        assert browser.execute_script("return document.getElementById('recon').naturalWidth") > 0

        browser.find_element(By.ID, "question").send_keys("What color is the background?")
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "answer").text.strip() != "")

        browser.find_element(By.ID, "prompt").send_keys("a red apple on a blue background")
        browser.find_element(By.ID, "draw").click()
        wait.until(lambda d: (d.find_element(By.ID, "drawn").get_attribute("src") or "").startswith("data:image/png"))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#drawn-ids span")) == engine.tokenizer.num_tokens
        assert browser.find_element(By.ID, "error").text == ""

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shot = browser.get_screenshot_as_png()
        atomic_write(SCREENSHOT, lambda p: Path(p).write_bytes(shot))
    assert SCREENSHOT.stat().st_size > 10_000
