"""Methods: how a style acts on the shared steps; one module per method (`base.Method` is the slot).

- `diffstyler`: the paper's method: a LoRA per style, the content's features and attention injected.
- `styleid`: StyleID (training-free): the style image's keys and values, query preservation,
  attention temperature, the initial latent AdaIN-ed.

A style is a LoRA (DiffStyler) or an image (StyleID); one run may mix them, each in its own mask.
"""

from diffstyler.methods.base import Method, RowsOfMethod, Source
from diffstyler.methods.diffstyler import DiffStylerMethod
from diffstyler.methods.styleid import StyleIDConfig, StyleIDMethod, adain

__all__ = ["DiffStylerMethod", "Method", "RowsOfMethod", "Source", "StyleIDConfig", "StyleIDMethod", "adain"]
