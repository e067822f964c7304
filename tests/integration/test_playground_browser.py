"""The playground page in a real headless browser (Debian's chromium through chromedriver and selenium) against the
session's real gateway (API keys required) and Triton: a file chosen, a prompt typed, two images asked for; the
progress bar moves through intermediate steps of the job's event stream; both results appear with their seeds;
a request without a prompt shows the API's own message next to the prompt. A screenshot of the finished page is
saved under the test's tmp folder, and also in `IMAGEN_SCREENSHOT_DIR` when set (how docs/playground.png is made:
`IMAGEN_SCREENSHOT_DIR=docs pytest tests/integration/test_playground_browser.py`).

The browser comes from the system (`scripts/bootstrap.sh` installs it with apt-get): nothing is downloaded at
test time. Without it the test is skipped on a workstation and fails in CI (`CI=true`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# The machine's network is closed: no first-run, sync, component or background requests, no QUIC.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,960",
)
WAIT_S = 30.0  # liveness bound for one page state (a 2-core machine shared with other tests)
SCREENSHOT = "playground.png"
SCREENSHOT_WIDTH, SCREENSHOT_MIN_HEIGHT = 1280, 720
WINDOW_CHROME_PX = 150  # a window's height beyond its page viewport (headless chromium keeps the difference)
INPUT_SIDE = 64
# Enough UNet steps that the stream shows some before the end (the tiny pipeline takes milliseconds per step).
STEPS, STRENGTH, SEED = 40, 1.0, 7
# A job long enough (seconds) that a cancel sent after its first step lands well before its end.
LONG_STEPS, LONG_IMAGES = 150, 4


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        how = "install Debian's chromium and chromium-driver (scripts/bootstrap.sh does as root)"
        message = f"no headless browser: {', '.join(missing)} missing; {how}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def input_png(tmp_path: Path) -> Path:
    ramp = np.linspace(0, 255, INPUT_SIDE, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(ramp, (INPUT_SIDE, 1)), np.tile(ramp[:, None], (1, INPUT_SIDE)), 255 - np.tile(ramp, (INPUT_SIDE, 1))],
        axis=-1,
    )
    path = tmp_path / "input.png"
    Image.fromarray(pixels).save(path)
    return path


def wait(driver: WebDriver, what: str, condition: Any) -> Any:
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def pixels(url: str) -> np.ndarray:
    with Image.open(io.BytesIO(httpx.get(url, timeout=10).content)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def set_value(element: WebElement, value: str) -> None:
    element.clear()
    element.send_keys(value)


def text_of(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text.strip()


def save_screenshot(driver: WebDriver, tmp_path: Path) -> list[Path]:
    targets = [tmp_path / SCREENSHOT]
    extra = os.environ.get("IMAGEN_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        targets.append(Path(extra) / SCREENSHOT)
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(SCREENSHOT_WIDTH, max(SCREENSHOT_MIN_HEIGHT, height + WINDOW_CHROME_PX))  # the whole page
    for target in targets:
        assert driver.save_screenshot(str(target)), target
        with Image.open(target) as shot:
            assert shot.width >= 800 and shot.height >= 600, shot.size
    return targets


def test_page_is_static_with_a_strict_policy(gateway: str) -> None:
    """`/` and `/playground` serve the same page; no inline script or style; scripts, styles and requests from
    this origin only; unknown files are 404 in the API's error shape."""
    page = httpx.get(f"{gateway}/playground", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{gateway}/", timeout=10).content == page.content
    policy = {d.split()[0]: d.split()[1:] for d in page.headers["content-security-policy"].split("; ")}
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"] and policy["style-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"] and policy["frame-ancestors"] == ["'none'"]
    html = page.text
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="playground/playground.js" defer>']
    assert "<style" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)
    for name, media_type in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        asset = httpx.get(f"{gateway}/playground/{name}", timeout=10)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type), name
        assert asset.headers["content-security-policy"] == page.headers["content-security-policy"]
    missing = httpx.get(f"{gateway}/playground/..%2Fsettings.py", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_playground_runs_a_job_in_a_real_browser(
    browser: WebDriver, gateway: str, auth: dict[str, str], input_png: Path, tmp_path: Path
) -> None:
    driver = browser
    driver.get(f"{gateway}/playground")
    # Without a key the catalog cannot load: the API's 401 message shows beside the key field.
    wait(driver, "the 401 beside the key", lambda d: text_of(d, "error-api_key"))
    unauthorized = httpx.get(f"{gateway}/v1/models", timeout=10).json()["error"]
    assert unauthorized["message"] in text_of(driver, "error-api_key")

    driver.find_element(By.ID, "api-key").send_keys(API_KEY)
    wait(
        driver,
        "models and styles loaded",
        lambda d: d.find_element(By.ID, "request-form").get_attribute("data-ready") == "true",
    )
    models = httpx.get(f"{gateway}/v1/models", headers=auth, timeout=10).json()
    options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#field-model option")]
    assert options == [m["id"] for m in models["data"]]
    steps_input = driver.find_element(By.ID, "field-steps")
    assert steps_input.get_attribute("max") == str(models["limits"]["steps"]["maximum"])
    default_model = next(m for m in models["data"] if m["id"] == models["default"])
    assert steps_input.get_attribute("value") == str(default_model["defaults"]["steps"])
    # The scheduler choices are the chosen model's (plus its default), the formats the API's.
    options = driver.execute_script(
        "return ['scheduler', 'output_format'].map((n) =>"
        " [...document.getElementById('field-' + n).options].map((o) => o.value))"
    )
    assert options == [["", *default_model["schedulers"]], ["png", "jpeg", "webp"]]

    driver.find_element(By.ID, "image-file").send_keys(str(input_png))
    wait(
        driver,
        "the input preview",
        lambda d: d.execute_script("return document.getElementById('input-preview').naturalWidth") == INPUT_SIDE,
    )
    set_value(driver.find_element(By.ID, "field-num_images"), "2")
    set_value(steps_input, str(STEPS))
    set_value(driver.find_element(By.ID, "field-strength"), str(STRENGTH))
    set_value(driver.find_element(By.ID, "field-seed"), str(SEED))

    # 1. No prompt: the API's message and details, next to the prompt field.
    driver.find_element(By.ID, "submit").click()
    wait(driver, "the prompt's error", lambda d: text_of(d, "error-prompt"))
    image = "data:image/png;base64," + base64.b64encode(input_png.read_bytes()).decode()
    body = {"image": image, "steps": STEPS, "strength": STRENGTH, "seed": SEED, "num_images": 2}
    expected = httpx.post(f"{gateway}/v1/image-to-image", json=body, headers=auth, timeout=30).json()["error"]
    assert text_of(driver, "error-prompt") == f"{expected['message']} {expected['details']}"
    assert text_of(driver, "error-general") == ""

    # 2. With a prompt: an asynchronous job, followed on its event stream until its two images are shown.
    driver.find_element(By.ID, "field-prompt").send_keys("a watercolor fox")
    driver.find_element(By.ID, "submit").click()
    wait(driver, "two results", lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result.output img")) == 2)
    wait(
        driver,
        "both results decoded",
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('.result.output img')].every(i => i.complete && i.naturalWidth > 0)"
        ),
    )
    assert text_of(driver, "error-prompt") == "" and text_of(driver, "error-general") == ""
    job_id = driver.find_element(By.ID, "request-form").get_attribute("data-job")
    job = httpx.get(f"{gateway}/v1/image-to-image/{job_id}", headers=auth, timeout=10).json()
    assert job["status"] == "completed" and job["prompt"] == "a watercolor fox" and job["num_images"] == 2
    assert (job["steps"], job["strength"], job["seed"]) == (STEPS, STRENGTH, SEED)

    # The bar moved through intermediate steps (the page logs every event), and ended full.
    log = [
        (e.get_attribute("data-status"), int(e.get_attribute("data-step")), int(e.get_attribute("data-total")))
        for e in driver.find_elements(By.CSS_SELECTOR, "#progress-log li")
    ]
    total = job["effective_steps"]
    assert any(status == "processing" and 0 < step < total for status, step, _ in log), log
    assert log[-1] == ("completed", total, total), log
    bar = driver.find_element(By.ID, "progress")
    assert float(bar.get_attribute("value")) == float(bar.get_attribute("max")) == total

    # Each result: its seed, size and a download link to the job's image.
    figures = driver.find_elements(By.CSS_SELECTOR, ".result.output")
    for figure, output in zip(figures, job["images"], strict=True):
        assert figure.get_attribute("data-seed") == str(output["seed"])
        caption = figure.find_element(By.TAG_NAME, "figcaption").text
        assert f"seed {output['seed']}" in caption and f"{output['width']}×{output['height']}" in caption
        assert figure.find_element(By.CSS_SELECTOR, "a.download").get_attribute("href") == output["url"]
        assert figure.find_element(By.TAG_NAME, "img").get_attribute("src") == output["url"]
    assert [o["seed"] for o in job["images"]] == [SEED, SEED + 1]
    save_screenshot(driver, tmp_path)

    # One click reuses a result's seed (alone: image i of a request uses seed + i).
    figures[1].find_element(By.CSS_SELECTOR, "button.reuse-seed").click()
    assert driver.find_element(By.ID, "field-seed").get_attribute("value") == str(SEED + 1)
    assert driver.find_element(By.ID, "field-num_images").get_attribute("value") == "1"

    # The request as curl: the key is read from the shell, never copied.
    driver.find_element(By.ID, "copy-curl").click()
    curl = driver.find_element(By.ID, "curl").get_attribute("value")
    assert curl.startswith(f"curl -sS -X POST '{gateway}/v1/image-to-image'"), curl[:200]
    assert '"prompt": "a watercolor fox"' in curl and "base64 < 'input.png'" in curl and API_KEY not in curl
    # ...and it works: run in the file's folder, it reproduces the reused seed's image alone (within the parity
    # tolerance of 2 levels: another batch size may sum in another order).
    bash = shutil.which("bash")
    assert bash is not None and shutil.which("curl") is not None, "the curl command needs bash and curl"
    shell = subprocess.run(
        [bash, "-c", curl], cwd=input_png.parent, env={**os.environ, "IMAGEN_API_KEY": API_KEY},
        capture_output=True, text=True, timeout=WAIT_S, check=True,
    )  # fmt: skip
    alone = json.loads(shell.stdout)
    assert alone["status"] == "completed" and [o["seed"] for o in alone["images"]] == [SEED + 1], alone
    diff = np.abs(pixels(alone["images"][0]["url"]) - pixels(job["images"][1]["url"]))
    assert diff.max() <= 2, f"max {diff.max()} levels"

    # Cancel: a long job, canceled once its first step shows; the stream ends with the job canceled.
    set_value(driver.find_element(By.ID, "field-steps"), str(LONG_STEPS))
    set_value(driver.find_element(By.ID, "field-num_images"), str(LONG_IMAGES))
    driver.find_element(By.ID, "submit").click()
    wait(
        driver,
        "the long job's first step",
        lambda d: [
            e for e in d.find_elements(By.CSS_SELECTOR, "#progress-log li") if e.get_attribute("data-step") != "0"
        ],
    )
    driver.find_element(By.ID, "cancel").click()
    wait(driver, "the job canceled", lambda d: text_of(d, "status") == "Job canceled.")
    canceled_id = driver.find_element(By.ID, "request-form").get_attribute("data-job")
    canceled = httpx.get(f"{gateway}/v1/image-to-image/{canceled_id}", headers=auth, timeout=10).json()
    assert canceled_id != job_id and canceled["status"] == "canceled" and canceled["images"] == []
    assert driver.find_elements(By.CSS_SELECTOR, ".result.output") == []

    # The key travelled in headers only: no URL the page loaded carries it, and nothing broke the policy.
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and not [u for u in urls if API_KEY in u]
    console = [entry["message"] for entry in driver.get_log("browser")]
    assert not [m for m in console if "Content Security Policy" in m or "Uncaught" in m], console


