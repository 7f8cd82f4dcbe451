"""The demo page (Gradio Blocks) and its server.

`build_page` lays the page out and wires each control to a `DemoActions` method; `serve` loads the
model and the offered styles, then serves the page on `config.host` (127.0.0.1 by default), never
with a share link. Runs and trainings wait in one queue: one model, one job at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from diffstyler.demo.actions import MAX_STYLES, DemoActions
from diffstyler.demo.config import DemoConfig
from diffstyler.demo.regions import INCLUDE, POINT_LABELS, POINTS, REGION_MODES
from diffstyler.injection import INJECTION_PRESETS
from diffstyler.pipeline import DiffStylerPipeline

MODEL_QUEUE = "model"  # the concurrency group of everything that runs a model (FastSAM, training, stylizing)
ONE_AT_A_TIME = {"concurrency_id": MODEL_QUEUE, "concurrency_limit": 1}  # the others wait in the queue

INTRODUCTION = """# DiffStyler
Upload a photo, pick a style for each tab (or train one from an image), show each style where it goes
(click points or two box corners on the photo, type what it covers, or upload a mask), then **Run**.
Pixels outside every mask stay the photo's own."""


@dataclass
class StyleTab:
    """The controls of one style tab, in the order `DemoActions.run` reads them (`inputs`)."""

    style: gr.Dropdown
    mode: gr.Radio
    clicks: gr.State
    text: gr.Textbox
    mask_file: gr.File
    kind: gr.Radio
    photo: gr.Image
    clear: gr.Button

    @property
    def inputs(self) -> list:
        return [self.style, self.mode, self.clicks, self.text, self.mask_file]


def build_page(actions: DemoActions, config: DemoConfig) -> gr.Blocks:
    with gr.Blocks(title="DiffStyler", analytics_enabled=False) as page:
        gr.Markdown(INTRODUCTION)
        content = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Content photo", file_types=["image"], elem_id="content-upload")
                with gr.Accordion("Train a style from an image", open=False):
                    style_upload = gr.File(label="Style image", file_types=["image"], elem_id="style-upload")
                    style_name = gr.Textbox(label="Style name (default: the file's name)")
                    with gr.Row():
                        train_button = gr.Button("Train", elem_id="train")
                        cancel_button = gr.Button("Cancel training", elem_id="cancel-training")
                    training_status = gr.Markdown(elem_id="training-status")
            with gr.Column(scale=2):
                tabs = [style_tab(number, actions.style_names()) for number in range(1, MAX_STYLES + 1)]
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                steps = gr.Slider(1, 100, value=config.steps, step=1, label="Denoising steps")
                guidance = gr.Slider(1, 20, value=config.guidance_scale, step=0.5, label="Guidance scale")
                seed = gr.Number(value=config.seed, precision=0, minimum=0, label="Seed")
            with gr.Row():
                preset = gr.Dropdown(list(INJECTION_PRESETS), value=config.preset, label="Injection preset")
                feature_steps = gr.Slider(0, 100, value=config.feature_steps, step=1, label="Feature injection: first steps")
                attention_steps = gr.Slider(0, 100, value=config.attention_steps, step=1, label="Attention injection: first steps")
        run_button = gr.Button("Run", variant="primary", elem_id="run")
        results = gr.Gallery(label="Content, composite and each style", columns=MAX_STYLES + 2, object_fit="contain",
                             buttons=["download", "fullscreen"], elem_id="results")
        downloads = gr.File(label="PNGs with their settings, and the masks", file_count="multiple", elem_id="downloads")

        photo_loaded = gr.on([upload.upload, upload.clear], actions.load_content, [upload], [content], concurrency_limit=None)
        for tab in tabs:
            region = [tab.mode, tab.text, tab.mask_file]
            photo_loaded.success(actions.clear_clicks, [content, *region], [tab.clicks, tab.photo], **ONE_AT_A_TIME)
            tab.photo.select(actions.click, [content, tab.clicks, tab.mode, tab.kind, tab.text, tab.mask_file],
                             [tab.clicks, tab.photo], **ONE_AT_A_TIME)
            tab.clear.click(actions.clear_clicks, [content, *region], [tab.clicks, tab.photo], **ONE_AT_A_TIME)
            for change in (tab.mode.change, tab.text.submit, tab.mask_file.upload):
                change(actions.show_region, [content, tab.clicks, *region], [tab.photo], **ONE_AT_A_TIME)
        train_button.click(actions.train, [style_upload, style_name], [training_status, *[tab.style for tab in tabs]],
                           **ONE_AT_A_TIME)
        cancel_button.click(actions.cancel_training, None, [training_status], queue=False)
        run_button.click(actions.run, [content, steps, guidance, feature_steps, attention_steps, preset, seed,
                                       *[value for tab in tabs for value in tab.inputs]],
                         [results, downloads], **ONE_AT_A_TIME)
    page.queue()  # concurrent requests wait their turn (ONE_AT_A_TIME: one model event at once)
    return page


def style_tab(number: int, styles: list[str]) -> StyleTab:
    with gr.Tab(f"Style {number}"):
        style = gr.Dropdown(styles, value=None, label="Style", elem_id=f"style-{number}")
        with gr.Row():
            mode = gr.Radio(list(REGION_MODES), value=POINTS, label="Region", elem_id=f"mode-{number}")
            kind = gr.Radio(list(POINT_LABELS), value=INCLUDE, label="A click adds a point to", elem_id=f"kind-{number}")
        photo = gr.Image(label="Click the photo (the region is shown in red)", type="pil", format="png", interactive=False,
                         buttons=["fullscreen"], elem_id=f"photo-{number}")
        clear = gr.Button("Clear clicks", size="sm")
        text = gr.Textbox(label="Text prompt (region mode text)")
        mask_file = gr.File(label="Mask image (region mode mask file; white = styled)", file_types=["image"])
    return StyleTab(style, mode, gr.State([]), text, mask_file, kind, photo, clear)


def serve(config: DemoConfig) -> None:
    """Load the model and the offered styles, then serve the page until Ctrl-C."""
    pipe = DiffStylerPipeline.from_pretrained(config.model, device=config.device or default_device(),
                                              segmenter=config.segmenter, progress=False)
    actions = DemoActions(pipe, config)
    actions.load_offered_styles()
    page = build_page(actions, config)
    page.launch(server_name=config.host, server_port=config.port, share=False, max_file_size=f"{config.max_upload_mb}mb",
                allowed_paths=[str(actions.output_folder)], footer_links=[])


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
