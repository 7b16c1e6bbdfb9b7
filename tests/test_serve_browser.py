"""The web UI in a real browser: Debian's chromium, headless, driven by selenium through chromedriver, against
a real server (a child process on a free loopback port, stopped by its PID). Types a prompt, clicks Generate,
waits for the picture, checks it is not blank, reuses its seed and keeps a screenshot; the server has an API key,
so the page first asks for it.

Skipped only where chromium is missing and CI is not set; in CI a missing browser fails the test."""

import io
import json
import os
import re
import time
import urllib.request
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from ldm_app.serve.process import start_server, stop_server  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "browser-test-key"


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but chromium/chromedriver are missing; .ci/run installs them "
                        "(apt-get install -y chromium chromium-driver).")
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=420,900"):  # a phone-sized window: the UI must work there
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromedriver and its browser


@pytest.fixture
def server(tmp_path):
    proc, url = start_server(["--device", "cpu", "--max-steps", "30", "--api-key", KEY],
                             log_path=str(tmp_path / "server.log"))
    try:
        yield url
    finally:
        stop_server(proc)


def test_generate_in_the_browser(browser, server, tmp_path):
    browser.get(server + "/")
    wait = WebDriverWait(browser, 90)
    key = wait.until(EC.element_to_be_clickable((By.NAME, "key")))  # with --api-key the UI asks for it once
    key.send_keys(KEY)
    key.submit()
    prompt = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    prompt.send_keys("a red heart")
    browser.find_element(By.CSS_SELECTOR, "button#generate").click()
    image = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#gallery img")))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)
    shot = Path(os.environ.get("LDM_APP_ARTIFACTS", tmp_path)) / "serve-browser.png"  # CI may keep it
    shot.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    pixels = np.asarray(PIL.Image.open(io.BytesIO(image.screenshot_as_png)).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20, "the generated image looks blank"
    seed = browser.find_element(By.CSS_SELECTOR, "#last-seed input").get_attribute("value")
    assert seed and int(seed) >= 0  # the seed is shown after the run
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in browser.get_cookies())  # the login's session
    with urllib.request.urlopen(urllib.request.Request(image.get_attribute("src"), headers={"Cookie": cookie})) as r:
        download = PIL.Image.open(io.BytesIO(r.read()))
    assert download.format == "PNG" and json.loads(download.info["ldm-app"])["seed"] == int(seed)  # metadata kept
    assert download.info["parameters"].startswith("a red heart")
    browser.find_element(By.CSS_SELECTOR, "button#reuse-seed").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#seed input").get_attribute("value") == seed)

    # 8 images in one batch: the progress bar counts the denoising steps, then the gallery holds all 8
    count = browser.find_element(By.CSS_SELECTOR, "#count input[type=number]")
    count.clear()
    count.send_keys("8", Keys.TAB)
    browser.find_element(By.CSS_SELECTOR, "button#generate").click()
    wait.until(lambda d: re.search(r"\b\d+/25\b", d.find_element(By.TAG_NAME, "body").text))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 8)

    # PNG info: an A1111 PNG's parameters go back into the text-to-image settings
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("parameters", "a blue star\nNegative prompt: blurry\nSteps: 7, Sampler: Euler, CFG scale: 3.5, "
                                "Seed: 4242, Size: 64x64, Model: sd15")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    browser.set_window_size(1280, 900)  # every tab in view, none in the overflow menu
    relayout = WebDriverWait(browser, 30, ignored_exceptions=[StaleElementReferenceException])  # tabs re-render
    tab = relayout.until(lambda d: next((b for b in d.find_elements(By.XPATH, "//button[normalize-space()='PNG info']")
                                         if b.is_displayed()), None))
    tab.click()
    browser.find_element(By.CSS_SELECTOR, "#png-file input[type=file]").send_keys(str(tmp_path / "a1111.png"))
    wait.until(lambda d: "a blue star" in d.find_element(By.CSS_SELECTOR, "#png-text textarea").get_attribute("value"))
    browser.find_element(By.CSS_SELECTOR, "button#send-to-txt2img").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea").get_attribute("value") == "a blue star")
    assert browser.find_element(By.CSS_SELECTOR, "#seed input").get_attribute("value") == "4242"
    assert browser.find_element(By.CSS_SELECTOR, "button#generate").is_displayed()  # back on text to image

    # Inpaint: upload a picture, paint a stroke in the browser, repaint under it; the corners stay as they were
    PIL.Image.new("RGB", (64, 64), (40, 60, 220)).save(tmp_path / "blue.png")
    relayout.until(lambda d: next((b for b in d.find_elements(By.XPATH, "//button[normalize-space()='Inpaint']")
                                   if b.is_displayed()), None)).click()
    browser.find_element(By.CSS_SELECTOR, "#inpaint-editor input[type=file]").send_keys(str(tmp_path / "blue.png"))
    canvas = wait.until(lambda d: next((c for c in d.find_elements(By.CSS_SELECTOR, "#inpaint-editor canvas")
                                        if c.is_displayed()), None))
    time.sleep(1)  # the editor draws the uploaded image
    ActionChains(browser).move_to_element_with_offset(canvas, -10, -10).click_and_hold().move_by_offset(20, 0) \
        .move_by_offset(0, 20).move_by_offset(-20, 0).release().perform()
    before = browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    browser.find_element(By.CSS_SELECTOR, "button#generate-inpaint").click()  # 8 images: the count is still 8
    WebDriverWait(browser, 90, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src") != before)
    src = browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    with urllib.request.urlopen(urllib.request.Request(src, headers={"Cookie": cookie})) as r:
        inpainted = np.asarray(PIL.Image.open(io.BytesIO(r.read())).convert("RGB")).astype(int)
    assert (inpainted[0, 0] == [40, 60, 220]).all() and (inpainted[-1, -1] == [40, 60, 220]).all()
    assert np.abs(inpainted[32, 32] - [40, 60, 220]).sum() > 30  # the painted middle was repainted
    browser.save_screenshot(str(shot.with_name("serve-browser-inpaint.png")))