# The mask test: strokes in image pixels of the 64² input (the canvas has the image's size, shown scaled).
MASK_BRUSH, MASK_ERASER = 16, 8
MASK_STROKE = ((32, 32), (48, 32))  # painted: x 24-56 and y 24-40 with the round caps
MASK_HOLE = (40, 32)  # erased: x and y 36-44
MASK_STEPS = 4


def mask_point(driver: WebDriver, canvas: WebElement, x: float, y: float) -> tuple[int, int]:
    """An image pixel's offset from the canvas's center in CSS pixels (selenium's origin for element offsets)."""
    width, height = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", canvas
    )
    return round((x / INPUT_SIDE - 0.5) * width), round((y / INPUT_SIDE - 0.5) * height)


def paint(driver: WebDriver, canvas: WebElement, brush: int, *points: tuple[float, float]) -> None:
    """One stroke through `points` (one point: a dot), with the brush set as a user drags the range."""
    driver.execute_script(
        "const b = document.getElementById('mask-brush'); b.value = String(arguments[0]);"
        " b.dispatchEvent(new Event('input', { bubbles: true }))",
        brush,
    )
    actions = ActionChains(driver).move_to_element_with_offset(canvas, *mask_point(driver, canvas, *points[0]))
    actions.click_and_hold()
    for x, y in points[1:]:
        actions.move_to_element_with_offset(canvas, *mask_point(driver, canvas, x, y))
    actions.release().perform()


