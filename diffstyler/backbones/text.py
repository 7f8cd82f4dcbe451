"""Text encoders' plumbing shared by every backbone: the CLIP encoder call, and the tokenizers of
the tiny offline models (a CLIP BPE and a T5 Unigram tokenizer over single characters, written by
the code itself: no download)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from diffstyler.memory import execution_device


def clip_encoder_output(tokenizer: CLIPTokenizer, encoder: torch.nn.Module, prompts: list[str], hidden_states: bool = False):
    """The CLIP text encoder's output for prompts padded to the tokenizer's length (77)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return encoder(tokens.input_ids.to(execution_device(encoder)), output_hidden_states=hidden_states)


def _tiny_vocab() -> dict[str, int]:
    # Byte-level BPE needs every printable byte character and its end-of-word form.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|startoftext|>", "<|endoftext|>"]
    characters = list(bytes_to_unicode().values())
    tokens += characters + [c + "</w>" for c in characters]
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over single characters, written to a temporary folder and loaded from it."""
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        merges_file = Path(folder) / "merges.txt"
        vocab_file.write_text(json.dumps(_tiny_vocab()))
        merges_file.write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77, local_files_only=True)
