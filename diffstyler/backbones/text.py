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


def build_tiny_t5_tokenizer(max_length: int = 64):
    """A T5 tokenizer (SentencePiece-style Unigram over single characters and a few word starts),
    built in memory. `max_length`: its `model_max_length` (the tiny models' T5 prompt length)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(character, -3.0) for character in string.printable if character.strip()]
    pieces += [("\u2581" + character, -2.5) for character in string.ascii_lowercase]
    unigram = Tokenizer(models.Unigram(pieces, unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()
    return T5Tokenizer(tokenizer_object=unigram, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                       model_max_length=max_length)
