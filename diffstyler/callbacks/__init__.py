"""Training callbacks."""

from diffstyler.callbacks.preview import PreviewGrid, sample_text_to_image

__all__ = ["PreviewGrid", "sample_text_to_image"]
