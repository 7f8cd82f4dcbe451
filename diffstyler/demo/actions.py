"""What the demo page's buttons and clicks do: small functions that call the pipeline (or
`train_style`) and return what the page shows.

Each action turns a `UserError` into `gr.Error(its one line)` (`shown_in_page`), so a bad upload, an
empty mask or a missing choice is one message in the page, never a traceback. Anything else is a
bug and keeps Gradio's generic error.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
import torch
from lightning.pytorch import Callback
from PIL import Image

from diffstyler.demo.config import DemoConfig
from diffstyler.demo.regions import WHOLE_IMAGE, Click, add_click, mask_source, missing_input, preview
from diffstyler.errors import UserError
from diffstyler.images import load_image, resize_to_multiple
from diffstyler.injection import injection_config
from diffstyler.lora import StyleLoRAConfig
from diffstyler.outputs import lora_tag, save_result
from diffstyler.pipeline import DiffStylerPipeline, StylizationOutput
from diffstyler.training import train_style

MAX_STYLES = 3  # style tabs on the page
SLOT_INPUTS = 5  # per style tab, in this order: style, region mode, clicks, text, mask file

Progress = Callable[..., Any]  # gr.Progress: progress((done, total), desc=...)
Gallery = list[tuple[str, str]]  # (PNG path, caption)


def shown_in_page(action: Callable) -> Callable:
    """The action with its UserError shown as one line in the page (functools.wraps keeps the
    signature Gradio reads for gr.Progress, gr.Request and gr.SelectData)."""

    @functools.wraps(action)
    def run_action(*args, **kwargs):
        try:
            return action(*args, **kwargs)
        except UserError as error:
            raise gr.Error(error.line(), print_exception=False) from None

    return run_action


class TrainingCancelled(Exception):
    def __init__(self, step: int):
        super().__init__(f"cancelled at step {step}")
        self.step = step


class TrainingProgress(Callback):
    """Moves the page's progress bar after every training step, and ends the training (by raising,
    which Lightning passes on) once the page's cancel button has set `cancel`."""

    def __init__(self, progress: Progress, cancel: threading.Event, steps: int, name: str):
        self.progress, self.cancel, self.steps, self.name = progress, cancel, steps, name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.progress((trainer.global_step, self.steps), desc=f"training {self.name}")
        if self.cancel.is_set():
            raise TrainingCancelled(trainer.global_step)


