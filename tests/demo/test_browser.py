"""`diffstyler demo` on the tiny model, driven in headless Chromium (Debian's `chromium` package,
launched by Playwright's Python package: Playwright's own browser download cannot be reached)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from diffstyler.demo.config import read_demo_config
from diffstyler.masks import FastSAMSegmenter
from diffstyler.outputs import read_settings
from tests.demo.conftest import CONTENT
from tests.helpers import REPO_ROOT

INCLUDE_POINT = (51, 30)  # [x, y] in the red square of data/content_shapes.png (64 x 48): x >= 48,
EXCLUDE_POINT = (16, 16)  # so that a swapped click (y, x) lies outside the photo; this one is on the yellow disc
START_TIMEOUT_S = 180
RUN_TIMEOUT_MS = 240_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def demo_url(demo_config_file, tmp_path_factory):
    """`diffstyler demo` on the smoke config, served on a free port of 127.0.0.1 until the module ends."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "demo.log"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1",
                   "GRADIO_TEMP_DIR": str(log.parent / "gradio")}
    with open(log, "w") as output:
        server = subprocess.Popen([sys.executable, "-m", "diffstyler.cli", "demo", "--config", str(demo_config_file), "--port", str(port)],
                                  cwd=REPO_ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_served(url, server, log)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_until_served(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"diffstyler demo exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"diffstyler demo did not answer within {START_TIMEOUT_S} s:\n{log.read_text()}")


def click_pixel(page, image_selector: str, x: int, y: int) -> None:
    """Click pixel (x, y) of a shown image (object-fit contain, never enlarged, as Gradio shows it)
    and wait until the image is replaced by its new preview (or the page shows an error)."""
    image = page.locator(image_selector)
    box = image.bounding_box()
    width, height = image.evaluate("element => [element.naturalWidth, element.naturalHeight]")
    scale = min(box["width"] / width, box["height"] / height, 1)
    left, top = box["x"] + (box["width"] - width * scale) / 2, box["y"] + (box["height"] - height * scale) / 2
    shown = image.get_attribute("src")
    page.mouse.click(left + (x + 0.5) * scale, top + (y + 0.5) * scale)
    page.wait_for_function("([selector, shown]) => document.querySelector(selector).src !== shown"
                           " || document.querySelector('[data-testid=toast-body]') !== null",
                           arg=[image_selector, shown], timeout=60_000)
    errors = page.locator("[data-testid=toast-text]").all_inner_texts()
    assert not errors, f"click at ({x}, {y}): {errors}"


def fetched_image(page, url: str) -> Image.Image:
    return Image.open(io.BytesIO(page.request.get(url).body()))


def expected_mask(config_file: Path) -> np.ndarray:
    """FastSAM's region for the two clicks, in this process, from the clicks' true coordinates."""
    segmenter = FastSAMSegmenter(read_demo_config(str(config_file)).segmenter)
    content = Image.open(CONTENT).convert("RGB")
    return segmenter.points(content, [list(INCLUDE_POINT), list(EXCLUDE_POINT)], [1, 0]).numpy()


@pytest.mark.slow
def test_a_run_in_the_browser_keeps_the_photo_outside_the_clicked_region(chromium, demo_url, demo_config_file, tmp_path):
    """Upload the photo, pick the smoke LoRA, click an include and an exclude point, run: the mask
    offered for download is FastSAM's for those two points, and every result shown keeps the
    upload's exact pixels outside it. A bad upload first gets one line in the page.

    Caught: the result shown is the latent-fused image without the pixel composite (its pixels
    outside the mask differ); a click at (x, y) sent as (y, x) (the include point then lies outside
    the 64 x 48 photo: an error instead of a result; or another region than FastSAM's for the
    clicks); an error shown as a traceback or not at all; a page that loads anything from another
    host (Gradio must not phone home)."""
    from playwright.sync_api import sync_playwright

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        hosts = set()
        page.on("request", lambda request: hosts.add(urlparse(request.url).netloc))
        page.goto(demo_url)

        upload = page.locator("#content-upload input[type=file]")
        upload.set_input_files(str(not_an_image))
        toast = page.locator("[data-testid=toast-body]").first
        toast.wait_for(timeout=60_000)
        message = toast.locator("[data-testid=toast-text]").inner_text().strip()
        assert message.startswith("not a readable image (") and "\n" not in message and "Traceback" not in message
        page.locator("#content-upload button[aria-label=Clear]").click()
        toast.locator("button").first.click()  # closes the message

        upload.set_input_files(str(CONTENT))
        page.locator("#photo-1 img").wait_for(timeout=60_000)
        page.locator("#style-1 input").click()
        page.get_by_role("option", name="smoke").click()
        click_pixel(page, "#photo-1 img", *INCLUDE_POINT)
        page.locator("#kind-1").get_by_label("exclude").check()
        click_pixel(page, "#photo-1 img", *EXCLUDE_POINT)
        page.locator("#run").click()
        page.locator("#results img, [data-testid=toast-body]").first.wait_for(timeout=RUN_TIMEOUT_MS)
        assert page.locator("[data-testid=toast-body]").count() == 0, page.locator("[data-testid=toast-text]").all_inner_texts()

        shown = {image.get_attribute("alt"): fetched_image(page, image.get_attribute("src")) for image in page.locator("#results img").all()}
        downloads = {link.get_attribute("download"): link.get_attribute("href") for link in page.locator("#downloads a[download]").all()}
        mask = np.asarray(fetched_image(page, downloads["1_smoke_mask.png"])) > 0
        composite_file = tmp_path / "composite.png"
        composite_file.write_bytes(page.request.get(downloads["composite.png"]).body())
        browser.close()

    assert hosts == {urlparse(demo_url).netloc}
    assert np.array_equal(mask, expected_mask(demo_config_file))
    assert 0 < mask.sum() < mask.size and mask[INCLUDE_POINT[1], INCLUDE_POINT[0]] and not mask[EXCLUDE_POINT[1], EXCLUDE_POINT[0]]
    upload_pixels = np.asarray(Image.open(CONTENT).convert("RGB"))
    assert list(shown) == ["content", "composite", "smoke"]
    for caption in ("composite", "smoke"):
        result = np.asarray(shown[caption].convert("RGB"))
        assert np.array_equal(result[~mask], upload_pixels[~mask]), caption
        assert not np.array_equal(result[mask], upload_pixels[mask]), caption  # styled inside
    settings = read_settings(composite_file)
    assert settings["Steps"] == 10 and [style["name"] for style in settings["Styles"]] == ["smoke"]
