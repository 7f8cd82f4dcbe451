"""Jobs from folders and manifests (`data.jobs`): pairing, stable names and seeds mirroring the input
tree, refusals with the row or key named. No model is loaded: images are not even decoded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from diffstyler.data.jobs import ChunkDataset, StyleEntry, StylizeDataModule, chunked, job_seed
from diffstyler.data.naming import disambiguated
from diffstyler.errors import UserError
from tests.helpers import write_random_lora

ROOT = Path(__file__).resolve().parents[2]
CONTENT = ROOT / "data" / "content_shapes.png"


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return [write_random_lora(folder / name, seed).parent for name, seed in (("ink", 1), ("oil", 2))]


@pytest.fixture
def photos(tmp_path):
    """photos/a.png, photos/sub/b.png (and a text file, which is not a content)."""
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    shutil.copy(CONTENT, tmp_path / "photos" / "a.png")
    shutil.copy(CONTENT, tmp_path / "photos" / "sub" / "b.png")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    return tmp_path / "photos"


def styles_of(loras) -> list[StyleEntry]:
    return [StyleEntry(lora=str(path)) for path in loras]


def test_product_is_every_content_times_every_style_content_major_and_mirrors_the_tree(photos, loras):
    """Catches a missing pairing, style-major order (a content's styles split across chunks and
    processes) and outputs flattened out of their sub-folders."""
    jobs = StylizeDataModule(content=[str(photos)], styles=styles_of(loras), pairing="product").jobs()
    assert [job.id for job in jobs] == ["a_ink", "a_oil", "sub/b_ink", "sub/b_oil"]
    assert [job.files.results for job in jobs] == [("a_ink.png",), ("a_oil.png",), ("sub/b_ink.png",), ("sub/b_oil.png",)]
    assert [[style.name for style in job.styles] for job in jobs] == [["ink"], ["oil"], ["ink"], ["oil"]]
    assert [job.content for job in jobs] == [str(photos / "a.png")] * 2 + [str(photos / "sub" / "b.png")] * 2


def test_together_keeps_every_style_in_one_job(photos, loras):
    jobs = StylizeDataModule(content=[str(photos)], styles=styles_of(loras), pairing="together").jobs()
    assert [job.id for job in jobs] == ["a", "sub/b"]
    assert jobs[1].files.results == ("sub/b_ink.png", "sub/b_oil.png")


def test_adding_a_file_changes_no_existing_job(photos, loras):
    """Catches ids, seeds or names taken from a position in the list."""
    before = {job.id: job for job in StylizeDataModule(content=[str(photos)], styles=styles_of(loras), pairing="product").jobs()}
    shutil.copy(CONTENT, photos / "0_first.png")  # sorts before every other file
    after = {job.id: job for job in StylizeDataModule(content=[str(photos)], styles=styles_of(loras), pairing="product").jobs()}
    assert sorted(set(after) - set(before)) == ["0_first_ink", "0_first_oil"]
    assert all(after[job_id] == job for job_id, job in before.items())
    assert after["a_ink"].seed == job_seed(0, "a_ink") != job_seed(0, "a_oil")


def test_the_same_relative_path_from_two_inputs_is_told_apart_by_its_path_not_its_position(tmp_path, loras):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        shutil.copy(CONTENT, tmp_path / folder / "p.png")
    first, second = str(tmp_path / "x"), str(tmp_path / "y")
    names = [job.id for job in StylizeDataModule(content=[first, second], styles=styles_of(loras[:1])).jobs()]
    assert names == ["p", disambiguated("p", str(tmp_path / "y" / "p.png"))]
    swapped = [job.id for job in StylizeDataModule(content=[second, first], styles=styles_of(loras[:1])).jobs()]
    assert swapped == ["p", disambiguated("p", str(tmp_path / "x" / "p.png"))]


def test_no_image_is_decoded_when_jobs_are_built_from_a_folder(photos, loras, monkeypatch):
    """Cheap start-up: a broken file in a folder is found when its job runs, not here."""
    (photos / "broken.png").write_bytes(b"not a png")
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("an image was opened"))
    jobs = StylizeDataModule(content=[str(photos)], styles=styles_of(loras[:1])).jobs()
    assert [job.id for job in jobs] == ["a", "broken", "sub/b"] and opened == []


def test_a_broken_file_named_directly_fails_when_the_data_is_built(tmp_path, loras):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"data\.content\[0\]"):
        StylizeDataModule(content=[str(broken)], styles=styles_of(loras[:1]))


def write_manifest(folder: Path, text: str, name: str = "jobs.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_manifest_rows_name_styles_or_lora_paths_with_their_masks_prompt_scale_and_output(tmp_path, photos, loras):
    shutil.copy(ROOT / "data" / "content_shapes_mask.png", tmp_path / "mask.png")
    manifest = write_manifest(tmp_path, "\n".join([
        "content,styles,masks,prompt,scale,output",
        "photos/a.png,ink,,,,",
        f"photos/sub/b.png,{loras[1]},mask.png,a painting,0.5,masked/b",
        f"photos/a.png,ink;{loras[1]},,,,",
    ]) + "\n")
    data = StylizeDataModule(manifest=str(manifest), styles=[StyleEntry(lora=str(loras[0]), name="ink")])
    jobs = data.jobs()
    # row 3's files would be row 1's a_ink.png too: its derived name gets its content path's hash
    third = disambiguated("photos/a", str(tmp_path / "photos" / "a.png"))
    assert [job.id for job in jobs] == ["photos/a_ink", "masked/b", third]  # relative to the manifest's folder
    assert jobs[0].content == str(tmp_path / "photos" / "a.png")
    masked = jobs[1].styles[0]
    assert masked.name == "oil" and masked.scale == 0.5 and masked.prompt == "a painting"
    assert masked.mask.file == str(tmp_path / "mask.png")
    assert jobs[1].files.results == ("masked/b.png",) and jobs[1].files.masks == ("masked/b_mask0_oil.png",)
    assert jobs[2].files.results == (f"{third}_ink.png", f"{third}_oil.png")  # unmasked styles: one image each
    assert jobs[0].files.results == ("photos/a_ink.png",)
    assert data.job_ids() == [job.id for job in jobs]


@pytest.mark.parametrize("output", ["../escaped", "/etc/escaped", "sub/../../escaped", "sub/.hidden"])
def test_a_manifest_row_whose_output_would_leave_the_folder_is_refused_with_its_row_number(tmp_path, loras, output):
    manifest = write_manifest(tmp_path, f"content,styles,output\n{CONTENT},ink,ok\n{CONTENT},ink,{output}\n")
    with pytest.raises(UserError) as raised:
        StylizeDataModule(manifest=str(manifest), styles=[StyleEntry(lora=str(loras[0]), name="ink")])
    assert "row 2" in str(raised.value) and f"{manifest}:3" in str(raised.value)


def test_two_manifest_rows_given_the_same_output_are_refused(tmp_path, loras):
    manifest = write_manifest(tmp_path, f"content,styles,output\n{CONTENT},ink,same\n{CONTENT},ink,same\n")
    with pytest.raises(UserError, match="same file name") as raised:
        StylizeDataModule(manifest=str(manifest), styles=[StyleEntry(lora=str(loras[0]), name="ink")])
    assert "row 2" in str(raised.value)


def test_an_unknown_style_in_a_manifest_names_the_row(tmp_path, loras):
    manifest = write_manifest(tmp_path, '{"content": "a.png", "styles": ["watercolour"]}\n', name="jobs.jsonl")
    with pytest.raises(UserError, match=r"unknown style 'watercolour'.*row 1") as raised:
        StylizeDataModule(manifest=str(manifest), styles=[StyleEntry(lora=str(loras[0]), name="ink")])
    assert "ink" in str(raised.value)  # the known names are listed


@pytest.mark.parametrize("inputs", [
    {"manifest": "header"},
    {"content": "empty list file"},
])
def test_zero_jobs_is_one_clear_error(tmp_path, loras, inputs):
    if "manifest" in inputs:
        arguments = {"manifest": str(write_manifest(tmp_path, "content,styles\n"))}
        key = "data.manifest"
    else:
        arguments = {"content": []}
        key = "data.content"
    with pytest.raises(UserError, match="nothing to stylize") as raised:
        StylizeDataModule(styles=styles_of(loras[:1]), **arguments)
    assert raised.value.where == key


def test_content_and_manifest_together_are_refused(tmp_path, loras):
    manifest = write_manifest(tmp_path, f"content\n{CONTENT}\n")
    with pytest.raises(UserError, match="not both"):
        StylizeDataModule(content=[str(CONTENT)], manifest=str(manifest), styles=styles_of(loras[:1]))


def test_chunks_are_consecutive_jobs_so_a_contents_styles_stay_together(photos, loras):
    data = StylizeDataModule(content=[str(photos)], styles=styles_of(loras), pairing="product", batch_size=2)
    assert chunked(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    loader = data.predict_dataloader()
    assert isinstance(loader.dataset, ChunkDataset)
    assert [[job.id for job in chunk] for chunk in loader] == [["a_ink", "a_oil"], ["sub/b_ink", "sub/b_oil"]]


def test_a_row_without_styles_takes_every_style_and_needs_one_mask_for_each(tmp_path, loras):
    styles = [StyleEntry(lora=str(loras[0]), name="ink"), StyleEntry(lora=str(loras[1]), name="oil")]
    manifest = write_manifest(tmp_path, f"content,styles,masks\n{CONTENT},,m.png;n.png\n")
    job, = StylizeDataModule(manifest=str(manifest), styles=styles).jobs()
    assert [(s.name, s.mask.file) for s in job.styles] == [("ink", str(tmp_path / "m.png")), ("oil", str(tmp_path / "n.png"))]
    write_manifest(tmp_path, f"content,styles,masks\n{CONTENT},,m.png\n")
    with pytest.raises(UserError, match=r"masks do not match styles.*row 1"):
        StylizeDataModule(manifest=str(manifest), styles=styles)


def test_a_folder_of_lora_folders_is_one_style_per_lora_named_after_its_folder(photos, loras):
    """What `diffstyler fit` with data.one_lora_per_image writes, used as data.styles in one entry.
    Catches: the folder taken as one style, a hidden or weightless folder taken as a style, and
    the entry's scale or prompt dropped for its LoRAs."""
    folder = Path(shutil.copytree(loras[0].parent, photos.parent / "loras"))
    (folder / ".staging").mkdir()
    (folder / ".staging" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (folder / "logs").mkdir()  # no weights: not a style
    data = StylizeDataModule(content=[str(photos)], styles=[StyleEntry(lora=str(folder), scale=0.5, prompt="ink art")],
                             pairing="product")
    assert [(entry.name, Path(entry.lora).parent.name, entry.scale, entry.prompt) for entry in data.styles] == [
        ("ink", "ink", 0.5, "ink art"), ("oil", "oil", 0.5, "ink art")]
    assert data.job_ids() == ["a_ink", "a_oil", "sub/b_ink", "sub/b_oil"]
    # a LoRA folder itself is one style, even next to others
    assert [entry.name for entry in StylizeDataModule(content=[str(photos)], styles=[StyleEntry(lora=str(loras[1]))]).styles] == ["oil"]


@pytest.mark.parametrize("given", ["name", "image"])
def test_a_name_or_image_for_a_folder_of_loras_is_refused(photos, loras, given):
    entry = StyleEntry(lora=str(loras[0].parent), **{given: "x" if given == "name" else str(CONTENT)})
    with pytest.raises(UserError, match=f"{given} given for 2 LoRAs") as caught:
        StylizeDataModule(content=[str(photos)], styles=[entry])
    assert caught.value.where == f"data.styles[0].{given}"


# --- style images (StyleID): a style given by its image alone ------------------------------------

@pytest.fixture
def style_folder(tmp_path):
    """style/checks.png, style/waves.png (the repository's two style images) and a hidden file."""
    folder = tmp_path / "style"
    folder.mkdir()
    for name in ("waves", "checks"):
        shutil.copy(ROOT / "data" / "styles" / f"{name}.png", folder / f"{name}.png")
    (folder / ".thumbnail.png").write_bytes(b"")
    return folder


def test_a_folder_of_style_images_is_one_styleid_style_per_image_in_the_product(photos, style_folder):
    """What the StyleID protocol gives as data.styles (40 images in one folder). Catches: the folder
    taken as one style (or refused as no image), a hidden file taken as a style, names from a
    position in the folder, the entry's other keys dropped, a LoRA method for an image style."""
    data = StylizeDataModule(content=[str(photos)], styles=[StyleEntry(image=str(style_folder), scale=0.5)], pairing="product")
    assert [(entry.name, entry.image, entry.lora, entry.scale, entry.method) for entry in data.styles] == [
        ("checks", str(style_folder / "checks.png"), None, 0.5, "styleid"),
        ("waves", str(style_folder / "waves.png"), None, 0.5, "styleid")]
    assert data.job_ids() == ["a_checks", "a_waves", "sub/b_checks", "sub/b_waves"]
    assert [[style.image for style in job.styles] for job in data.jobs()] == [[str(style_folder / f"{name}.png")] for name in ("checks", "waves")] * 2
    # a pattern and a list file name images too
    (style_folder / "list.txt").write_text("waves.png\n")
    for given in (str(style_folder / "w*.png"), str(style_folder / "list.txt")):
        assert [entry.image for entry in StylizeDataModule(content=[str(photos)], styles=[StyleEntry(image=given)]).styles] == [
            str(style_folder / "waves.png")]


def test_a_name_for_a_folder_of_style_images_is_refused_and_an_empty_one_named(photos, style_folder, tmp_path):
    with pytest.raises(UserError, match="name given for 2 style images") as caught:
        StylizeDataModule(content=[str(photos)], styles=[StyleEntry(image=str(style_folder), name="mine")])
    assert caught.value.where == "data.styles[0].name"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files") as caught:
        StylizeDataModule(content=[str(photos)], styles=[StyleEntry(image=str(tmp_path / "empty"))])
    assert caught.value.where == "data.styles[0].image"


def test_one_run_mixes_lora_styles_and_image_styles(photos, loras, style_folder):
    """The product over a LoRA and a folder of images: each job has one style and its method.
    Catches: the LoRA folder expansion dropping the image entries after it (or the reverse)."""
    data = StylizeDataModule(content=[str(photos)], styles=[StyleEntry(lora=str(loras[0])), StyleEntry(image=str(style_folder))],
                             pairing="product")
    assert [(job.id, job.styles[0].method) for job in data.jobs()][:3] == [
        ("a_ink", "diffstyler"), ("a_checks", "styleid"), ("a_waves", "styleid")]
    assert len(data.jobs()) == 6


def test_manifest_rows_take_style_images_beside_loras(tmp_path, photos, loras, style_folder):
    """A CSV row and a JSONL row naming a style image by its path (relative to the manifest), alone
    and beside a LoRA in two masks. Catches: the image read as a LoRA (no weights file), a path
    not joined to the manifest's folder, the row's masks not given to the image style."""
    shutil.copy(ROOT / "data" / "content_shapes_mask.png", tmp_path / "mask.png")
    for name, text in (
        ("jobs.csv", f"content,styles,masks\nphotos/a.png,style/waves.png,\nphotos/sub/b.png,ink;style/checks.png,mask.png;mask.png\n"),
        ("jobs.jsonl", '{"content": "photos/a.png", "styles": "style/waves.png"}\n'
                       '{"content": "photos/sub/b.png", "styles": ["ink", "style/checks.png"], "masks": ["mask.png", "mask.png"]}\n'),
    ):
        data = StylizeDataModule(manifest=str(write_manifest(tmp_path, text, name)), styles=[StyleEntry(lora=str(loras[0]), name="ink")])
        first, second = data.jobs()
        assert first.id == "photos/a_waves"
        assert [(s.image, s.lora, s.method) for s in first.styles] == [(str(tmp_path / "style" / "waves.png"), None, "styleid")]
        assert [(s.name, s.method, s.mask.file) for s in second.styles] == [
            ("ink", "diffstyler", str(tmp_path / "mask.png")), ("checks", "styleid", str(tmp_path / "mask.png"))]


def test_a_broken_style_image_in_a_manifest_names_its_row(tmp_path, loras):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    manifest = write_manifest(tmp_path, f"content,styles\n{CONTENT},broken.png\n")
    with pytest.raises(UserError, match=r"row 1 .*broken\.png"):
        StylizeDataModule(manifest=str(manifest), styles=[StyleEntry(lora=str(loras[0]), name="ink")])
