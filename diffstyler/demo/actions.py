"""What the demo page's controls do: small functions that check what the page (or a script, through
Gradio's API) sent, call the pipeline, and return what the page shows.

Every value is checked before use (`controls`) and every message is one line naming a control of
the page. A `UserError` about a control becomes `gr.Error(its line)`; one about the server's own
setup (FastSAM weights missing, an output folder it cannot write) is printed on the server's console
and the page says only that the server failed: no server path and no server-side remedy reaches
whoever uses the page. Anything else is a bug and keeps Gradio's bare "Error".

Each page session (a browser tab, or a script's Gradio client) has a `Session` on the server: its
own folder under the output folder (a random name) and the styles it trained, which only its own
menus offer. A style image uploaded in a page is a style of that page at once (StyleID, no
training: `ImageStyles`), and the LoRA it trains from the same image is another (DiffStyler); the
menus and the results' captions say which method each style is (`method_label`). An upload is
decoded once, in the model's queue, and its file deleted then: the photo at the demo's resolution,
the style image at the larger of the demo's and the training's, a mask as its region. What the page
shows and offers for download are copies in a new folder with a random name in Gradio's upload
folder (`served_copies`): a session's results reach that session only, and the output folder
itself is never served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import secrets
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import gradio as gr
import numpy as np
import torch
from gradio.utils import get_upload_folder
from lightning.pytorch import Callback
from PIL import Image

from diffstyler.demo.config import DemoConfig
from diffstyler.demo.controls import (
    ATTENTION_STEPS, CANVAS, CLICK_KIND, FEATURE_STEPS, GUIDANCE, LORA_NAME, MASK_IMAGE, MAX_IMAGE_STYLES, MAX_STYLES,
    PHOTO, PRESET, REGION, REGION_TEXT, REGION_TEXT_LABEL, SEED, STEPS, STYLE, STYLE_IMAGE, STYLEID_ADAIN,
    STYLEID_GAMMA, STYLEID_TAU, check_choice, check_switch, check_window, in_tab, is_control, tab_name,
)
from diffstyler.demo.regions import (
    BOX, MASK_FILE, POINT_LABELS, POINTS, REGION_MODES, TEXT, WHOLE_IMAGE, Click, add_click, canvas, mask_source,
    missing_input, photo_pixel,
)
from diffstyler.errors import MissingFileError, UserError
from diffstyler.images import ImageLoadError, load_image, max_image_pixels, open_upright_image, resize_to_multiple, size_at_resolution
from diffstyler.injection import INJECTION_PRESETS, injection_config
from diffstyler.lora import LORA_WEIGHTS_NAME, StyleLoRAConfig
from diffstyler.masks import MaskError, hard_mask_from_image
from diffstyler.methods import StyleIDConfig
from diffstyler.outputs import lora_tag, save_result
from diffstyler.pipeline import DiffStylerPipeline, StylizationOutput
from diffstyler.training import train_style

TAB_INPUTS = 5  # per style tab, as `run` takes them: style, region mode, clicks, text, mask
SERVER_FAULT = ("the server could not do this (a problem with its setup, not with your input); "
                "whoever runs the demo finds the details in its console")
REGION_CONTROLS = {POINTS: CANVAS, BOX: CANVAS, TEXT: REGION_TEXT_LABEL, MASK_FILE: MASK_IMAGE}  # what a region error names

Progress = Callable[..., Any]  # gr.Progress: progress((done, total), desc=...)
Gallery = list[tuple[str, str]]  # (served PNG path, caption)
# A page's image styles (StyleID), by name, oldest first: kept in the page's state (`gr.State`, which
# no request can set), not on the server's pipeline, which every page shares.
ImageStyles = dict[str, Image.Image]
IMAGE_STYLE_KEY = "page-image-"  # what the pipeline calls a page's image style during a run, + a random suffix


# -- messages -------------------------------------------------------------------------------------

def shown_in_page(action: Callable) -> Callable:
    """The action with its UserError shown as one line in the page (functools.wraps keeps the
    signature Gradio reads for gr.Progress and gr.SelectData)."""

    @functools.wraps(action)
    def run_action(*args, **kwargs):
        try:
            return action(*args, **kwargs)
        except UserError as error:
            raise gr.Error(page_message(error), print_exception=False) from None

    return run_action


def page_message(error: UserError) -> str:
    """The error's line when it names a control of the page; else the server's setup is at fault:
    the line goes to the server's console and the page gets `SERVER_FAULT` (a path or a remedy in
    it is for whoever runs the server)."""
    if is_control(error.where):
        return error.line()
    print(f"diffstyler demo: {error.line()}", file=sys.stderr, flush=True)
    return SERVER_FAULT


# -- uploads and served files ----------------------------------------------------------------------

def upload_path(upload: Any, where: str) -> Optional[str]:
    """The path of an uploaded file as Gradio passes it on (its FileData as a dict; None: none)."""
    if upload is None:
        return None
    path = upload.get("path") if isinstance(upload, dict) else None
    if not isinstance(path, str) or not path:
        raise UserError("not an uploaded file", where, "upload the image as a file")
    return path


def read_upload(upload: Any, where: str, decode: Callable[[str], Image.Image] = load_image) -> Optional[Image.Image]:
    """The uploaded image decoded (None: no upload), the upload's file deleted whatever happens.
    Errors name the control, not the file (its name is a server path)."""
    path = upload_path(upload, where)
    if path is None:
        return None
    try:
        return decode(path)
    except MissingFileError:
        raise UserError("upload not found", where, "upload the file again") from None
    except ImageLoadError as error:
        if error.what == "image too large":
            raise UserError("image too large", where, f"more than {max_image_pixels()} pixels") from None
        # The cause's own words can hold the server's path, or ultralytics' "No module named 'pi_heif'"
        # (once FastSAM has loaded, it patches PIL to try a HEIF plugin on unknown files).
        raise UserError("not a readable image", where, "not an image file (PNG, JPEG, WebP, ...), or a damaged one") from None
    finally:
        delete_upload(path)


def delete_upload(path: str) -> None:
    """Delete an upload, and its folder once empty, if it lies in Gradio's upload folder (a file
    anywhere else, e.g. a script's own, stays)."""
    file, uploads = Path(path).resolve(), Path(get_upload_folder()).resolve()
    if file.parent == uploads or not file.is_relative_to(uploads):
        return
    file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # another upload of the same bytes may share the folder
        file.parent.rmdir()


