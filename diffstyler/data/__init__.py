"""Data modules: style images for LoRA training (`style`), stylization jobs for predict (`jobs`,
built from the inputs that `sources` reads: folders, patterns, lists, manifests)."""

from diffstyler.data.jobs import StyleEntry, StylizeDataModule
from diffstyler.data.style import DEFAULT_STYLE_PROMPT, StyleDataModule, StyleDataset

__all__ = ["DEFAULT_STYLE_PROMPT", "StyleDataModule", "StyleDataset", "StyleEntry", "StylizeDataModule"]
