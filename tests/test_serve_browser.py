"""The web UI in a real browser: Debian's chromium, headless, at a phone's width (390 px), driven by selenium
through chromedriver, against a real server (a child process on a free loopback port, stopped by its PID) on the
default model with a --lora-dir. The server has an API key, so the page first asks for it.

One walk through every tab: the layout on a phone, an empty prompt refused, a picture with its seed and PNG
parameters, a LoRA picked, the size note for A1111's 512 px, Stop, the history, readable errors for a file that is
not an image and for damaged PNG parameters, Invert & edit, PNG info → text to image, and inpainting. Every step
waits for the state it needs (an element, a value, the editor holding the image), never for a time.

Skipped only where chromium is missing and CI is not set; in CI a missing browser fails the test."""

import io
import json
import os
import re
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from ldm_app import LdmPipeline  # noqa: E402
from ldm_app.lora import lora_state_dict  # noqa: E402
from ldm_app.lora_saving import save_atomic  # noqa: E402
from ldm_app.serve.process import start_server, stop_server  # noqa: E402
from ldm_app.testing import add_random_lora  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "browser-test-key"
TABS = ["Text to image", "Image to image", "Inpaint", "Invert & edit", "PNG info", "Train LoRA"]


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
                 "--window-size=390,844"):  # a phone: the UI must work there
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromedriver and its browser


@pytest.fixture
def server(tmp_path):
    styled = add_random_lora(LdmPipeline.from_default())  # a LoRA for the default model that changes the picture
    (tmp_path / "loras").mkdir()
    save_atomic(lora_state_dict(styled.unet), tmp_path / "loras" / "style.safetensors")
    proc, url = start_server(["--device", "cpu", "--api-key", KEY,
                              "--lora-dir", str(tmp_path / "loras")], log_path=str(tmp_path / "server.log"))
    try:
        yield url
    finally:
        stop_server(proc)


def value(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css).get_attribute("value")


def find(wait, css):
    """The element, once it is on the page (gradio renders in steps)."""
    return wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))


def click(wait, css):
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, css))).click()


def set_number(wait, css, number):
    """A slider's or number box's value, typed as a person does (TAB commits it), once the box shows it."""
    box = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, css)))
    box.clear()
    box.send_keys(str(number), Keys.TAB)
    wait.until(lambda d: value(d, css) == str(number))


def open_tab(driver, wait, name):
    wait.until(lambda d: next((b for b in d.find_elements(By.CSS_SELECTOR, "[role=tab]")
                               if b.text == name and b.is_displayed()), None)).click()


def body_text(driver):
    return driver.find_element(By.TAG_NAME, "body").text


def expect_error(driver, wait, sentence):
    """Wait for the error toast that says `sentence`, check it shows no Python or gradio internals, close it."""
    toast = wait.until(lambda d: next((t for t in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")
                                       if sentence in t.text), None))
    assert not re.search(r"Traceback|Error:|preprocess|component at index", toast.text), toast.text
    toast.find_element(By.CSS_SELECTOR, "[data-testid=toast-close]").click()
    wait.until(lambda d: not any(sentence in t.text for t in d.find_elements(By.CSS_SELECTOR,
                                                                               "[data-testid=toast-body]")))


def upload_to_editor(driver, wait, editor, path):
    """Upload `path` into gradio's ImageEditor and return its canvas once the editor holds the image (its Undo
    comes alive). The editor's canvas starts after its tab shows, and a file sent while it starts can be dropped
    (the flaky "Upload an image to inpaint" of the past): then it is sent again."""
    canvas = wait.until(lambda d: next((c for c in d.find_elements(By.CSS_SELECTOR, f"{editor} canvas")
                                        if c.is_displayed()), None))
    holds_image = lambda d: d.find_element(By.CSS_SELECTOR, f"{editor} button[aria-label=Undo]").is_enabled()  # noqa: E731
    for _ in range(3):
        find(wait, f"{editor} input[type=file]").send_keys(str(path))
        try:
            WebDriverWait(driver, 30).until(holds_image)
            return canvas
        except TimeoutException:
            continue
    raise AssertionError(f"the image editor never showed the uploaded {path.name}")


def fetch(url, cookie):
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Cookie": cookie})) as r:
        return PIL.Image.open(io.BytesIO(r.read()))


