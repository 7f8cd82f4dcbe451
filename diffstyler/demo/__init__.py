"""`diffstyler demo`: DiffStyler in the browser, a Gradio page (the optional extra `demo`:
`pip install -e ".[demo]"`).

    diffstyler demo --config configs/smoke/demo.yaml     # the tiny model: starts in seconds, no weights
    diffstyler demo --config configs/demo.yaml           # Stable Diffusion 2.1 and FastSAM weights

The parts:
- `config`: `DemoConfig`, the YAML file (model, segmenter, the LoRA folders offered, host/port,
  resolution, the page's starting settings);
- `regions`: a style's region as the page gathers it (clicks, a box, text, a mask file) and the
  preview of its mask over the photo;
- `actions`: what each control does (load the photo, preview a region, train a style, run), each a
  small function on `DiffStylerPipeline` / `train_style` returning what the page shows;
- `page`: the layout (`build_page`) and the server (`serve`).

Nothing is sent anywhere: Gradio's analytics are off and no share link is made; the page binds
127.0.0.1 unless the config says otherwise.
"""

from __future__ import annotations

import os

from diffstyler.errors import UserError

DEMO_EXTRA = 'pip install -e ".[demo]"'


def require_gradio() -> None:
    """Import Gradio with its analytics off (it reads the variable at import), or one line naming the extra."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise UserError("gradio is not installed", "the demo extra", f"install it: {DEMO_EXTRA}") from error