def served_copies(files: list[tuple[Path, str]]) -> list[str]:
    """Copies of (file, name) pairs for the page to show and offer: in a new folder with a random,
    unguessable name in Gradio's upload folder, which Gradio serves to whoever holds the link (and
    deletes after a while: `page.SERVED_FILES_LIFETIME_S`)."""
    folder = Path(get_upload_folder()) / secrets.token_hex(16)
    folder.mkdir(parents=True)
    return [str(shutil.copyfile(file, folder / name)) for file, name in files]


def file_stem(name: str) -> str:
    """`name` as a file name part: letters, digits, `_` and `-` only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")


def numbered_name(wanted: str, taken: Callable[[str], bool]) -> str:
    """`wanted` as a file name part, or with the first number (_2, _3, ...) that makes it a name not `taken`."""
    base = file_stem(wanted) or "style"
    name, number = base, 1
    while taken(name):
        number += 1
        name = f"{base}_{number}"
    return name


# -- styles by method ------------------------------------------------------------------------------

def method_label(name: str, method: str) -> str:
    """A style as the menus and the results' captions show it: the method that makes its results."""
    return f"StyleID (image {name}, no training)" if method == "styleid" else f"DiffStyler (LoRA {name})"


def shown_style(entry: dict[str, Any], name: str) -> dict[str, Any]:
    """A style's settings as a result records them: named as the page names it, that name in place of
    its LoRA's path on the server and of its image's (an upload, or the pipeline's key for a page's
    image); its hash (`lora_sha256` or `image_sha256`) still says which file or pixels it was."""
    return {**entry, "name": name, "lora": None if entry["lora"] is None else name,
            "image": None if entry["image"] is None else name}


@contextlib.contextmanager
def image_styles_loaded(pipe: DiffStylerPipeline, images: ImageStyles) -> Iterator[dict[str, str]]:
    """A page's image styles loaded on the shared pipeline for one run (its keys: each style's name
    there, a random one, which no other style has), and unloaded after it, whatever happens: the
    pipeline keeps no page's image, and no page's name meets another's."""
    loaded: dict[str, str] = {}
    try:
        for name, image in images.items():
            (loaded[name],) = pipe.load_style(image=image, name=IMAGE_STYLE_KEY + secrets.token_hex(8))
        yield loaded
    finally:
        for key in loaded.values():
            del pipe.styles[key], pipe.style_images[key]