def test_every_tab_in_a_phone_browser(browser, server, tmp_path):
    wait = WebDriverWait(browser, 90, ignored_exceptions=[StaleElementReferenceException])  # gradio re-renders
    browser.get(server + "/")
    key = wait.until(EC.element_to_be_clickable((By.NAME, "key")))  # with --api-key the UI asks for it once
    key.send_keys(KEY)
    key.submit()
    prompt = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    shot = Path(os.environ.get("LDM_APP_ARTIFACTS", tmp_path)) / "serve-browser.png"  # CI may keep it
    shot.parent.mkdir(parents=True, exist_ok=True)

    # 1. Phone layout: every tab in view (none behind "⋯"), the results right under the button
    wait.until(lambda d: [t.text for t in d.find_elements(By.CSS_SELECTOR, "[role=tab]") if t.is_displayed()] == TABS)
    button = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "button#generate"))).rect
    assert find(wait, "#gallery").rect["y"] - (button["y"] + button["height"]) < 200
    assert "Describe" in prompt.get_attribute("placeholder")  # a hint, not a filled-in prompt

    # 2. An empty prompt is refused with a sentence (not silently drawn)
    click(wait, "button#generate")
    expect_error(browser, wait, "Type a prompt first")

    # 3. A picture: not blank, its seed shown, its PNG parameters kept; the seed can be reused
    prompt.send_keys("a red heart")
    click(wait, "button#generate")
    image = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#gallery img")))
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    pixels = np.asarray(PIL.Image.open(io.BytesIO(image.screenshot_as_png)).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20, "the generated image looks blank"
    seed = value(browser, "#last-seed input")
    assert seed and int(seed) >= 0
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in browser.get_cookies())  # the login's session
    download = fetch(image.get_attribute("src"), cookie)
    assert download.format == "PNG" and json.loads(download.info["ldm-app"])["seed"] == int(seed)
    assert download.info["parameters"].startswith("a red heart")
    click(wait, "button#reuse-seed")
    wait.until(lambda d: value(d, "#seed input") == seed)

    # 4. A LoRA from --lora-dir, picked at run time with its weight
    picker = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#lora-picker input")))
    picker.click()
    picker.send_keys("style", Keys.ENTER)
    wait.until(lambda d: "style" in d.find_element(By.CSS_SELECTOR, "#lora-picker").text)
    click(wait, "button#generate")
    wait.until(lambda d: "<lora:style:0.8>" in value(d, "#run-info textarea"))

    # 5. A1111's 512 px on a 64 px model: the note says it is drawn at 64x64 and resized up, and so does the PNG
    set_number(wait, "#width input[type=number]", 512)
    set_number(wait, "#height input[type=number]", 512)
    wait.until(lambda d: "drawn at 64x64" in d.find_element(By.CSS_SELECTOR, "#size-note").text)
    before = find(wait, "#gallery img").get_attribute("src")
    click(wait, "button#generate")
    wait.until(lambda d: "Drawn at: 64x64" in value(d, "#run-info textarea"))
    wait.until(lambda d: "resized up" in d.find_element(By.CSS_SELECTOR, "#run-note").text)
    src = wait.until(lambda d: (s := d.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")) != before
                     and s)
    assert fetch(src, cookie).size == (512, 512)
    set_number(wait, "#width input[type=number]", 64)
    set_number(wait, "#height input[type=number]", 64)
    wait.until(lambda d: "draws 64x64" in d.find_element(By.CSS_SELECTOR, "#size-note").text)

    # 6. Stop: 16 images of 150 steps (2,400 image-steps: no machine finishes them before the click) stop at the next
    # step; the server's queue is idle again
    set_number(wait, "#count input[type=number]", 16)
    set_number(wait, "#steps input[type=number]", 150)
    click(wait, "button#generate")
    wait.until(lambda d: re.search(r"\b\d+/150\b", body_text(d)))
    click(wait, "button#stop")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#run-note").text == "Stopped.")
    progress = urllib.request.Request(server + "/sdapi/v1/progress", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(progress) as r:
        assert json.load(r)["state"]["sampling_steps"] == 0  # nothing runs on: the batch stopped
    set_number(wait, "#count input[type=number]", 1)
    set_number(wait, "#steps input[type=number]", 25)

    # 7. The history keeps every result of this session (3 runs of 1 image so far), not only the last run's
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history .thumbnail-item img")) == 3)

    # 8. A file that is not an image: one sentence, no gradio internals
    (tmp_path / "broken.png").write_text("not a picture")  # named .png, so the browser lets it through
    open_tab(browser, wait, "Image to image")
    find(wait, "#init-image input[type=file]").send_keys(str(tmp_path / "broken.png"))
    click(wait, "button#generate-img2img")
    expect_error(browser, wait, "not an image")

    # 9. Invert & edit: its own prompts (the shared prompt box is hidden); the seed and parameters are this run's
    open_tab(browser, wait, "Invert & edit")
    wait.until(EC.invisibility_of_element_located((By.CSS_SELECTOR, "#prompt")))
    PIL.Image.new("RGB", (64, 64), (40, 60, 220)).save(tmp_path / "blue.png")
    find(wait, "#edit-image input[type=file]").send_keys(str(tmp_path / "blue.png"))
    wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#edit-image img")))
    find(wait, "#edit-source textarea").send_keys("a blue square")
    find(wait, "#edit-target textarea").send_keys("a red square")
    set_number(wait, "#edit-steps input[type=number]", 3)
    click(wait, "button#generate-edit")
    wait.until(lambda d: value(d, "#run-info textarea").startswith("Invert & edit"))
    assert value(browser, "#last-seed input") == "0"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery .thumbnail-item img")) == 2
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history .thumbnail-item img")) == 5)

    # 10. PNG info: damaged parameters are one sentence; an A1111 PNG's go to text to image, 512 px with the note
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("ldm-app", "{not json")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "damaged.png", pnginfo=info)
    open_tab(browser, wait, "PNG info")
    find(wait, "#png-file input[type=file]").send_keys(str(tmp_path / "damaged.png"))
    wait.until(lambda d: "damaged" in value(d, "#png-text textarea"))
    click(wait, "button#send-to-txt2img")
    expect_error(browser, wait, "No parameters to send")
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("parameters", "a blue star\nNegative prompt: blurry\nSteps: 7, Sampler: Euler, CFG scale: 3.5, "
                                "Seed: 4242, Size: 512x512, Model: sd15")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    clear = browser.find_elements(By.CSS_SELECTOR, "#png-file button[aria-label=Clear]")
    if clear:
        clear[0].click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#png-file input[type=file]"))
    find(wait, "#png-file input[type=file]").send_keys(str(tmp_path / "a1111.png"))
    wait.until(lambda d: "a blue star" in value(d, "#png-text textarea"))
    click(wait, "button#send-to-txt2img")
    wait.until(lambda d: value(d, "#prompt textarea") == "a blue star")
    assert value(browser, "#seed input") == "4242"
    wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "button#generate")))  # back on text to image
    wait.until(lambda d: "drawn at 64x64" in d.find_element(By.CSS_SELECTOR, "#size-note").text)
    set_number(wait, "#width input[type=number]", 64)
    set_number(wait, "#height input[type=number]", 64)

    # 11. Inpaint: once the editor holds the uploaded picture, paint a stroke and repaint under it; the corners
    # stay as they were
    open_tab(browser, wait, "Inpaint")
    editor = "#inpaint-editor"
    canvas = upload_to_editor(browser, wait, editor, tmp_path / "blue.png")
    ActionChains(browser).move_to_element_with_offset(canvas, -10, -10).click_and_hold().move_by_offset(20, 0) \
        .move_by_offset(0, 20).move_by_offset(-20, 0).release().perform()
    before = browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src")
    click(wait, "button#generate-inpaint")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src") != before)
    inpainted = np.asarray(fetch(browser.find_element(By.CSS_SELECTOR, "#gallery img").get_attribute("src"),
                                 cookie).convert("RGB")).astype(int)
    assert (inpainted[0, 0] == [40, 60, 220]).all() and (inpainted[-1, -1] == [40, 60, 220]).all()
    assert np.abs(inpainted[32, 32] - [40, 60, 220]).sum() > 30  # the painted middle was repainted
    browser.save_screenshot(str(shot.with_name("serve-browser-inpaint.png")))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history .thumbnail-item img")) == 6)

    # 12. The user errors above (an empty prompt, a non-image, bad PNG parameters) are one line each in the
    # server's log, never gradio's traceback
    log = (tmp_path / "server.log").read_text()
    assert "UI: Type a prompt first" in log and re.search(r"UI: .*not an image", log)
    assert "Traceback" not in log, log[-3000:]

    # 13. "Log out" in the page's header ends the session: the login form again, and the UI needs the key
    browser.get(browser.find_element(By.CSS_SELECTOR, "a[href$='/logout']").get_attribute("href"))  # gradio: new tab
    wait.until(lambda d: d.current_url.endswith("/login"))
    browser.get(server + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=password]"))
