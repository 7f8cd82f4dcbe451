"""`diffstyler demo` on the tiny model, served on 127.0.0.1 and used as strangers on a network would:
through Gradio's client (a script) and in headless Chromium (Debian's `chromium` package, launched
by Playwright's Python package: Playwright's own browser download cannot be reached).

One server for the module, `diffstyler demo` in a process of its own (its queue holds three waiting
requests: `max_queue: 3`); the test of the click canvas on a 1024-pixel photo serves one at that
resolution from this process (`page.serve(..., block=False)`).
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

import numpy as np
import pytest
from PIL import Image

from diffstyler.demo.actions import SERVER_FAULT
from diffstyler.demo.config import read_demo_config
from diffstyler.demo.page import serve
from diffstyler.demo.regions import MARK_COLOURS
from diffstyler.masks import FastSAMSegmenter
from diffstyler.outputs import read_settings
from tests.demo.conftest import CONTENT, STYLE_IMAGE, write_demo_config
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow

INCLUDE_POINT = (51, 30)  # [x, y] in the red square of data/content_shapes.png (64 x 48): x >= 48,
EXCLUDE_POINT = (16, 16)  # so that a swapped click (y, x) lies outside the photo; this one is on the yellow disc
START_TIMEOUT_S = 180
RUN_TIMEOUT_MS = 240_000
NO_REGIONS = ("points", "") * 3  # /load_photo's inputs after the photo: each tab's region mode and text
NO_STYLE = ("", "points", "")  # /run's inputs of a tab without a style: style, region mode, text
NO_OTHER_STYLES = NO_STYLE * 2  # /run's inputs of the other tabs
STYLEID_AUTHORS = (0.75, 1.5, True)  # /run's gamma, tau, AdaIN
NO_TAB_STYLES = (None,) * 3  # /load_style_image's inputs after the image: each tab's style
MAX_QUEUE = 3  # three large uploads at once are all accepted


@dataclass
class DemoServer:
    url: str
    process: subprocess.Popen
    folder: Path  # holds the config, the output folder and Gradio's upload folder

    @property
    def uploads(self) -> Path:
        return self.folder / "gradio"

    @property
    def outputs(self) -> Path:
        return self.folder / "outputs"

    def memory_mb(self, field: str) -> float:
        """VmRSS (now) or VmHWM (the peak since `reset_peak_memory`) of the server, in MB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no {field} in /proc/{self.process.pid}/status")

    def reset_peak_memory(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path, **config) -> DemoServer:
    """`diffstyler demo` on the smoke config (the `smoke` LoRA offered) with `config`, from the
    repository root, its uploads in `folder`/gradio."""
    port = free_port()
    config_file = write_demo_config(folder, port=port, **config)
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1",
                   "GRADIO_TEMP_DIR": str(folder / "gradio"),
                   # glibc then returns every freed large block to the system at once, so that the
                   # peak memory of one request is not hidden by what an earlier one left mapped
                   "MALLOC_MMAP_THRESHOLD_": "131072"}
    log = open(folder / "demo.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "diffstyler.cli", "demo", "--config", str(config_file)],
                               cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
    server = DemoServer(f"http://127.0.0.1:{port}/", process, folder)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"diffstyler demo exited with {process.returncode}:\n{(folder / 'demo.log').read_text()}")
        try:
            with urllib.request.urlopen(server.url, timeout=5) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(1)
    stop_server(server)
    pytest.fail(f"diffstyler demo did not answer within {START_TIMEOUT_S} s:\n{(folder / 'demo.log').read_text()}")


def stop_server(server: DemoServer) -> None:
    server.process.terminate()
    server.process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = start_server(tmp_path_factory.mktemp("served"), max_queue=MAX_QUEUE)
    yield started
    stop_server(started)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return path


def client(server: DemoServer):
    """A Gradio client: a session of its own, as a script on the network would have."""
    from gradio_client import Client

    return Client(server.url, verbose=False, download_files=False)