# -- a page session --------------------------------------------------------------------------------

@dataclass
class Session:
    """A page session's own things on the server (kept in a `gr.State`, which no request can set).

    folder: its folder under the output folder, a random name nobody else knows.
    styles: the styles it trained, offered in its own menus only.
    """

    folder: str = field(default_factory=lambda: secrets.token_hex(16))
    styles: list[str] = field(default_factory=list)


def new_session() -> Session:
    """A page session's `Session`: `gr.State(new_session)` calls it for each new session."""
    return Session()


class RegionError(UserError):
    """A tab's region cannot be made on this photo (FastSAM finds nothing, an empty mask)."""


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
        self.pixel_multiple = pipe.backbone.pixel_multiple  # 8 for a UNet, 16 for a transformer's 2x2 tokens
        self.offered: list[str] = []  # the configured styles, in every session's menus
        self.cancel_requests: dict[str, threading.Event] = {}  # by session folder: the training it may cancel

    def load_offered_styles(self) -> list[str]:
        for folder in self.config.loras:
            self.offered += self.pipe.load_style(folder)
        return self.offered

    def style_names(self, session: Optional[Session] = None, images: Optional[ImageStyles] = None) -> list[str]:
        """The styles a page's menus offer: the configured ones, the LoRAs it trained, its image styles."""
        return self.offered + (session.styles if session is not None else []) + list(images or {})

    def style_choices(self, session: Optional[Session], images: ImageStyles) -> list[tuple[str, str]]:
        """A menu's choices: (what it shows: the style and its method, the style's name)."""
        return [(method_label(name, "styleid" if name in images else "diffstyler"), name)
                for name in self.style_names(session, images)]

    def style_menus(self, session: Session, images: ImageStyles, values: Optional[list[Optional[str]]] = None) -> list[gr.Dropdown]:
        """Each tab's menu updated: the page's styles (`style_choices`); `values`: each tab's choice too."""
        choices = self.style_choices(session, images)
        if values is None:
            return [gr.Dropdown(choices=choices) for _ in range(MAX_STYLES)]
        return [gr.Dropdown(choices=choices, value=value) for value in values]

    def tab(self, number: int) -> "TabActions":
        return TabActions(self, number)

    def session_folder(self, session: Session) -> Path:
        folder = self.output_folder / session.folder
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -- the photo, the masks and the click canvas ------------------------------------------------

    @shown_in_page
    def load_photo(self, file: Any, *tabs: Any) -> tuple:
        """The uploaded photo at the demo's resolution (the image every click and mask refers to),
        shown in the upload box; each tab's clicks cleared and its canvas drawn anew. `tabs`: each
        tab's region mode, text and mask."""
        photo = read_upload(file, PHOTO)
        content = None if photo is None else resize_to_multiple(photo, self.config.resolution, self.pixel_multiple)
        canvases = [self.canvas_or_plain(content, number, *tabs[3 * (number - 1): 3 * number])
                    for number in range(1, MAX_STYLES + 1)]
        return (content, content, *[[] for _ in canvases], *canvases)

    def canvas_or_plain(self, content: Optional[Image.Image], number: int, mode: Any, text: Any,
                        mask: Optional[Image.Image]) -> Optional[Image.Image]:
        """A new photo's canvas with the tab's region drawn where it can be made; a region that
        fails on this photo is reported when the user next edits it or runs."""
        try:
            return self.region_canvas(content, number, mode, [], text, mask)
        except RegionError:
            return canvas(content, None, [], POINTS)

    def region_canvas(self, content: Optional[Image.Image], number: int, mode: Any, clicks: list[Click], text: Any,
                      mask: Optional[Image.Image]) -> Optional[Image.Image]:
        if content is None:
            return None
        mode = check_choice(mode, REGION_MODES, in_tab(REGION, number))
        text = REGION_TEXT.check(text, in_tab(REGION_TEXT_LABEL, number))
        region = None
        if mode == WHOLE_IMAGE:
            region = torch.ones(content.height, content.width)
        elif missing_input(mode, clicks, text, mask) is None:
            region = self.region_mask(content, number, mode, clicks, text, mask)
        return canvas(content, region, clicks, mode)

    def region_mask(self, content: Image.Image, number: int, mode: str, clicks: list[Click], text: str,
                    mask: Optional[Image.Image]) -> torch.Tensor:
        """The tab's complete region on the photo (FastSAM for points, a box or text)."""
        where = in_tab(REGION_CONTROLS[mode], number)
        missing = missing_input(mode, clicks, text, mask)
        if missing is not None:
            raise UserError(missing[0], where, missing[1])
        try:
            return self.pipe.make_mask(mask_source(mode, clicks, text, mask), content, where)
        except MaskError as error:  # it names the prompt ("points [[3, 4]]"); the page names its control
            raise RegionError(error.what, where, error.why) from None

    # -- a style from an image: at once (StyleID), or trained (a LoRA) -------------------------------

    @shown_in_page
    def load_style_image(self, session: Session, images: ImageStyles, file: Any, *tab_styles: Any) -> tuple:
        """The uploaded style image, shown, becomes a style of this page at once (StyleID, no
        training), named after its file and picked in the first tab without a style; it is kept to
        train a LoRA from (`train`), whose name box gets the file's name + "_lora". A page keeps
        `MAX_IMAGE_STYLES` image styles, forgetting the oldest. `tab_styles`: each tab's choice.
        Clearing the upload box keeps the image styles."""
        wanted = file_stem(Path(upload_path(file, STYLE_IMAGE) or "").stem)[: LORA_NAME.max_length] or "image"
        image = read_upload(file, STYLE_IMAGE)
        if image is None:
            return None, None, "", gr.skip(), gr.skip(), *[gr.skip()] * MAX_STYLES
        image = resize_to_multiple(image, max(self.config.resolution, self.config.train_resolution))
        name = numbered_name(wanted, lambda taken: taken in self.style_names(session, images))
        recent = list(images.items())[max(0, len(images) - (MAX_IMAGE_STYLES - 1)):]
        kept = {**dict(recent), name: image}
        names = self.style_names(session, kept)
        values = [value if isinstance(value, str) and value in names else None for value in tab_styles]
        free = [number for number, value in enumerate(values, start=1) if value is None]
        if free:
            values[free[0] - 1] = name
        forgotten = [old for old in images if old not in kept]
        message = (f"{name} is a style of this page: {method_label(name, 'styleid')}"
                   + (f", picked in {tab_name(free[0])}" if free else "") + ". Run, or train a LoRA from it below."
                   + (f" {', '.join(forgotten)} is no longer offered (a page keeps {MAX_IMAGE_STYLES} style images)." if forgotten else ""))
        return image, image, f"{name}_lora"[: LORA_NAME.max_length], kept, message, *self.style_menus(session, kept, values)

    @shown_in_page
    def train(self, session: Session, images: ImageStyles, style_image: Optional[Image.Image], name: Any,
              progress=gr.Progress()) -> tuple:
        """Learn a LoRA from the uploaded style image on the loaded model (the progress bar counts its
        steps) and offer it in this session's menus (DiffStyler), with the LoRA file to download;
        the cancel button stops it after the current step, saving nothing."""
        wanted = LORA_NAME.check(name).strip()
        if style_image is None:
            raise UserError("no style image", STYLE_IMAGE, "upload the image whose style to learn")
        folder = self.session_folder(session)
        # used by no loaded style, no LoRA folder of the session, and none of the page's image styles
        name = numbered_name(wanted, lambda taken: taken in self.pipe.styles or taken in images or (folder / "loras" / taken).exists())
        lora_folder, image_file = folder / "loras" / name, folder / "styles" / f"{name}.png"
        image_file.parent.mkdir(exist_ok=True)
        style_image.save(image_file)
        cancel = self.cancel_requests[session.folder] = threading.Event()
        try:
            train_style(str(image_file), lora_folder, steps=self.config.train_steps, model=self.config.model,
                        resolution=self.config.train_resolution, lora=StyleLoRAConfig(rank=self.config.train_rank),
                        accelerator=self.config.training_accelerator, progress=False, pipe=self.pipe.pipe,
                        callbacks=[TrainingProgress(progress, cancel, self.config.train_steps, name)])
        except TrainingCancelled as stop:  # the LoRA is written only when training ends: nothing to remove
            return (f"Training of {name} cancelled at step {stop.step}; nothing was saved.", session, None,
                    *self.style_menus(session, images))
        finally:
            self.cancel_requests.pop(session.folder, None)
            if not (lora_folder / LORA_WEIGHTS_NAME).is_file():
                image_file.unlink(missing_ok=True)
        self.pipe.load_style(lora_folder, name=name)
        session = Session(session.folder, [*session.styles, name])
        (lora,) = served_copies([(lora_folder / LORA_WEIGHTS_NAME, f"{name}.safetensors")])
        message = (f"Trained {name} ({self.config.train_steps} steps): pick it in a style's menu. "
                   "It is offered in this page only; download its LoRA below.")
        return message, session, lora, *self.style_menus(session, images)

    def cancel_training(self, session: Session) -> str:
        cancel = self.cancel_requests.get(session.folder)
        if cancel is None:
            return "No training of yours is running."
        cancel.set()
        return "Cancelling after the current step..."


    # -- the run ----------------------------------------------------------------------------------

    @shown_in_page
    def run(self, session: Session, images: ImageStyles, content: Optional[Image.Image], steps: Any, guidance_scale: Any,
            feature_steps: Any, attention_steps: Any, preset: Any, seed: Any, gamma: Any, tau: Any, adain: Any,
            progress=gr.Progress(), *tabs: Any) -> tuple[Gallery, list[str]]:
        """Stylize the photo with each chosen style in its region: a LoRA style by DiffStyler (the
        injection settings), an image style by StyleID (`gamma`, `tau`, `adain`). Shows the
        content, the composite and each style's image side by side, captioned with the method that
        made it; offers the PNGs (with their settings) and the masks.

        `tabs` are the style tabs' inputs, TAB_INPUTS each (Gradio passes the page's components in
        order; `progress` sits before them so that Gradio can fill it in)."""
        steps, guidance_scale, seed = STEPS.check(steps), GUIDANCE.check(guidance_scale), SEED.check(seed)
        feature_steps = check_window(FEATURE_STEPS.check(feature_steps), steps, FEATURE_STEPS)
        attention_steps = check_window(ATTENTION_STEPS.check(attention_steps), steps, ATTENTION_STEPS)
        injection = dataclasses.replace(injection_config(check_choice(preset, list(INJECTION_PRESETS), PRESET), "preset"),
                                        feature_steps=feature_steps, attention_steps=attention_steps)
        styleid = StyleIDConfig(gamma=STYLEID_GAMMA.check(gamma), tau=STYLEID_TAU.check(tau),
                                adain=check_switch(adain, STYLEID_ADAIN))
        chosen = self.chosen_styles(session, images, tabs)
        if content is None:
            raise UserError("no content photo", PHOTO, "upload a photo first")
        progress(0, desc="making the regions")
        masks = [None if mode == WHOLE_IMAGE else self.region_mask(content, number, mode, clicks, text, mask)
                 for number, _, mode, clicks, text, mask in chosen]
        if all(mask is None for mask in masks):
            masks = None
        else:  # a whole-image style among masked ones: its region is every pixel
            masks = [np.ones((content.height, content.width), bool) if mask is None else (mask > 0.5).numpy() for mask in masks]
        progress(0, desc="inverting the photo")
        names = [style for _, style, *_ in chosen]
        with image_styles_loaded(self.pipe, {name: images[name] for name in names if name in images}) as loaded:
            result = self.pipe(
                content, styles=[loaded.get(name, name) for name in names], masks=masks, num_inference_steps=steps,
                guidance_scale=guidance_scale, injection=injection, styleid=styleid, seed=seed,
                resolution=self.config.resolution,
                callback_on_step_end=lambda state: progress((state.step + 1, state.num_steps), desc="denoising"),
            )
        return self.save_run(session, content, result, names)

    def chosen_styles(self, session: Session, images: ImageStyles, tabs: tuple) -> list[tuple]:
        """(tab number, style, region mode, clicks, text, mask) of each tab with a style, checked."""
        chosen = []
        for number in range(1, len(tabs) // TAB_INPUTS + 1):
            style, mode, clicks, text, mask = tabs[(number - 1) * TAB_INPUTS: number * TAB_INPUTS]
            if style is None or style == "":
                continue
            style = check_choice(style, self.style_names(session, images), in_tab(STYLE, number))
            mode = check_choice(mode, REGION_MODES, in_tab(REGION, number))
            chosen.append((number, style, mode, clicks, REGION_TEXT.check(text, in_tab(REGION_TEXT_LABEL, number)), mask))
        if not chosen:
            raise UserError("no style chosen", in_tab(STYLE, 1), "pick a style in a style tab's menu (or upload a style image)")
        return chosen

    def save_run(self, session: Session, content: Image.Image, result: StylizationOutput,
                 names: list[str]) -> tuple[Gallery, list[str]]:
        """The run's PNGs in a new folder of the session's: the content, the composite and each
        style's image (with the A1111 parameters and the JSON settings, which name each style as
        the page does, `names`, with its method and hash: no path on the server), and each style's
        mask; the page gets served copies, each style's captioned with its method."""
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.session_folder(session)))
        styles = [shown_style(entry, name) for entry, name in zip(result.settings["Styles"], names, strict=True)]
        settings = {**result.settings, "Styles": styles}
        prompt = " | ".join(entry["prompt"] for entry in styles if entry["lora"] is not None)  # StyleID reads no text
        negative = result.settings["Sampling"]["negative_prompt"]
        tags = " ".join(lora_tag(entry["name"], entry["scale"]) for entry in styles if entry["lora"] is not None)

        def saved(image: Image.Image, name: str) -> Path:
            return save_result(image, folder / name, prompt, negative, settings, tags=tags)

        content.save(folder / "content.png")
        shown, masks = [(folder / "content.png", "content")], []
        if result.composite is not None:
            shown.append((saved(result.composite, "composite.png"), "composite"))
        for number, (entry, image, mask) in enumerate(zip(styles, result.images, result.masks), start=1):
            stem = f"{number}_{file_stem(entry['name'])}"
            shown.append((saved(image, f"{stem}.png"), method_label(entry["name"], entry["method"])))
            if mask is not None:
                mask.save(folder / f"{stem}_mask.png")
                masks.append(folder / f"{stem}_mask.png")
        files = [path for path, _ in shown] + masks
        served = served_copies([(Path(path), Path(path).name) for path in files])
        gallery = [(path, caption) for path, (_, caption) in zip(served, shown)]
        return gallery, served[1:]


