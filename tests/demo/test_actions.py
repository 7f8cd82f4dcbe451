"""The demo page's actions, called as Gradio calls them, on the tiny model (no browser, no server)."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel

from diffstyler.demo.actions import SERVER_FAULT, DemoActions, Session, read_upload, served_copies
from diffstyler.demo.config import read_demo_config
from diffstyler.demo.controls import MAX_IMAGE_STYLES, MAX_STYLES
from diffstyler.demo.page import MODEL_QUEUE, build_page, load_demo
from diffstyler.demo.regions import box_of
from diffstyler.injection import injection_config
from diffstyler.lora import LORA_WEIGHTS_NAME, StyleLoRAConfig
from diffstyler.masks import SegmenterConfig
from diffstyler.methods import StyleIDConfig
from diffstyler.outputs import read_parameters, read_settings
from diffstyler.training import train_style
from tests.demo.conftest import CONTENT, CONTENT_MASK, STYLE_IMAGE

STEPS = 4
NO_OTHER_STYLES = ("", "points", [], "", None) * (MAX_STYLES - 1)  # the other tabs' inputs: no style chosen
NO_REGIONS = ("points", "", None) * MAX_STYLES  # load_photo's inputs after the photo: each tab's mode, text, mask
STYLEID_AUTHORS = {"gamma": 0.75, "tau": 1.5, "adain": True}  # the page's StyleID controls at the authors' settings
SERVER_PATH = re.compile(r"/(tmp|work|root|home)\b|\.png|\.safetensors|DIFFSTYLER_|GRADIO_")


@pytest.fixture(scope="module")
def actions(demo_config_file, tmp_path_factory) -> DemoActions:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # where served copies go
        yield load_demo(read_demo_config(str(demo_config_file), train_steps=3, max_loaded_styles=1))


def uploaded(path: Path) -> dict:
    """A file as Gradio passes an upload on (its FileData)."""
    return {"path": str(path), "orig_name": path.name}


def load_photo(actions: DemoActions, path=CONTENT) -> Image.Image:
    content, shown, *_ = actions.load_photo(uploaded(path), *NO_REGIONS)
    return content


class Recorder:
    """Stands in for gr.Progress: records each (done, total) it is given."""

    def __init__(self, then=None):
        self.values, self.then = [], then

    def __call__(self, value, desc=None, **_):
        self.values.append(value)
        if self.then is not None:
            self.then()


def run(actions: DemoActions, session: Session, content, *tab, steps=STEPS, seed=3, images=None, **settings):
    """A run with one style (`tab`: its style, region mode, clicks, text, mask), the other tabs empty."""
    values = {"guidance": 7.5, "feature_steps": 2, "attention_steps": 2, "preset": "paper", **STYLEID_AUTHORS, **settings}
    return actions.run(session, images or {}, content, steps, values["guidance"], values["feature_steps"],
                       values["attention_steps"], values["preset"], seed, values["gamma"], values["tau"], values["adain"],
                       Recorder(), *tab, *NO_OTHER_STYLES)


def load_style_image(actions: DemoActions, session: Session, images: dict, tab_styles=(None,) * MAX_STYLES, path=STYLE_IMAGE):
    """The style image uploaded: (image, shown, LoRA name, the page's image styles, status, *menus)."""
    return actions.load_style_image(session, images, uploaded(path), *tab_styles)


def page_message(action, *args) -> str:
    """The message the page shows for an action that fails: gr.Error's one line."""
    with pytest.raises(gr.Error) as error:
        action(*args)
    assert "\n" not in error.value.message
    return error.value.message


def test_a_run_shows_content_composite_and_style_and_offers_pngs_with_their_settings(actions):
    """Caught: the composite shown without the content's pixels put back outside the mask; the
    gallery missing the content or a style; PNGs offered without their settings; step progress
    not reported, or off by one; results served from the output folder itself (every session's
    files under one served folder) instead of copies in a folder of their own; the LoRA's server
    path in the PNG's settings."""
    session, progress = Session(), Recorder()
    content = load_photo(actions)
    mask, shown_mask, _ = actions.tab(1).load_mask(uploaded(CONTENT_MASK), content, "mask file", [], "")
    gallery, downloads = actions.run(session, {}, content, STEPS, 7.5, 2, 2, "paper", 3, 0.75, 1.5, True, progress,
                                     "smoke", "mask file", [], "", mask, *NO_OTHER_STYLES)
    assert [caption for _, caption in gallery] == ["content", "composite", "DiffStyler (LoRA smoke)"]
    assert [Path(path).name for path in downloads] == ["composite.png", "1_smoke.png", "1_smoke_mask.png"]
    outside = np.asarray(Image.open(CONTENT_MASK)) == 0
    photo = np.asarray(content)
    for path, caption in gallery[1:]:
        result = np.asarray(Image.open(path).convert("RGB"))
        assert np.array_equal(result[outside], photo[outside]), caption
        assert not np.array_equal(result[~outside], photo[~outside]), caption
    settings = read_settings(downloads[0])
    assert (settings["Steps"], settings["Seed"], settings["CFG scale"]) == (STEPS, 3, 7.5)
    assert (settings["Injection"]["feature_steps"], settings["Injection"]["attention_steps"]) == (2, 2)
    assert [(style["name"], style["lora"], style["method"]) for style in settings["Styles"]] == [("smoke", "smoke", "diffstyler")]
    assert str(actions.output_folder.parent) not in json.dumps(settings)  # no server path (the LoRAs lie beside the outputs)
    assert read_parameters(downloads[1])["Steps"] == str(STEPS)
    assert progress.values == [0, 0] + [(step, STEPS) for step in range(1, STEPS + 1)]
    served = {Path(path).parent for path, _ in gallery} | {Path(path).parent for path in downloads}
    (folder,) = served
    assert re.fullmatch(r"[0-9a-f]{32}", folder.name) and not folder.is_relative_to(actions.output_folder)
    (run_folder,) = (actions.output_folder / session.folder).glob("run-*")
    assert sorted(path.name for path in run_folder.iterdir()) == ["1_smoke.png", "1_smoke_mask.png", "composite.png", "content.png"]


def pipeline_run(actions: DemoActions, content: Image.Image, styles: list, **call):
    """The pipeline's own run (the demo's settings: STEPS, guidance 7.5, the paper preset with windows
    of 2 steps, seed 3), the pipeline left with the styles it had (a PIL image in `styles` loads one)."""
    loaded, images = dict(actions.pipe.styles), dict(actions.pipe.style_images)
    injection = dataclasses.replace(injection_config("paper"), feature_steps=2, attention_steps=2)
    try:
        return actions.pipe(content, styles=styles, num_inference_steps=STEPS, guidance_scale=7.5, injection=injection,
                            seed=3, resolution=actions.config.resolution, **call)
    finally:
        actions.pipe.styles, actions.pipe.style_images = loaded, images


def rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_style_image_is_a_style_at_once_without_any_training(actions):
    """The uploaded style image is a style of the page at once (picked in the first free tab), and
    a run with it gives StyleID's result with the page's gamma, tau and AdaIN, captioned as StyleID,
    its settings naming it by the page's name.

    Caught: a LoRA trained (or an adapter added, or any LoRA loaded) for an image style; the image
    style left on the shared pipeline after the run (every page's images kept there); the StyleID
    controls not reaching the pipeline (the result is then the authors' settings'); a caption that
    does not name the method; the upload's path, or the pipeline's key for the image, in the
    settings as its `image`; a `<lora:>` tag written for an image style."""
    session, content = Session(), load_photo(actions)
    adapters, styles = list(actions.pipe.denoiser.peft_config), dict(actions.pipe.styles)
    image, shown, lora_name, images, status, *menus = load_style_image(actions, session, {}, (None, "smoke", None))
    assert status == ("style_stripes is a style of this page: StyleID (image style_stripes, no training), picked in "
                      "Style 1. Run, or train a LoRA from it below.")
    assert lora_name == "style_stripes_lora" and list(images) == ["style_stripes"] and shown is image
    assert [menu.value for menu in menus] == ["style_stripes", "smoke", None]
    assert all(menu.choices == [("DiffStyler (LoRA smoke)", "smoke"), ("StyleID (image style_stripes, no training)", "style_stripes")]
               for menu in menus)

    settings = {"gamma": 0.5, "tau": 2.0, "adain": False}
    gallery, downloads = run(actions, session, content, "style_stripes", "whole image", [], "", None, images=images, **settings)
    assert [caption for _, caption in gallery] == ["content", "StyleID (image style_stripes, no training)"]
    assert not (actions.output_folder / session.folder / "loras").exists()
    assert list(actions.pipe.denoiser.peft_config) == adapters and actions.pipe.styles == styles
    assert not actions.pipe.style_images
    expected = pipeline_run(actions, content, [images["style_stripes"]], styleid=StyleIDConfig(**settings)).images[0]
    assert np.array_equal(rgb(gallery[1][0]), np.asarray(expected))
    assert not np.array_equal(np.asarray(expected), np.asarray(pipeline_run(actions, content, [images["style_stripes"]]).images[0]))

    recorded = read_settings(downloads[0])
    (style,) = recorded["Styles"]
    assert {key: style[key] for key in ("name", "lora", "image", "method", "prompt")} == \
        {"name": "style_stripes", "lora": None, "image": "style_stripes", "method": "styleid", "prompt": ""}
    assert style["image_sha256"] == hashlib.sha256(images["style_stripes"].tobytes()).hexdigest()
    assert recorded["StyleID"] == {**settings, "layers": actions.pipe.resolve_styleid(None).layers}
    parameters = Image.open(downloads[0]).text["parameters"]
    assert not SERVER_PATH.search(json.dumps(recorded)) and not SERVER_PATH.search(parameters)
    assert "page-image-" not in parameters and "<lora:" not in parameters


def test_a_lora_style_and_an_image_style_in_two_tabs_keep_the_photo_outside_both_masks(actions, tmp_path):
    """A LoRA style in tab 1's mask and an image style in tab 2's: the composite is the pipeline's
    own for those two styles in those masks, keeps the photo's pixels outside both masks, and each
    result says which method made it.

    Caught: the tabs' styles or masks swapped, merged or one dropped (the composite then differs
    from the pipeline's, or the photo shows through a mask); the photo's pixels not put back
    outside the masks; an image style sent down DiffStyler's path or a LoRA style down StyleID's
    (captions and recorded methods); the image style's empty prompt or a `<lora:>` tag for it in
    the A1111 text; the LoRA's or the image's server path in the settings."""
    session, content = Session(), load_photo(actions)
    images = load_style_image(actions, session, {})[3]
    width, height = content.size
    left, right = np.zeros((height, width), bool), np.zeros((height, width), bool)
    left[:, : width // 3], right[:, 2 * width // 3:] = True, True  # a band in the middle stays the photo's
    tab_masks = []
    for number, region in ((1, left), (2, right)):
        Image.fromarray(region.astype(np.uint8) * 255).save(tmp_path / f"mask_{number}.png")
        tab_masks.append(actions.tab(number).load_mask(uploaded(tmp_path / f"mask_{number}.png"), content, "mask file", [], "")[0])
    gallery, downloads = actions.run(session, images, content, STEPS, 7.5, 2, 2, "paper", 3, 0.75, 1.5, True, Recorder(),
                                     "smoke", "mask file", [], "", tab_masks[0], "style_stripes", "mask file", [], "", tab_masks[1],
                                     "", "points", [], "", None)
    assert [caption for _, caption in gallery] == \
        ["content", "composite", "DiffStyler (LoRA smoke)", "StyleID (image style_stripes, no training)"]
    assert [Path(path).name for path in downloads] == \
        ["composite.png", "1_smoke.png", "2_style_stripes.png", "1_smoke_mask.png", "2_style_stripes_mask.png"]
    photo, composite = np.asarray(content), rgb(gallery[1][0])
    outside = ~left & ~right
    assert np.array_equal(composite[outside], photo[outside])
    assert not np.array_equal(composite[left], photo[left]) and not np.array_equal(composite[right], photo[right])
    expected = pipeline_run(actions, content, ["smoke", images["style_stripes"]], masks=[left, right]).composite
    assert np.array_equal(composite, np.asarray(expected))

    recorded = read_settings(downloads[0])
    assert [(style["name"], style["method"], style["lora"], style["image"]) for style in recorded["Styles"]] == \
        [("smoke", "diffstyler", "smoke", None), ("style_stripes", "styleid", None, "style_stripes")]
    assert read_parameters(downloads[0])["prompt"] == f"{actions.pipe.styles['smoke'].prompt} <lora:smoke:1>"
    assert not SERVER_PATH.search(json.dumps(recorded)) and not actions.pipe.style_images


def test_a_page_keeps_a_few_style_images_and_names_each_apart(actions):
    """Caught: image styles kept without bound in a page's state (every upload's pixels held for an
    hour); a new image style named as a style of the page already (two menu entries, one value);
    a tab left on a forgotten image style."""
    session, images = Session(styles=["style_stripes_3"]), {}
    tabs = (None, None, None)
    for _ in range(MAX_IMAGE_STYLES + 1):
        _, _, lora_name, images, status, *menus = load_style_image(actions, session, images, tabs)
        tabs = tuple(menu.value for menu in menus)
    assert list(images) == ["style_stripes_2", "style_stripes_4", "style_stripes_5"]  # _3 is the session's LoRA
    assert tabs == ("style_stripes_5", "style_stripes_2", "style_stripes_4")  # tab 1 held the forgotten style_stripes
    assert status.endswith("style_stripes is no longer offered (a page keeps 3 style images).")


@pytest.mark.parametrize(("values", "message"), [
    ({"seed": 10**20}, "invalid value (Seed): must be a whole number from 0 to 4294967295, got 100000000000000000000"),
    ({"seed": -1}, "invalid value (Seed): must be a whole number from 0 to 4294967295, got -1"),
    ({"steps": math.nan}, "invalid value (Denoising steps): must be a whole number from 1 to 100, got nan"),
    ({"steps": 10**400}, "invalid value (Denoising steps): must be a whole number from 1 to 100, got 1000000000000000000000000000000000000000... (401 characters)"),
    ({"steps": 2.5}, "invalid value (Denoising steps): must be a whole number from 1 to 100, got 2.5"),
    ({"steps": True}, "invalid value (Denoising steps): must be a whole number from 1 to 100, got True"),
    ({"guidance": math.inf}, "invalid value (Guidance scale): must be a number from 1 to 20, got inf"),
    ({"guidance": "7"}, "invalid value (Guidance scale): must be a number from 1 to 20, got '7'"),
    ({"feature_steps": 5}, f"injection window longer than the sampling (Feature injection: first steps): at most Denoising steps ({STEPS}), got 5"),
    ({"attention_steps": math.nan}, "invalid value (Attention injection: first steps): must be a whole number from 0 to 100, got nan"),
    ({"preset": "papr"}, "not one of the choices (Injection preset): choose one of paper, paper_code; got 'papr'"),
    ({"gamma": 1.5}, "invalid value (StyleID: query preservation (gamma)): must be a number from 0 to 1, got 1.5"),
    ({"gamma": None}, "invalid value (StyleID: query preservation (gamma)): must be a number from 0 to 1, got None"),
    ({"tau": 0}, "invalid value (StyleID: attention temperature (tau)): must be a number from 0.5 to 3, got 0"),
    ({"tau": math.nan}, "invalid value (StyleID: attention temperature (tau)): must be a number from 0.5 to 3, got nan"),
    ({"adain": "yes"}, "invalid value (StyleID: start from the style's statistics (AdaIN)): must be true or false, got 'yes'"),
    ({"adain": 1}, "invalid value (StyleID: start from the style's statistics (AdaIN)): must be true or false, got 1"),
])
def test_every_setting_from_the_page_or_a_script_is_checked_and_names_its_control(actions, values, message):
    """Caught: a value used unchecked (a seed of 10**20 overflows in torch.manual_seed, NaN steps
    fail in int(): Gradio's bare "Error"), or a message naming a config key instead of the control."""
    values = {"steps": STEPS, "seed": 3, **values}
    steps, seed = values.pop("steps"), values.pop("seed")
    with pytest.raises(gr.Error) as error:
        run(actions, Session(), load_photo(actions), "smoke", "whole image", [], "", None, steps=steps, seed=seed, **values)
    assert error.value.message == message


def test_styles_regions_and_texts_are_checked_per_tab_and_named_with_their_tab(actions):
    """Caught: a style name outside the session's menu used (another session's style, or a path
    on the server), a region mode or text used unchecked, a message naming no tab."""
    content = load_photo(actions)
    theirs = Session(styles=["theirs"])
    mine = Session()
    assert actions.style_names(theirs) == ["smoke", "theirs"] and actions.style_names(mine) == ["smoke"]
    cases = [
        (("theirs", "whole image", [], "", None), "not one of the choices (Style 1 › Style): choose one of smoke; got 'theirs'"),
        (("/etc/passwd", "whole image", [], "", None), "not one of the choices (Style 1 › Style): choose one of smoke; got '/etc/passwd'"),
        (("smoke", "everything", [], "", None), "not one of the choices (Style 1 › Region): choose one of points, box, text, mask file, whole image; got 'everything'"),
        (("smoke", "text", [], "x" * 301, None), "text too long (Style 1 › Text prompt (region mode text)): at most 300 characters, got 301"),
        (("smoke", "points", [], "", None), "no point clicked (Style 1 › Click the photo (the region is shown in red)): click the photo inside the region (or choose another region mode)"),
        (("", "points", [], "", None), "no style chosen (Style 1 › Style): pick a style in a style tab's menu (or upload a style image)"),
    ]
    for tab, message in cases:
        with pytest.raises(gr.Error) as error:
            run(actions, mine, content, *tab)
        assert error.value.message == message


def test_bad_uploads_are_one_line_naming_the_control_and_no_server_path(actions, tmp_path, monkeypatch):
    """Caught: an upload's temporary path in the message (a server path), the remedy of setting a
    server's environment variable shown to the page's user, ultralytics' "No module named 'pi_heif'"
    for a file that is not an image once FastSAM has loaded, an empty mask named by its file."""
    not_an_image = tmp_path / "photo.png"
    not_an_image.write_text("not pixels")
    empty_mask = tmp_path / "mask.png"
    Image.new("L", (64, 48)).save(empty_mask)
    actions.pipe.segmenter()  # FastSAM loaded: ultralytics now patches PIL.Image.open
    content = load_photo(actions)
    messages = [
        page_message(actions.load_photo, {"url": "data:image/png;base64,iVBORw0KGgo="}, *NO_REGIONS),
        page_message(actions.load_photo, uploaded(not_an_image), *NO_REGIONS),
        page_message(actions.load_style_image, Session(), {}, uploaded(not_an_image), None, None, None),
        page_message(actions.tab(2).load_mask, uploaded(not_an_image), content, "mask file", [], ""),
        page_message(actions.tab(1).load_mask, uploaded(empty_mask), content, "mask file", [], ""),
    ]
    monkeypatch.setenv("DIFFSTYLER_MAX_IMAGE_PIXELS", "1000")
    messages.append(page_message(actions.load_photo, uploaded(CONTENT), *NO_REGIONS))
    assert messages == [
        "not an uploaded file (Content photo): upload the image as a file",
        "not a readable image (Content photo): not an image file (PNG, JPEG, WebP, ...), or a damaged one",
        "not a readable image (Style image): not an image file (PNG, JPEG, WebP, ...), or a damaged one",
        "not a readable image (Style 2 › Mask image (region mode mask file; white = styled)): not an image file (PNG, JPEG, WebP, ...), or a damaged one",
        "empty mask (Style 1 › Mask image (region mode mask file; white = styled)): no pixel would be styled",
        "image too large (Content photo): more than 1000 pixels",
    ]


def test_a_fault_of_the_servers_setup_is_told_to_its_console_not_to_the_page(actions, tmp_path, monkeypatch, capsys):
    """Caught: the server's paths and remedies (here: where the FastSAM weights should be) shown to
    whoever uses the page."""
    monkeypatch.setattr(actions.pipe, "segmenter_config", SegmenterConfig(weights=str(tmp_path / "FastSAM-s.pt")))
    monkeypatch.setattr(actions.pipe, "_segmenter", None)
    content = load_photo(actions)
    capsys.readouterr()
    click = gr.SelectData(None, {"index": [8, 8], "value": None})
    assert page_message(actions.tab(1).click, content, "points", "include", [], "", None, click) == SERVER_FAULT
    console = capsys.readouterr().err
    assert console.startswith("diffstyler demo: ") and str(tmp_path / "FastSAM-s.pt") in console


def test_uploads_are_deleted_once_read_and_results_are_served_from_folders_of_their_own(tmp_path, monkeypatch):
    """Caught: uploads left on the server until it exits; a file that is not an upload (a script's
    own) deleted; served copies in one folder, or in folders with guessable names."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    upload = tmp_path / "gradio" / "0a1b" / "photo.png"
    upload.parent.mkdir(parents=True)
    shutil.copyfile(CONTENT, upload)
    assert read_upload(uploaded(upload), "Content photo").size == (64, 48)
    assert not upload.parent.exists()
    mine = tmp_path / "mine.png"
    shutil.copyfile(CONTENT, mine)
    read_upload(uploaded(mine), "Content photo")
    assert mine.is_file()
    first, second = served_copies([(mine, "a.png")]), served_copies([(mine, "a.png")])
    folders = {Path(first[0]).parent, Path(second[0]).parent}
    assert len(folders) == 2 and all(folder.parent == tmp_path / "gradio" and re.fullmatch(r"[0-9a-f]{32}", folder.name) for folder in folders)


def live(kind: type) -> int:
    gc.collect()
    return sum(type(thing) is kind for thing in gc.get_objects())


def pixels(gallery) -> np.ndarray:
    return np.asarray(Image.open(gallery[1][0]))


@pytest.mark.slow
def test_training_in_the_page_uses_the_loaded_model_and_changes_nothing_else(actions, tmp_path):
    """A training in the page, from the page's style image, counts its steps, offers the LoRA in
    this session's menus only (beside the image style), serves its LoRA to this session, and can be
    cancelled.

    Caught: a second base model built for the training (two UNets, VAEs or text encoders alive
    while it trains); the training's adapter left on the UNet, or the UNet left in train mode or
    trainable (a predict of an existing style afterwards differs); another style active while
    it trains (its LoRA then differs from one trained on a fresh model); loaded
    styles not bounded (`max_loaded_styles`); the progress bar not moving with the steps; the
    cancel button ignored, or a cancelled half-trained LoRA offered or left on disk; a LoRA named
    as one of the page's image styles (two menu entries with one value)."""
    session, content = Session(), load_photo(actions)
    before = pixels(run(actions, session, content, "smoke", "whole image", [], "", None)[0])
    def models_alive() -> tuple[int, int, int]:  # in this process: other tests' models may be alive too
        return live(UNet2DConditionModel), live(AutoencoderKL), live(CLIPTextModel)

    alive, models_before = [], models_alive()
    progress = Recorder(then=lambda: alive.append(models_alive()))
    image, _, _, images, *_ = load_style_image(actions, session, {})
    message, session, lora, *menus = actions.train(session, images, image, "stripes", progress)
    assert alive == [models_before] * 3 and min(models_before) >= 1
    assert message == "Trained stripes (3 steps): pick it in a style's menu. It is offered in this page only; download its LoRA below."
    assert progress.values == [(1, 3), (2, 3), (3, 3)]
    assert session.styles == ["stripes"] and actions.style_names(Session()) == ["smoke"]
    offered = [("DiffStyler (LoRA smoke)", "smoke"), ("DiffStyler (LoRA stripes)", "stripes"),
               ("StyleID (image style_stripes, no training)", "style_stripes")]
    assert len(menus) == MAX_STYLES and all(menu.choices == offered for menu in menus)
    unet = actions.pipe.denoiser
    (loaded,) = actions.pipe.adapters.loaded  # max_loaded_styles 1: smoke unloaded; the training's adapter deleted
    assert list(unet.peft_config) == list(actions.pipe.adapters.loaded.values()) and "stripes" in loaded[0]
    assert not unet.training and not [name for name, parameter in unet.named_parameters() if parameter.requires_grad and "lora_" not in name]
    after = pixels(run(actions, session, content, "smoke", "whole image", [], "", None)[0])
    assert np.array_equal(before, after)

    page_lora = load_file(lora)
    style_png = actions.output_folder / session.folder / "styles" / "stripes.png"
    fresh = train_style(str(style_png), tmp_path / "fresh", steps=3, model="tiny", resolution=64, lora=StyleLoRAConfig(rank=4),
                        accelerator="cpu", progress=False)
    fresh_lora = load_file(fresh / LORA_WEIGHTS_NAME)
    assert page_lora.keys() == fresh_lora.keys() and all(torch.equal(page_lora[key], fresh_lora[key]) for key in fresh_lora)

    cancelling = Recorder(then=lambda: actions.cancel_training(session))  # the button pressed during step 1
    message, session, lora, *menus = actions.train(session, images, image, "style_stripes", cancelling)  # the image style's name
    assert message == "Training of style_stripes_2 cancelled at step 1; nothing was saved." and lora is None
    assert cancelling.values == [(1, 3)]
    assert session.styles == ["stripes"] and "style_stripes_2" not in actions.pipe.styles
    assert not (actions.output_folder / session.folder / "loras" / "style_stripes_2").exists()
    assert not (actions.output_folder / session.folder / "styles" / "style_stripes_2.png").exists()
    assert actions.cancel_training(session) == "No training of yours is running."


def test_style_names_from_a_script_are_bounded_before_anything_is_written(actions):
    """Caught: a 300-character name reaching the file system (OSError: file name too long, which
    the page showed as a bare "Error")."""
    session = Session()
    style = load_style_image(actions, session, {})[0]
    assert page_message(actions.train, session, {}, style, "x" * 300) == "text too long (LoRA name): at most 64 characters, got 300"
    assert page_message(actions.train, session, {}, style, {"a": 1}) == "invalid value (LoRA name): must be text, got {'a': 1}"
    assert not (actions.output_folder / session.folder).exists()


def test_two_clicks_make_the_box_around_both_corner_pixels():
    """Caught: corners taken in click order (a box dragged up or left is empty) or the far corner
    pixel left out of the box."""
    assert box_of([[10, 5, 1], [3, 20, 1]]) == [3, 5, 11, 21]


def test_everything_that_decodes_or_runs_a_model_waits_in_one_bounded_queue(actions):
    """Caught: an event that decodes an upload or runs FastSAM, training or the UNet outside the
    shared queue (two sessions' runs at once on one pipeline, or any number of large decodes at
    once), a queue that lets two run together, or a queue without a maximum size; Gradio's own
    preprocessing left on (it checks values first, naming no control, and lets NaN through)."""
    page = build_page(actions, actions.config)
    names = {"load_photo", "load_style_image", "load_mask", "click", "show_region", "clear_clicks", "train", "run"}
    model_events = [fn for fn in page.fns.values() if getattr(fn.fn, "__name__", None) in names]
    assert {fn.fn.__name__ for fn in model_events} == names
    assert len(model_events) == 3 + 4 * MAX_STYLES + 1  # load_photo, load_style_image, train, run; each tab's four
    assert all(fn.concurrency_id == MODEL_QUEUE and fn.concurrency_limit == 1 and not fn.preprocess for fn in model_events)
    assert page._queue.max_size == actions.config.max_queue
