"""The page's controls as the user sees them (their labels), their bounds, and the checks that every
value from the page or from Gradio's API passes before it is used.

Gradio checks a slider's bounds itself, but its message names no control ("Value 1e+20 is greater
than maximum value 100.") and NaN passes it; the page's components pass their values on as sent
(`page.RawSlider` and the like) and each action checks them here, so that a bad value is one line
naming the control, whether it came from the page or from a script:

    invalid value (Seed): must be a whole number from 0 to 4294967295, got 1e+20

The page's labels live here, so that the page and its messages cannot drift apart. A control in a
style tab is named with its tab: "Style 2 › Region".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from diffstyler.errors import UserError

MAX_STYLES = 3  # style tabs on the page
MAX_IMAGE_STYLES = MAX_STYLES  # style images a page keeps as styles (a run uses at most MAX_STYLES)

# -- labels -------------------------------------------------------------------------------------

PHOTO = "Content photo"
STYLE_IMAGE = "Style image"
LORA_NAME_LABEL = "LoRA name"
PRESET = "Injection preset"
STYLEID_ADAIN = "StyleID: start from the style's statistics (AdaIN)"

STYLE = "Style"  # in each style tab, as are the labels below
REGION = "Region"
CLICK_KIND = "A click adds a point to"
CANVAS = "Click the photo (the region is shown in red)"
REGION_TEXT_LABEL = "Text prompt (region mode text)"
MASK_IMAGE = "Mask image (region mode mask file; white = styled)"
TAB_CONTROLS = (STYLE, REGION, CLICK_KIND, CANVAS, REGION_TEXT_LABEL, MASK_IMAGE)


def tab_name(number: int) -> str:
    return f"Style {number}"


def in_tab(label: str, number: int) -> str:
    """A style tab's control as messages name it: "Style 2 › Region"."""
    return f"{tab_name(number)} › {label}"


# -- values -------------------------------------------------------------------------------------

SHOWN_CHARACTERS = 40  # of a refused value, in its message


def shown(value: Any) -> str:
    """The value as a message quotes it, cut short (a script may send megabytes)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARACTERS else f"{text[:SHOWN_CHARACTERS]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Number:
    """A slider or number box that takes numbers (`whole`: whole numbers) from `minimum` to `maximum`."""

    label: str
    minimum: float
    maximum: float
    whole: bool = False

    def problem(self, value: Any) -> Optional[str]:
        """Why `value` is refused (None: it is fine). 5.0 is a whole number; True, NaN, inf and text are refused."""
        kind = "a whole number" if self.whole else "a number"
        expected = f"must be {kind} from {bound(self.minimum)} to {bound(self.maximum)}, got {shown(value)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return expected
        if isinstance(value, float) and not (math.isfinite(value) and (value.is_integer() or not self.whole)):
            return expected
        return None if self.minimum <= value <= self.maximum else expected

    def check(self, value: Any) -> int | float:
        refused = self.problem(value)
        if refused:
            raise UserError("invalid value", self.label, refused)
        return int(value) if self.whole else float(value)


def bound(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Text:
    """A text box: a string of at most `max_length` characters (None is the empty string)."""

    label: str
    max_length: int

    def check(self, value: Any, where: Optional[str] = None) -> str:
        """The text; `where` names the control when it is not `label` alone (a tab's: "Style 1 › ...")."""
        where = where or self.label
        if value is None:
            return ""
        if not isinstance(value, str):
            raise UserError("invalid value", where, f"must be text, got {shown(value)}")
        if len(value) > self.max_length:
            raise UserError("text too long", where, f"at most {self.max_length} characters, got {len(value)}")
        return value


def check_switch(value: Any, label: str) -> bool:
    """A checkbox's value: True or False (not 1, "yes" or None)."""
    if not isinstance(value, bool):
        raise UserError("invalid value", label, f"must be true or false, got {shown(value)}")
    return value


def check_choice(value: Any, choices: Sequence[str], label: str) -> str:
    """One of a menu's or radio's `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise UserError("not one of the choices", label, f"choose one of {', '.join(choices)}; got {shown(value)}")
    return value


STEPS = Number("Denoising steps", 1, 100, whole=True)
GUIDANCE = Number("Guidance scale", 1.0, 20.0)
SEED = Number("Seed", 0, 2**32 - 1, whole=True)  # A1111's seeds are 32-bit; the PNGs record it
FEATURE_STEPS = Number("Feature injection: first steps", 0, 100, whole=True)
ATTENTION_STEPS = Number("Attention injection: first steps", 0, 100, whole=True)
# StyleID's query preservation and attention temperature (the authors' 0.75 and 1.5); tau is
# bounded where the page's slider ends, not only above 0 as the method's config is
STYLEID_GAMMA = Number("StyleID: query preservation (gamma)", 0.0, 1.0)
STYLEID_TAU = Number("StyleID: attention temperature (tau)", 0.5, 3.0)
LORA_NAME = Text(LORA_NAME_LABEL, 64)  # a folder name on the server: kept well under file-name limits
REGION_TEXT = Text(REGION_TEXT_LABEL, 300)  # CLIP reads 77 tokens; a script could send megabytes


def check_window(window: int, steps: int, control: Number) -> int:
    """An injection window no longer than the sampling (the pipeline's own check names its key)."""
    if window > steps:
        raise UserError("injection window longer than the sampling", control.label,
                        f"at most {STEPS.label} ({steps}), got {window}")
    return window


def is_control(where: Optional[str]) -> bool:
    """`where` names a control of the page (a message about it is the user's to act on)."""
    page = {PHOTO, STYLE_IMAGE, LORA_NAME_LABEL, PRESET, STEPS.label, GUIDANCE.label, SEED.label,
            FEATURE_STEPS.label, ATTENTION_STEPS.label, STYLEID_GAMMA.label, STYLEID_TAU.label, STYLEID_ADAIN}
    tabs = {in_tab(label, number) for number in range(1, MAX_STYLES + 1) for label in TAB_CONTROLS}
    return where in page or where in tabs
