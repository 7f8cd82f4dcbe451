"""The demo page's actions, called as Gradio calls them, on the tiny model (no browser)."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from diffstyler import DiffStylerPipeline
from diffstyler.demo.actions import MAX_STYLES, DemoActions
from diffstyler.demo.config import read_demo_config
from diffstyler.demo.page import MODEL_QUEUE, build_page
from diffstyler.demo.regions import box_of
from diffstyler.outputs import read_parameters, read_settings
from tests.demo.conftest import CONTENT, CONTENT_MASK, STYLE_IMAGE

STEPS = 4
NO_OTHER_STYLES = ("", "points", [], "", None) * (MAX_STYLES - 1)  # the other tabs' inputs: no style chosen


@pytest.fixture(scope="module")
def actions(demo_config_file) -> DemoActions:
    config = read_demo_config(str(demo_config_file), train_steps=3)
    pipe = DiffStylerPipeline.from_pretrained(config.model, device=config.device, segmenter=config.segmenter, progress=False)
    demo = DemoActions(pipe, config)
    demo.load_offered_styles()
    return demo


class Recorder:
    """Stands in for gr.Progress: records each (done, total) it is given."""

    def __init__(self, then=None):
        self.values, self.then = [], then

    def __call__(self, value, desc=None, **_):
        self.values.append(value)
        if self.then is not None:
            self.then()


def run_with_mask_file(actions: DemoActions, progress: Recorder):
    content = actions.load_content(str(CONTENT))
    return content, actions.run(content, STEPS, 7.5, 2, 2, "paper", 3, progress, "smoke", "mask file", [], "", str(CONTENT_MASK),
                                *NO_OTHER_STYLES)


def test_a_run_shows_content_composite_and_style_and_offers_pngs_with_their_settings(actions):
    """Caught: the composite shown without the content's pixels put back outside the mask; the
    gallery missing the content or a style; PNGs offered without their settings; step progress
    not reported, or off by one."""
    progress = Recorder()
    content, (gallery, downloads) = run_with_mask_file(actions, progress)
    assert [caption for _, caption in gallery] == ["content", "composite", "smoke"]
    assert [path.rsplit("/", 1)[1] for path in downloads] == ["composite.png", "1_smoke.png", "1_smoke_mask.png"]
    outside = np.asarray(Image.open(CONTENT_MASK)) == 0
    photo = np.asarray(content)
    for path, caption in gallery[1:]:
        result = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(result[outside], photo[outside]), caption
        assert not np.array_equal(result[~outside], photo[~outside]), caption
    settings = read_settings(downloads[0])
    assert (settings["Steps"], settings["Seed"], settings["CFG scale"]) == (STEPS, 3, 7.5)
    assert (settings["Injection"]["feature_steps"], settings["Injection"]["attention_steps"]) == (2, 2)
    assert [style["name"] for style in settings["Styles"]] == ["smoke"]
    assert read_parameters(downloads[1])["Steps"] == str(STEPS)
    assert progress.values == [0] + [(step, STEPS) for step in range(1, STEPS + 1)]


def page_message(action, *args) -> str:
    """The message the page shows for an action that fails: gr.Error's one line."""
    with pytest.raises(gr.Error) as error:
        action(*args)
    assert "\n" not in error.value.message
    return error.value.message


def test_bad_uploads_and_missing_choices_are_one_line_in_the_page(actions, tmp_path, monkeypatch):
    """Caught: an action whose UserError reaches Gradio as it is (the page then shows a bare
    'Error' and the console a traceback) instead of gr.Error with the error's one line."""
    not_an_image = tmp_path / "photo.png"
    not_an_image.write_text("not pixels")
    empty_mask = tmp_path / "mask.png"
    Image.new("L", (64, 48)).save(empty_mask)
    content = actions.load_content(str(CONTENT))
    assert page_message(actions.load_content, str(not_an_image)).startswith(f"not a readable image ({not_an_image})")
    assert page_message(actions.show_region, content, [], "mask file", "", str(empty_mask)).startswith(f"empty mask (mask file '{empty_mask}')")
    no_style = (content, STEPS, 7.5, 2, 2, "paper", 0, Recorder(), *NO_OTHER_STYLES, "", "points", [], "", None)
    assert page_message(actions.run, *no_style).startswith("no style chosen (Style 1)")
    no_click = (content, STEPS, 7.5, 2, 2, "paper", 0, Recorder(), "smoke", "points", [], "", None, *NO_OTHER_STYLES)
    assert page_message(actions.run, *no_click).startswith("no point clicked (Style 1)")
    monkeypatch.setenv("DIFFSTYLER_MAX_IMAGE_PIXELS", "1000")
    assert page_message(actions.load_content, str(CONTENT)).startswith(f"image too large ({CONTENT})")


@pytest.mark.slow
def test_training_in_the_page_counts_its_steps_offers_the_style_and_can_be_cancelled(actions):
    """Caught: the progress bar not moving with the steps; a trained style not offered in the menus;
    the cancel button ignored (training runs to the end), or a cancelled half-trained LoRA offered
    or left on disk."""
    request = gr.Request(session_hash="tester")
    progress = Recorder()
    message, *menus = actions.train(str(STYLE_IMAGE), "stripes", request, progress)
    assert message.startswith("Trained stripes (3 steps")
    assert progress.values == [(1, 3), (2, 3), (3, 3)]
    assert len(menus) == MAX_STYLES and all([choice[0] for choice in menu.choices] == ["smoke", "stripes"] for menu in menus)
    assert (actions.output_folder / "loras" / "stripes" / "pytorch_lora_weights.safetensors").is_file()

    cancelling = Recorder(then=lambda: actions.cancel_training(request))  # the button pressed during step 1
    message, *menus = actions.train(str(STYLE_IMAGE), "stripes", request, cancelling)
    assert message == "Training of stripes_2 cancelled at step 1; nothing was saved."
    assert cancelling.values == [(1, 3)]
    assert "stripes_2" not in actions.style_names() and not (actions.output_folder / "loras" / "stripes_2").exists()
    assert actions.cancel_training(request) == "No training of yours is running."


def test_two_clicks_make_the_box_around_both_corner_pixels():
    """Caught: corners taken in click order (a box dragged up or left is empty) or the far corner
    pixel left out of the box."""
    assert box_of([[10, 5, 1], [3, 20, 1]]) == [3, 5, 11, 21]


def test_everything_that_runs_a_model_waits_in_one_queue(actions):
    """Caught: an event that runs FastSAM, training or the UNet outside the shared queue (two
    sessions' runs at once on one pipeline), or a queue that lets two run together."""
    page = build_page(actions, actions.config)
    names = {"click", "show_region", "clear_clicks", "train", "run"}
    model_events = [fn for fn in page.fns.values() if getattr(fn.fn, "__name__", None) in names]
    assert {fn.fn.__name__ for fn in model_events} == names
    assert all(fn.concurrency_id == MODEL_QUEUE and fn.concurrency_limit == 1 for fn in model_events)
