"""The demo page (Gradio Blocks) and its server.

`build_page` lays the page out and wires each control to a `DemoActions` method; `serve` loads the
model and the offered styles, then serves the page on `config.host` (127.0.0.1 by default), never
with a share link and without serving any folder of the server by path.

Everything that decodes an upload or runs a model (FastSAM, training, stylizing) waits in one
queue and runs one at a time: the memory of a few large uploads at once is that of one. The queue
holds at most `config.max_queue` waiting requests; beyond them a request is told the demo is busy
(Gradio's "Queue is full" / "This application is currently busy. Please try again.").

A page's photo, style image and masks live in its session for `PAGE_STATE_LIFETIME_S` after their
last change, at most `config.max_sessions` sessions are kept (the least recently used is forgotten
first), and the files served to pages are deleted after `SERVED_FILES_LIFETIME_S`.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from diffstyler.demo.actions import DemoActions, new_session
from diffstyler.demo.config import DemoConfig
from diffstyler.demo.controls import (
    ATTENTION_STEPS, CANVAS, CLICK_KIND, FEATURE_STEPS, GUIDANCE, LORA_NAME, MASK_IMAGE, MAX_STYLES, PHOTO, PRESET,
    REGION, REGION_TEXT, SEED, STEPS, STYLE, STYLE_IMAGE, STYLEID_ADAIN, STYLEID_GAMMA, STYLEID_TAU, tab_name,
)
from diffstyler.demo.regions import INCLUDE, POINT_LABELS, POINTS, REGION_MODES
from diffstyler.injection import INJECTION_PRESETS
from diffstyler.pipeline import DiffStylerPipeline

MODEL_QUEUE = "model"  # the concurrency group of everything that decodes an upload or runs a model
# Every event: one at a time in the model's queue (the others wait), and the values as the page (or a
# script) sent them: Gradio's own checks name no control ("Value 1e+20 is greater than maximum value
# 100."), let NaN through, and decode an image upload outside the queue; the actions check every value
# (`controls`) and decode uploads themselves. Gradio still refuses a file outside its upload folder.
ONE_AT_A_TIME = {"concurrency_id": MODEL_QUEUE, "concurrency_limit": 1, "preprocess": False}
PAGE_STATE_LIFETIME_S = 3600  # a page's photo, masks and style image, after their last change
SESSION_LIFETIME_S = 24 * 3600  # which styles a page trained, and its folder's name
SERVED_FILES_LIFETIME_S = 24 * 3600  # results and LoRAs served to pages (checked hourly)

INTRODUCTION = """# DiffStyler
Upload a photo, pick a style for each tab, show each style where it goes (click points or two box
corners on the photo, type what it covers, or upload a mask), then **Run**. Pixels outside every
mask stay the photo's own. A style image is a style at once (StyleID, no training); train a LoRA
from it for DiffStyler. Each result says which method made it."""


def image_upload(label: str, elem_id: str) -> gr.Image:
    """An image upload, shown as the image; its events get the file's FileData, undecoded
    (`ONE_AT_A_TIME`: preprocess off), and decode it in the queue (`actions.read_upload`)."""
    return gr.Image(label=label, elem_id=elem_id, type="filepath", sources=["upload"], format="png", buttons=[])


@dataclass
class StyleTab:
    """The controls of one style tab, in the order `DemoActions.run` reads them (`inputs`)."""

    number: int
    style: gr.Dropdown
    mode: gr.Radio
    kind: gr.Radio
    canvas: gr.Image
    clear: gr.Button
    text: gr.Textbox
    mask_upload: gr.Image
    clicks: gr.State
    mask: gr.State

    @property
    def inputs(self) -> list:
        return [self.style, self.mode, self.clicks, self.text, self.mask]

    @property
    def region(self) -> list:
        """What its region is made of, as `DemoActions.load_photo` takes it."""
        return [self.mode, self.text, self.mask]


def build_page(actions: DemoActions, config: DemoConfig) -> gr.Blocks:
    served_files = (3600, SERVED_FILES_LIFETIME_S)  # Gradio checks hourly, and at exit deletes them all
    with gr.Blocks(title="DiffStyler", analytics_enabled=False, delete_cache=served_files) as page:
        gr.Markdown(INTRODUCTION)
        session = gr.State(new_session, time_to_live=SESSION_LIFETIME_S)
        content = gr.State(None, time_to_live=PAGE_STATE_LIFETIME_S)
        style_image = gr.State(None, time_to_live=PAGE_STATE_LIFETIME_S)
        image_styles = gr.State(dict, time_to_live=PAGE_STATE_LIFETIME_S)  # actions.ImageStyles
        with gr.Row():
            with gr.Column(scale=1):
                upload = image_upload(PHOTO, "content-upload")
                with gr.Accordion("A style from an image: at once (StyleID), or train a LoRA", open=True):
                    style_upload = image_upload(STYLE_IMAGE, "style-upload")
                    training_status = gr.Markdown(elem_id="training-status")
                    style_name = gr.Textbox(label=LORA_NAME.label, placeholder="the file's name + _lora",
                                            max_length=LORA_NAME.max_length, elem_id="style-name")
                    with gr.Row():
                        train_button = gr.Button("Train a LoRA from this image", elem_id="train")
                        cancel_button = gr.Button("Cancel training", elem_id="cancel-training")
                    trained_lora = gr.File(label="Your LoRA (diffusers format)", interactive=False, elem_id="trained-lora")
            with gr.Column(scale=2):
                tabs = [style_tab(number, actions.style_choices(None, {})) for number in range(1, MAX_STYLES + 1)]
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                steps = gr.Slider(STEPS.minimum, STEPS.maximum, value=config.steps, step=1, label=STEPS.label, elem_id="steps")
                guidance = gr.Slider(GUIDANCE.minimum, GUIDANCE.maximum, value=config.guidance_scale, step=0.5,
                                     label=GUIDANCE.label, elem_id="guidance")
                seed = gr.Number(value=config.seed, precision=0, label=SEED.label, elem_id="seed")
            with gr.Row():
                preset = gr.Dropdown(list(INJECTION_PRESETS), value=config.preset, label=PRESET)
                feature_steps = gr.Slider(FEATURE_STEPS.minimum, FEATURE_STEPS.maximum, value=config.feature_steps, step=1,
                                          label=FEATURE_STEPS.label)
                attention_steps = gr.Slider(ATTENTION_STEPS.minimum, ATTENTION_STEPS.maximum, value=config.attention_steps,
                                            step=1, label=ATTENTION_STEPS.label)
            with gr.Row():  # image styles' (StyleID reads no guidance scale, preset or injection window)
                gamma = gr.Slider(STYLEID_GAMMA.minimum, STYLEID_GAMMA.maximum, value=config.styleid_gamma, step=0.05,
                                  label=STYLEID_GAMMA.label, elem_id="styleid-gamma")
                tau = gr.Slider(STYLEID_TAU.minimum, STYLEID_TAU.maximum, value=config.styleid_tau, step=0.05,
                                label=STYLEID_TAU.label, elem_id="styleid-tau")
                adain = gr.Checkbox(value=config.styleid_adain, label=STYLEID_ADAIN, elem_id="styleid-adain")
        run_button = gr.Button("Run", variant="primary", elem_id="run")
        results = gr.Gallery(label="Content, composite and each style (its caption: the method that made it)",
                             columns=MAX_STYLES + 2, object_fit="contain",
                             buttons=["download", "fullscreen"], elem_id="results")
        downloads = gr.File(label="PNGs with their settings, and the masks", file_count="multiple", elem_id="downloads")

        gr.on([upload.upload, upload.clear], actions.load_photo, [upload, *[c for tab in tabs for c in tab.region]],
              [content, upload, *[tab.clicks for tab in tabs], *[tab.canvas for tab in tabs]], api_name="load_photo",
              **ONE_AT_A_TIME)
        for tab in tabs:
            wire_tab(tab, actions, content)
        gr.on([style_upload.upload, style_upload.clear], actions.load_style_image,
              [session, image_styles, style_upload, *[tab.style for tab in tabs]],
              [style_image, style_upload, style_name, image_styles, training_status, *[tab.style for tab in tabs]],
              api_name="load_style_image", **ONE_AT_A_TIME)
        train_button.click(actions.train, [session, image_styles, style_image, style_name],
                           [training_status, session, trained_lora, *[tab.style for tab in tabs]], api_name="train",
                           **ONE_AT_A_TIME)
        cancel_button.click(actions.cancel_training, [session], [training_status], api_name="cancel_training", queue=False,
                            preprocess=False)
        run_button.click(actions.run, [session, image_styles, content, steps, guidance, feature_steps, attention_steps,
                                       preset, seed, gamma, tau, adain, *[value for tab in tabs for value in tab.inputs]],
                         [results, downloads], api_name="run", **ONE_AT_A_TIME)
    page.queue(max_size=config.max_queue, default_concurrency_limit=1)
    return page


def style_tab(number: int, styles: list[tuple[str, str]]) -> StyleTab:
    """A style tab; `styles`: its menu's choices (`DemoActions.style_choices`)."""
    with gr.Tab(tab_name(number)):
        style = gr.Dropdown(styles, value=None, label=STYLE, elem_id=f"style-{number}")
        with gr.Row():
            mode = gr.Radio(list(REGION_MODES), value=POINTS, label=REGION, elem_id=f"mode-{number}")
            kind = gr.Radio(list(POINT_LABELS), value=INCLUDE, label=CLICK_KIND, elem_id=f"kind-{number}")
        canvas = gr.Image(label=CANVAS, type="pil", format="png", interactive=False, buttons=["fullscreen"],
                          elem_id=f"photo-{number}")
        clear = gr.Button("Clear clicks", size="sm")
        text = gr.Textbox(label=REGION_TEXT.label, max_length=REGION_TEXT.max_length)
        mask_upload = image_upload(MASK_IMAGE, f"mask-{number}")
    return StyleTab(number, style, mode, kind, canvas, clear, text, mask_upload,
                    gr.State([], time_to_live=PAGE_STATE_LIFETIME_S), gr.State(None, time_to_live=PAGE_STATE_LIFETIME_S))


