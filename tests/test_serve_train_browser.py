"""The Train LoRA tab in a real browser (headless chromium via selenium, a real server on a free loopback port,
stopped by its PID): upload 4 photos, start, see the step count move, see the finished LoRA in the LoRA picker,
and generate with it. The tiny random model and a few steps, bounded in time.

Skipped only where chromium is missing and CI is not set; in CI a missing browser fails the test."""

import json
import os
import re
import shutil
import urllib.request

import pytest

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from ldm_app.serve.process import start_server, stop_server  # noqa: E402
from ldm_app.testing import tiny_pipeline, write_toy_dataset  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    if not (os.path.exists(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but chromium/chromedriver are missing (apt-get install -y chromium chromium-driver).")
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def server(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "base")
    proc, url = start_server(["--model", str(tmp_path / "base"), "--device", "cpu", "--max-steps", "30",
                              "--data-dir", str(tmp_path / "data")], log_path=str(tmp_path / "server.log"))
    try:
        yield url
    finally:
        stop_server(proc)


def click_tab(browser, label: str) -> None:
    wait = WebDriverWait(browser, 30, ignored_exceptions=[StaleElementReferenceException])
    wait.until(lambda d: next((b for b in d.find_elements(
        By.XPATH, f"//button[@role='tab' and normalize-space()='{label}']") if b.is_displayed()), None)).click()


def set_number(browser, selector: str, value: str) -> None:
    field = browser.find_element(By.CSS_SELECTOR, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(value, Keys.TAB)


def test_train_a_lora_in_the_browser_and_generate_with_it(browser, server, tmp_path):
    photos = write_toy_dataset(tmp_path / "photos", n=4, size=32, layout="metadata")
    browser.get(server + "/")
    wait = WebDriverWait(browser, 120, ignored_exceptions=[StaleElementReferenceException])  # gradio re-renders
    click_tab(browser, "Train LoRA")
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#train-photos input[type=file]")))
    upload.send_keys("\n".join(str(p) for p in sorted(photos.glob("*.png"))))
    wait.until(lambda d: all(f"000{i}.png" in d.find_element(By.ID, "train-captions").text for i in range(4)))
    browser.find_element(By.CSS_SELECTOR, "#train-prompt textarea").send_keys("a sks shape")
    browser.find_element(By.CSS_SELECTOR, "#train-name textarea").send_keys("browser-lora")
    browser.find_element(By.XPATH, "//button[contains(., 'Options (as ldm-app finetune-lora)')]").click()
    wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#train-steps input")))
    set_number(browser, "#train-steps input", "60")
    set_number(browser, "#train-batch input", "2")
    browser.find_element(By.CSS_SELECTOR, "button#train-start").click()

    status = lambda d: d.find_element(By.ID, "train-status").text  # noqa: E731
    wait.until(lambda d: re.search(r"running · step [1-9]\d*/60 · loss", status(d)))  # the steps go by
    finished = lambda d: "done" in status(d) or "failed" in status(d)  # noqa: E731
    WebDriverWait(browser, 240, ignored_exceptions=[StaleElementReferenceException]).until(finished)
    assert "done · step 60/60" in status(browser), status(browser)
    assert "<lora:browser-lora:1>" in status(browser)
    assert "pytorch_lora_weights.safetensors" in browser.find_element(By.ID, "train-files").text
    with urllib.request.urlopen(server + "/sdapi/v1/loras") as r:
        assert "browser-lora" in [lora["name"] for lora in json.load(r)]

    # generate with it: the new LoRA in the picker (which the server started without: it had no LoRA)
    click_tab(browser, "Text to image")
    # the tab's panel renders after the click: wait for the field rather than look for it at once
    wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#prompt textarea"))).send_keys("a red heart")
    picker = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#lora-picker input")))
    picker.click()
    picker.send_keys("browser-lora", Keys.ENTER)
    wait.until(lambda d: "browser-lora" in d.find_element(By.CSS_SELECTOR, "#lora-picker").text)
    browser.find_element(By.CSS_SELECTOR, "button#generate").click()
    image = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#gallery img")))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    wait.until(lambda d: "<lora:browser-lora:0.8>" in d.find_element(By.CSS_SELECTOR, "#run-info textarea")
               .get_attribute("value"))