def message_of(call) -> str:
    """The message a failing API call gets (what the page would show)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as error:
        call()
    return str(error.value)


def server_paths(server: DemoServer) -> list[str]:
    return [str(server.folder), str(REPO_ROOT), "/tmp/", "DIFFSTYLER_", "GRADIO_", "environment variable", ".safetensors", ".png"]


def load_photo(session, photo: Path = CONTENT):
    from gradio_client import handle_file

    return session.predict(handle_file(str(photo)), *NO_REGIONS, api_name="/load_photo")


def run(session, style: str = "smoke", steps=4, seed=0, **values):
    """A run with `style` over the whole image in tab 1."""
    return run_tabs(session, (style, "whole image", ""), NO_STYLE, NO_STYLE, steps=steps, seed=seed, **values)


def run_tabs(session, *tabs, steps=4, seed=0, **values):
    """A run with each tab's (style, region mode, text)."""
    settings = {"guidance": 7.5, "feature_steps": 2, "attention_steps": 2, "preset": "paper", **values}
    return session.predict(steps, settings["guidance"], settings["feature_steps"], settings["attention_steps"],
                           settings["preset"], seed, *STYLEID_AUTHORS, *[value for tab in tabs for value in tab], api_name="/run")


def message_of_json(server: DemoServer, api_name: str, inputs: str) -> str:
    """The message an event gets when called with `inputs`, a JSON array of all its inputs written
    by hand (Gradio's client refuses to send NaN or Infinity; a script need not use it), in a new
    session; "" when it succeeds."""
    config = json.load(urllib.request.urlopen(f"{server.url}config", timeout=30))
    (event,) = [event for event in config["dependencies"] if event.get("api_name") == api_name]
    session = secrets.token_hex(8)
    body = f'{{"data": {inputs}, "fn_index": {event["id"]}, "session_hash": "{session}", "event_data": null}}'
    request = urllib.request.Request(f"{server.url}gradio_api/queue/join", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()
    with urllib.request.urlopen(f"{server.url}gradio_api/queue/data?session_hash={session}", timeout=120) as stream:
        for line in stream:
            if line.startswith(b"data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return (message.get("output") or {}).get("error") or ""
    raise AssertionError("the event never completed")


def fetch(server: DemoServer, path: str) -> int:
    try:
        with urllib.request.urlopen(f"{server.url}gradio_api/file={quote(path)}", timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


# -- through Gradio's client -------------------------------------------------------------------------

def test_a_script_gets_one_line_naming_the_control_and_never_a_server_path(server):
    """Caught: a value from the API used unchecked (a seed of 10**20: "Overflow when unpacking long
    long"; NaN steps: int(NaN); a 300-character style name: "file name too long"), each a bare
    "Error"; a message holding a server path (the upload's temporary path) or a server-side remedy;
    ultralytics' "No module named 'pi_heif'" for a non-image once FastSAM has loaded; a fault of the
    server's setup (no CLIP model for text regions, offline) told to the page with its paths."""
    from gradio_client import handle_file

    session = client(server)
    load_photo(session)
    other_tabs = '"", "points", [], "", null, "", "points", [], "", null'
    before_tabs = "0.75, 1.5, true"  # StyleID's gamma, tau, AdaIN
    messages = {
        "seed": message_of(lambda: run(session, seed=10**20)),
        "steps": message_of_json(server, "run", f'[null, null, null, NaN, 7.5, 2, 2, "paper", 0, {before_tabs}, "smoke", "whole image", [], "", null, {other_tabs}]'),
        "window": message_of_json(server, "run", f'[null, null, null, 4, 7.5, NaN, 2, "paper", 0, {before_tabs}, "smoke", "whole image", [], "", null, {other_tabs}]'),
        "guidance": message_of_json(server, "run", f'[null, null, null, 4, Infinity, 2, 2, "paper", 0, {before_tabs}, "smoke", "whole image", [], "", null, {other_tabs}]'),
        "tau": message_of_json(server, "run", f'[null, null, null, 4, 7.5, 2, 2, "paper", 0, 0.75, NaN, true, "smoke", "whole image", [], "", null, {other_tabs}]'),
        "style": message_of(lambda: run(session, style="../../loras/smoke")),
        "clip": message_of(lambda: session.predict("text", "the square", api_name="/show_region_1")),
        "not an image": message_of(lambda: session.predict(handle_file(str(Path(__file__))), *NO_REGIONS, api_name="/load_photo")),
        "name": message_of(lambda: session.predict("x" * 300, api_name="/train")),
    }
    assert messages == {
        "seed": "invalid value (Seed): must be a whole number from 0 to 4294967295, got 100000000000000000000",
        "steps": "invalid value (Denoising steps): must be a whole number from 1 to 100, got nan",
        "window": "invalid value (Feature injection: first steps): must be a whole number from 0 to 100, got nan",
        "guidance": "invalid value (Guidance scale): must be a number from 1 to 20, got inf",
        "tau": "invalid value (StyleID: attention temperature (tau)): must be a number from 0.5 to 3, got nan",
        "style": "not one of the choices (Style 1 › Style): choose one of smoke; got '../../loras/smoke'",
        "clip": SERVER_FAULT,  # FastSAM has loaded: ultralytics now patches PIL.Image.open
        "not an image": "not a readable image (Content photo): not an image file (PNG, JPEG, WebP, ...), or a damaged one",
        "name": "text too long (LoRA name): at most 64 characters, got 300",
    }
    assert "openai/clip-vit-base-patch32" in (server.folder / "demo.log").read_text()  # the console has the details


def test_a_style_trained_in_one_session_is_that_sessions_own(server):
    """Caught: the output folder served by Gradio's file route (a LoRA fetched by its absolute or
    relative path: 200); a style offered to, or usable by, another session; the training status
    naming the output folder; uploads left in Gradio's upload folder."""
    from gradio_client import handle_file

    trainer, stranger = client(server), client(server)
    trainer.predict(handle_file(str(STYLE_IMAGE)), *NO_TAB_STYLES, api_name="/load_style_image")
    status, lora, *menus = trainer.predict("stripes", api_name="/train")
    assert status == "Trained stripes (5 steps): pick it in a style's menu. It is offered in this page only; download its LoRA below."
    offered = [["DiffStyler (LoRA smoke)", "smoke"], ["DiffStyler (LoRA stripes)", "stripes"],
               ["StyleID (image style_stripes, no training)", "style_stripes"]]
    assert all(menu["choices"] == offered for menu in menus)
    assert not any(part in status for part in server_paths(server))

    (trained,) = server.outputs.glob("*/loras/stripes/pytorch_lora_weights.safetensors")
    (style_png,) = server.outputs.glob("*/styles/stripes.png")
    for path in (trained, style_png, trained.parent / "diffstyler_lora.json"):
        assert fetch(server, str(path)) == 403, path
        assert fetch(server, os.path.relpath(path, REPO_ROOT)) == 403, path  # the server runs in the repository root
    with urllib.request.urlopen(lora["url"], timeout=30) as response:  # its own download link works
        assert response.read() == trained.read_bytes()
    assert re.fullmatch(r"[0-9a-f]{32}", Path(lora["path"]).parent.name)

    load_photo(stranger)
    assert message_of(lambda: run(stranger, style="stripes")) == \
        "not one of the choices (Style 1 › Style): choose one of smoke; got 'stripes'"
    load_photo(trainer)
    gallery, _ = run(trainer, style="stripes")
    assert [item["caption"] for item in gallery] == ["content", "DiffStyler (LoRA stripes)"]
    uploaded = {path.name for path in server.uploads.rglob("*") if path.is_file()}
    assert not uploaded & {CONTENT.name, STYLE_IMAGE.name}, uploaded


def served_png(url: str, path: Path) -> tuple[np.ndarray, str, dict]:
    """A served PNG's pixels, its A1111 text and its settings (as a script downloads it)."""
    with urllib.request.urlopen(url, timeout=30) as response:
        path.write_bytes(response.read())
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), image.text["parameters"], read_settings(path)


def test_a_style_image_gives_a_result_without_training_and_beside_a_lora_in_two_masks(server, tmp_path):
    """Through Gradio's client, as a script would: the uploaded style image is a style of the page
    at once (picked in tab 1); a run with it alone is captioned StyleID and trains nothing; a run
    with the LoRA in tab 1's mask and the image in tab 2's keeps the photo's pixels outside both
    masks; no served PNG's metadata holds a server path.

    Caught: a LoRA trained (written to the output folder) for an image style; the upload's
    temporary path, or any other server path, in a served PNG's metadata (the image style's
    `image`, the LoRA's `lora`); a caption that does not name the method; a tab's style or mask
    lost between the page's events (the photo's pixels changed outside the masks, or a region
    left unstyled)."""
    from gradio_client import handle_file

    session = client(server)
    load_photo(session)
    trained = sorted(server.outputs.glob("*/loras/*"))
    _, lora_name, status, *menus = session.predict(handle_file(str(STYLE_IMAGE)), *NO_TAB_STYLES, api_name="/load_style_image")
    assert [menu["value"] for menu in menus] == ["style_stripes", None, None] and lora_name == "style_stripes_lora"
    assert status.startswith("style_stripes is a style of this page: StyleID (image style_stripes, no training)")

    gallery, downloads = run(session, style="style_stripes")
    assert [item["caption"] for item in gallery] == ["content", "StyleID (image style_stripes, no training)"]
    assert sorted(server.outputs.glob("*/loras/*")) == trained  # nothing trained
    _, parameters, settings = served_png(downloads[0]["url"], tmp_path / "alone.png")
    assert [(style["method"], style["image"]) for style in settings["Styles"]] == [("styleid", "style_stripes")]

    photo = np.asarray(Image.open(CONTENT).convert("RGB"))
    height, width = photo.shape[:2]
    left, right = np.zeros((height, width), bool), np.zeros((height, width), bool)
    left[:, : width // 3], right[:, 2 * width // 3:] = True, True
    for number, region in ((1, left), (2, right)):
        Image.fromarray(region.astype(np.uint8) * 255).save(tmp_path / f"mask_{number}.png")
        session.predict(handle_file(str(tmp_path / f"mask_{number}.png")), "mask file", "", api_name=f"/load_mask_{number}")
    gallery, downloads = run_tabs(session, ("smoke", "mask file", ""), ("style_stripes", "mask file", ""), NO_STYLE)
    assert [item["caption"] for item in gallery] == \
        ["content", "composite", "DiffStyler (LoRA smoke)", "StyleID (image style_stripes, no training)"]
    composite, mixed_parameters, mixed_settings = served_png(downloads[0]["url"], tmp_path / "composite.png")
    outside = ~left & ~right
    assert np.array_equal(composite[outside], photo[outside])
    assert not np.array_equal(composite[left], photo[left]) and not np.array_equal(composite[right], photo[right])
    assert [(style["method"], style["lora"], style["image"]) for style in mixed_settings["Styles"]] == \
        [("diffstyler", "smoke", None), ("styleid", None, "style_stripes")]
    assert sorted(server.outputs.glob("*/loras/*")) == trained
    for text in (parameters, json.dumps(settings), mixed_parameters, json.dumps(mixed_settings)):
        assert not any(part in text for part in server_paths(server)), text


def test_beyond_the_queues_size_a_request_is_told_the_demo_is_busy(server):
    """Caught: a queue without a maximum size (every request accepted, memory and waiting time
    unbounded)."""
    from gradio_client.exceptions import AppError
    from gradio_client.utils import Status

    running, *waiting, one_more = [client(server) for _ in range(MAX_QUEUE + 2)]
    for session in (running, *waiting, one_more):
        load_photo(session)
    long_run = running.submit(50, 7.5, 2, 2, "paper", 0, *STYLEID_AUTHORS, "smoke", "whole image", "", *NO_OTHER_STYLES, api_name="/run")
    running_codes = (Status.PROCESSING, Status.PROGRESS)  # a run reports its steps' progress
    wait_for(lambda: long_run.status().code in running_codes)
    queued = []
    for session in waiting:
        queued.append(session.submit(4, 7.5, 2, 2, "paper", 0, *STYLEID_AUTHORS, "smoke", "whole image", "", *NO_OTHER_STYLES,
                                     api_name="/run"))
        wait_for(lambda: queued[-1].status().code == Status.IN_QUEUE)
    with pytest.raises(Exception) as busy:
        run(one_more)
    assert str(busy.value) == "Queue is full! Please try again." and not isinstance(busy.value, AppError)
    assert long_run.status().code in running_codes, "the long run ended before the test could fill the queue"
    for job in (long_run, *queued):
        job.result(timeout=RUN_TIMEOUT_MS / 1000)


def wait_for(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_three_large_uploads_at_once_take_the_memory_of_one(server, tmp_path):
    """Three 6000 x 6000 palette PNGs (4 KB each, under the pixel limit) uploaded by three
    sessions at once: the server's peak memory grows as for one (they are decoded one at a time,
    in the queue), not three times as much.

    Caught: the photo's decode outside the queue, or in a queue that runs several at once (peak
    growth about 3 x one's: measured 477 MB against 171 MB)."""
    from gradio_client import handle_file

    photos = []
    for number in range(3):  # three different files: identical bytes would share one upload
        image = Image.new("P", (6000, 6000))
        image.putpixel((0, 0), number)
        image.save(tmp_path / f"large_{number}.png")
        photos.append(tmp_path / f"large_{number}.png")
    sessions = [client(server) for _ in photos]

    server.reset_peak_memory()
    before = server.memory_mb("VmRSS")
    load_photo(sessions[0], photos[0])
    one = server.memory_mb("VmHWM") - before

    server.reset_peak_memory()
    before = server.memory_mb("VmRSS")
    jobs = [session.submit(handle_file(str(photo)), *NO_REGIONS, api_name="/load_photo") for session, photo in zip(sessions, photos)]
    for job in jobs:
        job.result(timeout=120)
    three = server.memory_mb("VmHWM") - before
    print(f"peak memory growth: one upload {one:.0f} MB, three at once {three:.0f} MB")
    assert one > 100  # the decode is measured at all (6000 x 6000 x 3 bytes = 108 MB)
    assert three < 1.5 * one


# -- in the browser ----------------------------------------------------------------------------------

def shown_box(page, selector: str) -> tuple[float, float, float, float, int, int]:
    """(left, top, width, height) of the picture inside an image element shown with object-fit
    contain, and the image's own size (natural width, height)."""
    image = page.locator(selector)
    box = image.bounding_box()
    width, height = image.evaluate("element => [element.naturalWidth, element.naturalHeight]")
    scale = min(box["width"] / width, box["height"] / height, 1)
    left, top = box["x"] + (box["width"] - width * scale) / 2, box["y"] + (box["height"] - height * scale) / 2
    return left, top, width * scale, height * scale, width, height


def click_photo_pixel(page, selector: str, photo_size: tuple[int, int], x: int, y: int) -> None:
    """Click the middle of photo pixel (x, y) on the canvas as the user sees it (whatever it is
    enlarged or shrunk by), and wait until the canvas is replaced by its new preview."""
    left, top, width, height, *_ = shown_box(page, selector)
    shown = page.locator(selector).get_attribute("src")
    page.mouse.click(left + (x + 0.5) * width / photo_size[0], top + (y + 0.5) * height / photo_size[1])
    page.wait_for_function("([selector, shown]) => document.querySelector(selector).src !== shown"
                           " || document.querySelector('[data-testid=toast-body]') !== null",
                           arg=[selector, shown], timeout=60_000)
    errors = page.locator("[data-testid=toast-text]").all_inner_texts()
    assert not errors, f"click at ({x}, {y}): {errors}"


def mark_centre(canvas: Image.Image, label: int) -> tuple[float, float]:
    """Where the canvas marks a point (the mean of its mark's pixels), in canvas pixels."""
    rows, columns = np.nonzero(np.all(np.asarray(canvas.convert("RGB")) == MARK_COLOURS[label], axis=-1))
    assert len(rows), "no mark on the canvas"
    return float(columns.mean()), float(rows.mean())


def fetched_image(page, url: str) -> Image.Image:
    return Image.open(io.BytesIO(page.request.get(url).body()))


def toast(page) -> str:
    """The page's one message (waited for), then closed."""
    text = page.locator("[data-testid=toast-text]").first
    text.wait_for(timeout=60_000)
    message = text.inner_text().strip()
    page.locator("[data-testid=toast-body] button").first.click()
    page.locator("[data-testid=toast-body]").first.wait_for(state="detached", timeout=10_000)
    return message


def expected_mask(server: DemoServer) -> np.ndarray:
    """FastSAM's region for the two clicks, in this process, from the clicks' true coordinates."""
    segmenter = FastSAMSegmenter(read_demo_config(str(server.folder / "demo.yaml")).segmenter)
    content = Image.open(CONTENT).convert("RGB")
    return segmenter.points(content, [list(INCLUDE_POINT), list(EXCLUDE_POINT)], [1, 0]).numpy()


def test_a_run_in_the_browser_keeps_the_photo_outside_the_clicked_region(chromium, server, tmp_path):
    """Upload the photo (shown as an image), pick the smoke LoRA, click an include and an exclude
    point on the enlarged canvas, type a seed of 10**20 (one line naming the Seed box), run: the
    mask offered for download is FastSAM's for those two points, and every result shown keeps the
    upload's exact pixels outside it. A non-image upload after FastSAM has loaded gets one line.

    Caught: the 64-pixel photo shown at its own size on the canvas (a few millimetres wide); a
    click mapped to the canvas's pixels instead of the photo's (the canvas is 8 x the photo: an
    error, or another region), or (x, y) sent as (y, x); the result shown being the latent-fused
    image without the pixel composite (its pixels outside the mask differ); an error shown as a
    traceback, with a server path, or not at all; a page that loads anything from another host
    (Gradio must not phone home)."""
    from playwright.sync_api import sync_playwright

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        hosts = set()
        page.on("request", lambda request: hosts.add(urlparse(request.url).netloc))
        page.goto(server.url)
        # Opened long before the Seed is typed: the accordion mounts its controls when it opens, and a
        # value typed within moments of that was reset to the control's starting value (6 of 8 tries:
        # the run then went ahead with seed 0 and no message came).
        page.get_by_role("button", name=re.compile("^Settings")).click()
        page.locator("#seed input").wait_for()

        page.locator("#content-upload input[type=file]").set_input_files(str(CONTENT))
        page.locator("#photo-1 img").wait_for(timeout=60_000)
        *_, photo_width, photo_height = shown_box(page, "#content-upload img")
        left, top, canvas_width, canvas_height, natural_width, natural_height = shown_box(page, "#photo-1 img")
        assert (photo_width, photo_height) == (64, 48)  # the upload box shows the photo itself
        assert (natural_width, natural_height) == (512, 384) and canvas_width >= 384  # enlarged: clickable
        page.locator("#style-1 input").click()
        page.get_by_role("option", name="DiffStyler (LoRA smoke)").click()
        click_photo_pixel(page, "#photo-1 img", (64, 48), *INCLUDE_POINT)
        page.locator("#kind-1").get_by_label("exclude").check()
        click_photo_pixel(page, "#photo-1 img", (64, 48), *EXCLUDE_POINT)
        canvas = fetched_image(page, page.locator("#photo-1 img").get_attribute("src"))
        for label, (x, y) in ((1, INCLUDE_POINT), (0, EXCLUDE_POINT)):
            centre_x, centre_y = mark_centre(canvas, label)
            assert abs(centre_x - (8 * x + 3.5)) <= 0.5 and abs(centre_y - (8 * y + 3.5)) <= 0.5, (label, centre_x, centre_y)

        page.locator("#style-upload input[type=file]").set_input_files(str(not_an_image))
        message = toast(page)
        assert message == "not a readable image (Style image): not an image file (PNG, JPEG, WebP, ...), or a damaged one"

        page.locator("#seed input").fill(str(10**20))
        assert page.locator("#seed input").input_value() == str(10**20)
        page.locator("#run").click()
        assert toast(page).startswith("invalid value (Seed): must be a whole number from 0 to 4294967295, got 1")
        page.locator("#seed input").fill("0")
        page.locator("#run").click()
        page.locator("#results img, [data-testid=toast-body]").first.wait_for(timeout=RUN_TIMEOUT_MS)
        assert page.locator("[data-testid=toast-body]").count() == 0, page.locator("[data-testid=toast-text]").all_inner_texts()

        shown = {image.get_attribute("alt"): fetched_image(page, image.get_attribute("src")) for image in page.locator("#results img").all()}
        downloads = {link.get_attribute("download"): link.get_attribute("href") for link in page.locator("#downloads a[download]").all()}
        mask = np.asarray(fetched_image(page, downloads["1_smoke_mask.png"])) > 0
        composite_file = tmp_path / "composite.png"
        composite_file.write_bytes(page.request.get(downloads["composite.png"]).body())
        browser.close()

    assert hosts == {urlparse(server.url).netloc}
    assert np.array_equal(mask, expected_mask(server))
    assert 0 < mask.sum() < mask.size and mask[INCLUDE_POINT[1], INCLUDE_POINT[0]] and not mask[EXCLUDE_POINT[1], EXCLUDE_POINT[0]]
    upload_pixels = np.asarray(Image.open(CONTENT).convert("RGB"))
    assert list(shown) == ["content", "composite", "DiffStyler (LoRA smoke)"]
    for caption in ("composite", "DiffStyler (LoRA smoke)"):
        result = np.asarray(shown[caption].convert("RGB"))
        assert np.array_equal(result[~mask], upload_pixels[~mask]), caption
        assert not np.array_equal(result[mask], upload_pixels[mask]), caption  # styled inside
    settings = read_settings(composite_file)
    assert settings["Steps"] == 10 and settings["Seed"] == 0 and [style["name"] for style in settings["Styles"]] == ["smoke"]


def test_the_click_canvas_maps_clicks_on_a_1024_pixel_photo_back_to_its_pixels(chromium, tmp_path, monkeypatch):
    """A 1024 x 768 photo (a demo at resolution 1024, served from this process) is shown shrunk to
    fit the page; a click on its pixel (700, 300) marks that pixel, within the two pixels one screen
    pixel covers.

    Caught: the canvas enlarged or shrunk by a factor the click mapping does not undo (a whole
    factor computed as a fraction: the mark lands at twice or half the place), or x and y swapped."""
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "large.png"
    Image.open(CONTENT).convert("RGB").resize((1024, 768), Image.Resampling.NEAREST).save(photo)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    port = free_port()
    large = serve(read_demo_config(str(write_demo_config(tmp_path, resolution=1024, port=port))), block=False)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#content-upload input[type=file]").set_input_files(str(photo))
            page.locator("#photo-1 img").wait_for(timeout=60_000)
            *_, canvas_width, _, natural_width, natural_height = shown_box(page, "#photo-1 img")
            assert (natural_width, natural_height) == (1024, 768) and canvas_width < 1024  # shown shrunk to fit
            click_photo_pixel(page, "#photo-1 img", (1024, 768), 700, 300)
            canvas = fetched_image(page, page.locator("#photo-1 img").get_attribute("src"))
            browser.close()
    finally:
        large.close()
    centre_x, centre_y = mark_centre(canvas, 1)
    assert abs(centre_x - 700) <= 2 and abs(centre_y - 300) <= 2, (centre_x, centre_y)