def curl_text(driver: WebDriver) -> str:
    driver.find_element(By.ID, "copy-curl").click()
    return driver.find_element(By.ID, "curl").get_attribute("value") or ""


def test_playground_paints_a_mask_and_sends_it(
    browser: WebDriver, gateway: str, auth: dict[str, str], input_png: Path
) -> None:
    """A mask painted over the preview (pointer events through chromedriver) travels as an opaque black-and-white
    PNG: white where painted, black where erased or never painted; cleared, it is not sent; a dot too small for
    the blur gets the API's error beside the mask; the masked job runs with the default blur."""
    driver = browser
    driver.get(f"{gateway}/playground")
    key = driver.find_element(By.ID, "api-key")
    if not key.get_attribute("value"):
        key.send_keys(API_KEY)
    wait(driver, "models loaded", lambda d: d.find_element(By.ID, "request-form").get_attribute("data-ready") == "true")
    assert not driver.find_element(By.ID, "mask-field").is_displayed()  # no image yet
    driver.find_element(By.ID, "image-file").send_keys(str(input_png))
    canvas = driver.find_element(By.ID, "mask-canvas")
    wait(
        driver,
        "the mask canvas at the image's size",
        lambda d: (
            d.execute_script("const c = arguments[0]; return [c.width, c.height]", canvas) == [INPUT_SIDE] * 2
            and canvas.is_displayed()
        ),
    )
    assert driver.find_element(By.ID, "mask-field").is_displayed()
    blur = driver.find_element(By.ID, "field-mask_blur")
    assert not blur.is_displayed()  # only with a painted mask
    driver.execute_script("arguments[0].scrollIntoView({ block: 'center' })", canvas)

    paint(driver, canvas, MASK_BRUSH, *MASK_STROKE)
    assert blur.is_displayed() and (blur.get_attribute("min"), blur.get_attribute("max")) == ("0", "64")
    assert '"mask": "data:image/png;base64,' in curl_text(driver)
    driver.find_element(By.ID, "mask-clear").click()
    assert '"mask"' not in curl_text(driver) and not blur.is_displayed()

    # A dot of one pixel: the default blur leaves nothing at or above half, so the API refuses it, by name.
    driver.find_element(By.ID, "field-prompt").send_keys("a watercolor fox")
    set_value(driver.find_element(By.ID, "field-steps"), str(MASK_STEPS))
    paint(driver, canvas, 1, MASK_HOLE)
    driver.find_element(By.ID, "submit").click()
    wait(driver, "the mask's error", lambda d: text_of(d, "error-mask"))
    assert "Invalid field 'mask'" in text_of(driver, "error-mask") and text_of(driver, "error-general") == ""
    driver.find_element(By.ID, "mask-clear").click()

    # Paint, erase a hole (the erase toggle), and send it: the body the page posts is captured on its way out.
    paint(driver, canvas, MASK_BRUSH, *MASK_STROKE)
    driver.find_element(By.ID, "mask-erase").click()
    assert driver.find_element(By.ID, "mask-erase").get_attribute("aria-pressed") == "true"
    assert driver.find_element(By.ID, "mask-paint").get_attribute("aria-pressed") == "false"
    paint(driver, canvas, MASK_ERASER, MASK_HOLE)
    driver.execute_script(
        "window.sentBodies = []; const send = window.fetch;"
        " window.fetch = (url, init) => { if (init && init.method === 'POST') window.sentBodies.push(init.body);"
        " return send(url, init); };"
    )
    driver.find_element(By.ID, "submit").click()
    wait(driver, "the masked result", lambda d: d.find_elements(By.CSS_SELECTOR, ".result.output img"))
    sent = json.loads(driver.execute_script("return window.sentBodies[0]"))
    assert "mask_blur" not in sent and sent["image"].startswith("data:image/png;base64,")
    prefix = "data:image/png;base64,"
    assert sent["mask"].startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(sent["mask"][len(prefix) :]))) as decoded:
        assert decoded.size == (INPUT_SIDE, INPUT_SIDE)
        rgba = np.asarray(decoded.convert("RGBA"))
    assert (rgba[..., 3] == 255).all() and (rgba[..., 0] == rgba[..., 1]).all() and (rgba[..., 0] == rgba[..., 2]).all()
    mask = rgba[..., 0]  # indexed [y, x]
    for x, y in ((28, 32), (52, 32), (40, 26), (40, 38), (34, 32)):
        assert mask[y, x] == 255, (x, y)  # painted
    assert mask[MASK_HOLE[1], MASK_HOLE[0]] == 0  # erased
    assert (mask[:16] == 0).all() and (mask[48:] == 0).all() and (mask[:, :16] == 0).all()  # never painted
    assert (mask % 255 == 0).mean() > 0.9  # black and white, grey only along the strokes' edges

    job_id = driver.find_element(By.ID, "request-form").get_attribute("data-job")
    job = httpx.get(f"{gateway}/v1/image-to-image/{job_id}", headers=auth, timeout=10).json()
    assert job["status"] == "completed" and job["masked"] is True and job["mask_blur"] == 4, job
    assert job["steps"] == MASK_STEPS and text_of(driver, "error-mask") == ""

    # Another image: the mask was the last one's, so it is cleared.
    other = input_png.with_name("other.png")
    shutil.copyfile(input_png, other)
    driver.find_element(By.ID, "image-file").send_keys(str(other))
    wait(driver, "the other input", lambda d: "other.png" in text_of(d, "input-caption"))
    assert '"mask"' not in curl_text(driver) and not blur.is_displayed()

    console = [entry["message"] for entry in driver.get_log("browser")]
    assert not [m for m in console if "Content Security Policy" in m or "Uncaught" in m], console