def wire_tab(tab: StyleTab, actions: DemoActions, content: gr.State) -> None:
    """A tab's events: a click on the canvas, clearing the clicks, a new region mode or text, a mask upload."""
    number, tab_actions = tab.number, actions.tab(tab.number)
    tab.canvas.select(tab_actions.click, [content, tab.mode, tab.kind, tab.clicks, tab.text, tab.mask],
                      [tab.clicks, tab.canvas], api_name=f"click_{number}", **ONE_AT_A_TIME)
    tab.clear.click(tab_actions.clear_clicks, [content, tab.mode, tab.text, tab.mask], [tab.clicks, tab.canvas],
                    api_name=f"clear_clicks_{number}", **ONE_AT_A_TIME)
    gr.on([tab.mode.change, tab.text.submit], tab_actions.show_region, [content, tab.mode, tab.clicks, tab.text, tab.mask],
          [tab.canvas], api_name=f"show_region_{number}", **ONE_AT_A_TIME)
    gr.on([tab.mask_upload.upload, tab.mask_upload.clear], tab_actions.load_mask,
          [tab.mask_upload, content, tab.mode, tab.clicks, tab.text], [tab.mask, tab.mask_upload, tab.canvas],
          api_name=f"load_mask_{number}", **ONE_AT_A_TIME)


def load_demo(config: DemoConfig) -> DemoActions:
    """The model (at most `config.max_loaded_styles` LoRAs loaded at once) and the offered styles."""
    pipe = DiffStylerPipeline.from_pretrained(config.model, device=config.device or default_device(),
                                              segmenter=config.segmenter, max_loaded_adapters=config.max_loaded_styles,
                                              progress=False)
    actions = DemoActions(pipe, config)
    actions.load_offered_styles()
    return actions


def serve(config: DemoConfig, block: bool = True) -> gr.Blocks:
    """Load the model and the offered styles, then serve the page until Ctrl-C (`block` False:
    serve it from another thread and return it; `close()` stops it)."""
    page = build_page(load_demo(config), config)
    page.launch(server_name=config.host, server_port=config.port, share=False, max_file_size=f"{config.max_upload_mb}mb",
                state_session_capacity=config.max_sessions, show_error=False, footer_links=[], prevent_thread_lock=not block,
                quiet=not block)
    return page


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