class TabActions:
    """What a style tab's controls do: its canvas's clicks, its region mode and text, its mask
    upload (its number names its controls in messages: "Style 2 › Region")."""

    def __init__(self, actions: DemoActions, number: int):
        self.actions, self.number = actions, number

    @shown_in_page
    def load_mask(self, file: Any, content: Optional[Image.Image], mode: Any, clicks: list[Click],
                  text: Any) -> tuple:
        """The uploaded mask image kept as the tab's region (nonzero = styled; transparent = not, where
        the image has transparency) at the demo's resolution, shown, and drawn on the canvas."""
        where = in_tab(MASK_IMAGE, self.number)
        image = read_upload(file, where, decode=open_upright_image)
        mask = None
        if image is not None:
            region = hard_mask_from_image(image, image.size, where).numpy()
            size = size_at_resolution(image.size, self.actions.config.resolution, self.actions.pixel_multiple)
            mask = Image.fromarray(region.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        return mask, mask, self.actions.region_canvas(content, self.number, mode, clicks, text, mask)

    @shown_in_page
    def show_region(self, content: Optional[Image.Image], mode: Any, clicks: list[Click], text: Any,
                    mask: Optional[Image.Image]) -> Optional[Image.Image]:
        """The canvas with the tab's region, made as the run will make it, once it is complete."""
        return self.actions.region_canvas(content, self.number, mode, clicks, text, mask)

    @shown_in_page
    def click(self, content: Optional[Image.Image], mode: Any, kind: Any, clicks: list[Click], text: Any,
              mask: Optional[Image.Image], evt: gr.SelectData) -> tuple[list[Click], Optional[Image.Image]]:
        """A click on the canvas adds a point (include or exclude) or a box corner, on the photo's
        pixel under it."""
        if content is None:
            raise UserError("no content photo", PHOTO, "upload a photo first")
        kind = check_choice(kind, list(POINT_LABELS), in_tab(CLICK_KIND, self.number))
        clicks = add_click(clicks, photo_pixel(evt.index, content.size, in_tab(CANVAS, self.number)), kind)
        return clicks, self.actions.region_canvas(content, self.number, mode, clicks, text, mask)

    @shown_in_page
    def clear_clicks(self, content: Optional[Image.Image], mode: Any, text: Any,
                     mask: Optional[Image.Image]) -> tuple[list[Click], Optional[Image.Image]]:
        return [], self.actions.region_canvas(content, self.number, mode, [], text, mask)