class DemoActions:
    """The page's actions on one pipeline (the styles of `config.loras` loaded by `load_offered_styles`)."""

    def __init__(self, pipe: DiffStylerPipeline, config: DemoConfig):
        self.pipe = pipe
        self.config = config
        self.output_folder = Path(config.output_folder).resolve()
        self.cancel_requests: dict[str, threading.Event] = {}  # by Gradio session: the training it may cancel

    def load_offered_styles(self) -> list[str]:
        for folder in self.config.loras:
            self.pipe.load_style(folder)
        return self.style_names()

    def style_names(self) -> list[str]:
        return list(self.pipe.styles)

    # -- the photo and the regions ----------------------------------------------------------------

    @shown_in_page
    def load_content(self, file: Optional[str]) -> Optional[Image.Image]:
        """The uploaded photo at the demo's resolution: the image every click and mask refers to."""
        if file is None:
            return None
        return resize_to_multiple(load_image(file), self.config.resolution)

    @shown_in_page
    def show_region(self, content: Optional[Image.Image], clicks: list[Click], mode: str, text: Optional[str],
                    mask_file: Optional[str]) -> Optional[Image.Image]:
        """The photo with this style's mask over it, made as the run will make it (FastSAM for
        points, a box or text; the uploaded mask file), once the region is complete."""
        if content is None:
            return None
        return preview(content, self.region_mask(content, clicks, mode, text, mask_file), clicks, mode)

    @shown_in_page
    def click(self, content: Optional[Image.Image], clicks: list[Click], mode: str, kind: str, text: Optional[str],
              mask_file: Optional[str], evt: gr.SelectData) -> tuple[list[Click], Optional[Image.Image]]:
        """A click on the photo adds a point (include or exclude) or a box corner."""
        if content is None:
            raise UserError("no content photo", "Content photo", "upload a photo first")
        clicks = add_click(clicks, evt.index, kind)
        return clicks, self.show_region(content, clicks, mode, text, mask_file)

    @shown_in_page
    def clear_clicks(self, content: Optional[Image.Image], mode: str, text: Optional[str],
                     mask_file: Optional[str]) -> tuple[list[Click], Optional[Image.Image]]:
        return [], self.show_region(content, [], mode, text, mask_file)

    def region_mask(self, content: Image.Image, clicks: list[Click], mode: str, text: Optional[str],
                    mask_file: Optional[str]) -> Optional[torch.Tensor]:
        if missing_input(mode, clicks, text, mask_file) is not None:
            return None
        if mode == WHOLE_IMAGE:
            return torch.ones(content.height, content.width)
        return self.pipe.make_mask(mask_source(mode, clicks, text, mask_file, "region"), content)

    # -- training a style -------------------------------------------------------------------------

    @shown_in_page
    def train(self, style_file: Optional[str], name: Optional[str], request: gr.Request, progress=gr.Progress()) -> tuple:
        """Learn a LoRA from the uploaded style image (the progress bar counts its steps) and offer it
        in every style menu; the cancel button stops it after the current step, saving nothing."""
        if style_file is None:
            raise UserError("no style image", "Style image", "upload the image whose style to learn")
        load_image(style_file)  # a bad upload is one line now, not a failure inside the trainer
        name = self.new_style_name(name or Path(style_file).stem)
        folder = self.output_folder / "loras" / name
        cancel = self.cancel_requests[request.session_hash] = threading.Event()
        try:
            train_style(style_file, folder, steps=self.config.train_steps, model=self.config.model,
                        resolution=self.config.train_resolution, lora=StyleLoRAConfig(rank=self.config.train_rank),
                        accelerator=self.config.training_accelerator,
                        callbacks=[TrainingProgress(progress, cancel, self.config.train_steps, name)], progress=False)
        except TrainingCancelled as stop:  # the LoRA is written only when training ends: nothing to remove
            return f"Training of {name} cancelled at step {stop.step}; nothing was saved.", *self.style_menus()
        finally:
            self.cancel_requests.pop(request.session_hash, None)
        self.pipe.load_style(folder, name=name)
        return f"Trained {name} ({self.config.train_steps} steps, saved in {folder}): pick it in a style's menu.", *self.style_menus()

    @shown_in_page
    def cancel_training(self, request: gr.Request) -> str:
        cancel = self.cancel_requests.get(request.session_hash)
        if cancel is None:
            return "No training of yours is running."
        cancel.set()
        return "Cancelling after the current step..."

    def new_style_name(self, wanted: str) -> str:
        """A name for a new style, used by no loaded style and no folder under `loras/`."""
        base = file_stem(wanted) or "style"
        name, number = base, 1
        while name in self.pipe.styles or (self.output_folder / "loras" / name).exists():
            number += 1
            name = f"{base}_{number}"
        return name

    def style_menus(self) -> list[gr.Dropdown]:
        return [gr.Dropdown(choices=self.style_names()) for _ in range(MAX_STYLES)]

    # -- the run ----------------------------------------------------------------------------------

    @shown_in_page
    def run(self, content: Optional[Image.Image], steps: int, guidance_scale: float, feature_steps: int,
            attention_steps: int, preset: str, seed: int, progress=gr.Progress(), *slots: Any) -> tuple[Gallery, list[str]]:
        """Stylize the photo with each chosen style in its region. Shows the content, the composite
        and each style's image side by side; offers the PNGs (with their settings) and the masks.

        `slots` are the style tabs' inputs, SLOT_INPUTS each (Gradio passes the page's components in
        order; `progress` sits before them so that Gradio can fill it in)."""
        if content is None:
            raise UserError("no content photo", "Content photo", "upload a photo first")
        styles, masks = self.chosen_styles(slots)
        injection = dataclasses.replace(injection_config(preset, "preset"), feature_steps=int(feature_steps),
                                        attention_steps=int(attention_steps))
        progress(0, desc="inverting the photo")
        result = self.pipe(
            content, styles=styles, masks=masks if any(mask is not None for mask in masks) else None,
            num_inference_steps=int(steps), guidance_scale=float(guidance_scale), injection=injection, seed=int(seed),
            resolution=self.config.resolution,
            callback_on_step_end=lambda state: progress((state.step + 1, state.num_steps), desc="denoising"),
        )
        return self.save_run(content, result)

    def chosen_styles(self, slots: tuple) -> tuple[list[str], list[Optional[dict]]]:
        """The chosen styles' names and mask sources, tab by tab (a tab without a style is skipped)."""
        styles, masks = [], []
        for index in range(0, len(slots), SLOT_INPUTS):
            style, mode, clicks, text, mask_file = slots[index : index + SLOT_INPUTS]
            if style:
                styles.append(style)
                masks.append(mask_source(mode, clicks, text, mask_file, f"Style {index // SLOT_INPUTS + 1}"))
        if not styles:
            raise UserError("no style chosen", "Style 1", "pick a style in a style tab's menu (or train one from an image)")
        return styles, masks

    def save_run(self, content: Image.Image, result: StylizationOutput) -> tuple[Gallery, list[str]]:
        """The run's PNGs in a new folder: the content, the composite and each style's image (with
        the A1111 parameters and the JSON settings), and each style's mask."""
        self.output_folder.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.output_folder))
        styles = result.settings["Styles"]
        prompt = " | ".join(entry["prompt"] for entry in styles)
        negative = result.settings["Sampling"]["negative_prompt"]
        tags = " ".join(lora_tag(entry["name"], entry["scale"]) for entry in styles)

        def saved(image: Image.Image, name: str) -> str:
            return str(save_result(image, folder / name, prompt, negative, result.settings, tags=tags))

        content_path = folder / "content.png"
        content.save(content_path)
        shown, downloads = [(str(content_path), "content")], []
        if result.composite is not None:
            shown.append((saved(result.composite, "composite.png"), "composite"))
        for number, (entry, image, mask) in enumerate(zip(styles, result.images, result.masks), start=1):
            stem = f"{number}_{file_stem(entry['name'])}"
            shown.append((saved(image, f"{stem}.png"), entry["name"]))
            if mask is not None:
                mask.save(folder / f"{stem}_mask.png")
                downloads.append(str(folder / f"{stem}_mask.png"))
        return shown, [path for path, _ in shown[1:]] + downloads


def file_stem(name: str) -> str:
    """`name` as a file name part: letters, digits, `_` and `-` only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
