"""Lightning callbacks: `PreviewGrid` (TensorBoard previews during fit), `interrupt` (Ctrl-C and
SIGTERM during fit), `stop` (Ctrl-C and SIGTERM during predict: every process stops between two
chunks), `writer` (predict's results, results.jsonl, counts and failures), `progress` (one bar of
jobs for predict), `first_failure` (DDP: the failing rank's error is the one shown)."""

from diffstyler.callbacks.preview import PreviewGrid, sample_text_to_image

__all__ = ["PreviewGrid", "sample_text_to_image"]
