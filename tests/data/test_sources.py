"""data.content entries and data.manifest rows, read without opening an image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffstyler.data.sources import ContentFile, ManifestRow, expand_content, read_manifest
from diffstyler.errors import MissingFileError, UserError


def touch(root: Path, *names: str) -> None:
    # empty files: nothing here may decode an image, so none has to be valid
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def rels(files: list[ContentFile]) -> list[str]:
    return [file.rel for file in files]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- data.content -------------------------------------------------------------------------------------------


def test_folder_is_walked_recursively_sorted_without_hidden_or_non_image_files(tmp_path: Path) -> None:
    touch(
        tmp_path / "photos",
        "b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.TIFF", "a0.jpeg",
        "notes.md", "sub/readme.txt", ".hidden.png", ".cache/e.png", "sub/.git/f.png",
    )  # fmt: skip
    files = expand_content([str(tmp_path / "photos")])
    assert rels(files) == ["a.JPG", "a0.jpeg", "b.png", "sub/c.webp", "sub/deeper/d.TIFF"]
    assert [file.path for file in files] == [os.path.join(tmp_path, "photos", rel) for rel in rels(files)]
    assert {file.where for file in files} == {"data.content[0]"}


def test_folder_does_not_follow_symlinked_folders(tmp_path: Path) -> None:
    touch(tmp_path, "photos/a.png", "elsewhere/b.png")
    (tmp_path / "photos" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert rels(expand_content([str(tmp_path / "photos")])) == ["a.png"]


def test_folder_without_image_files_is_refused(tmp_path: Path) -> None:
    touch(tmp_path, "photos/notes.md", "photos/.hidden.png")
    with pytest.raises(UserError) as caught:
        expand_content([str(tmp_path / "photos")], key="job.content")
    assert (caught.value.what, caught.value.where) == ("no image files", "job.content[0]")


def test_glob_root_is_the_leading_folders_and_double_star_matches_any_depth(in_tmp: Path) -> None:
    touch(in_tmp, "photos/a.jpg", "photos/x/b.JPG", "photos/x/y/c.jpg", "photos/x/d.png", "photos/x/e.txt")
    files = expand_content(["photos/**/*.[jJ][pP][gG]"])
    assert rels(files) == ["a.jpg", "x/b.JPG", "x/y/c.jpg"]
    assert [file.path for file in files] == ["photos/a.jpg", "photos/x/b.JPG", "photos/x/y/c.jpg"]
    assert {file.where for file in files} == {"data.content[0]"}


def test_glob_in_a_middle_folder_and_in_the_current_folder(in_tmp: Path) -> None:
    touch(in_tmp, "top.png", "top.txt", "deep/sets/one/a.png", "deep/sets/two/a.png", "deep/sets/two/b.gif")
    assert rels(expand_content(["deep/sets/*/*"])) == ["one/a.png", "two/a.png"]
    assert rels(expand_content([str(in_tmp / "deep" / "s?ts" / "one" / "*.png")])) == ["sets/one/a.png"]
    assert rels(expand_content(["*"])) == ["top.png"]


def test_glob_keeps_only_image_files_not_folders_named_like_images(in_tmp: Path) -> None:
    touch(in_tmp, "shots/a.png", "shots/folder.png/inner.png", "shots/b.md")
    assert rels(expand_content(["shots/*"])) == ["a.png"]


def test_glob_without_match_is_refused(in_tmp: Path) -> None:
    touch(in_tmp, "photos/a.png", "photos/b.md")
    with pytest.raises(UserError) as caught:
        expand_content(["photos/*.png", "photos/*.md"])  # the second matches, but no image
    assert (caught.value.what, caught.value.where) == ("no file matches", "data.content[1]")
    assert not isinstance(caught.value, MissingFileError)


def test_existing_path_with_glob_characters_is_a_path_not_a_pattern(in_tmp: Path) -> None:
    touch(in_tmp, "odd[1]/a.png", "odd1/b.png")
    assert [(file.path, file.rel) for file in expand_content(["odd[1]"])] == [(os.path.join("odd[1]", "a.png"), "a.png")]


def test_list_file_lines_comments_relative_and_absolute_paths(tmp_path: Path) -> None:
    outside = tmp_path / "outside" / "far.png"
    lists = tmp_path / "lists"
    touch(lists, "x")  # the listed files need not exist
    (lists / "batch.TXT").write_text(
        f"# my batch\n\n  sub/a.png  \n{lists / 'b.jpg'}\n   \n#sub/skipped.png\n{outside}\n../other/c.webp\nd.PNG\n",
        encoding="utf-8",
    )
    list_file = str(lists / "batch.TXT")
    files = expand_content([list_file])
    assert files == [
        ContentFile(os.path.join(lists, "sub/a.png"), "sub/a.png", f"{list_file}:3"),
        ContentFile(str(lists / "b.jpg"), "b.jpg", f"{list_file}:4"),
        ContentFile(str(outside), "far.png", f"{list_file}:7"),
        ContentFile(os.path.join(lists, "../other/c.webp"), "c.webp", f"{list_file}:8"),
        ContentFile(os.path.join(lists, "d.PNG"), "d.PNG", f"{list_file}:9"),
    ]


def test_list_file_relative_to_the_current_folder(in_tmp: Path) -> None:
    (in_tmp / "all.lst").write_text("a.png\r\n./sub/b.png\r\n", encoding="utf-8")
    files = expand_content(["all.lst"])
    assert [(file.path, file.rel, file.where) for file in files] == [
        ("a.png", "a.png", "all.lst:1"),
        ("./sub/b.png", "sub/b.png", "all.lst:2"),
    ]


def test_list_file_line_that_is_not_an_image_is_refused_with_its_line(tmp_path: Path) -> None:
    list_file = tmp_path / "batch.txt"
    list_file.write_text("# header\na.png\nnotes.md\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        expand_content([str(list_file)])
    assert (caught.value.what, caught.value.where) == ("not an image file", f"{list_file}:3")


def test_list_file_without_paths_is_refused(tmp_path: Path) -> None:
    list_file = tmp_path / "batch.txt"
    list_file.write_text("# nothing yet\n\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        expand_content([str(list_file)])
    assert (caught.value.what, caught.value.where) == ("no image paths", "data.content[0]")


def test_direct_image_file_root_is_its_folder(tmp_path: Path) -> None:
    touch(tmp_path, "deep/folder/Photo.WebP")
    path = str(tmp_path / "deep/folder/Photo.WebP")
    assert expand_content([path]) == [ContentFile(path, "Photo.WebP", "data.content[0]")]


def test_file_that_is_neither_image_nor_list_is_refused(tmp_path: Path) -> None:
    touch(tmp_path, "a.png", "clip.gif")
    with pytest.raises(UserError) as caught:
        expand_content([str(tmp_path / "a.png"), str(tmp_path / "clip.gif")])
    assert (caught.value.what, caught.value.where) == ("not an image or list file", "data.content[1]")
    assert ".txt" in caught.value.why and ".png" in caught.value.why


def test_missing_path_is_a_missing_file_error_naming_its_entry(tmp_path: Path) -> None:
    touch(tmp_path, "a.png")
    with pytest.raises(MissingFileError) as caught:
        expand_content([str(tmp_path / "a.png"), str(tmp_path / "nope.png")], key="data.content")
    assert (caught.value.what, caught.value.where) == ("no such file or folder", "data.content[1]")
    assert isinstance(caught.value, FileNotFoundError)


def test_duplicates_are_kept_once_at_their_first_occurrence(in_tmp: Path) -> None:
    touch(in_tmp, "photos/a.png", "photos/b.png", "c.png")
    (in_tmp / "list.txt").write_text("c.png\nphotos/./b.png\n", encoding="utf-8")
    files = expand_content(["list.txt", "photos", str(in_tmp / "c.png"), "photos/*.png"])
    assert [(file.path, file.where) for file in files] == [
        ("c.png", "list.txt:1"),
        (os.path.join("photos", "./b.png"), "list.txt:2"),
        (os.path.join("photos", "a.png"), "data.content[1]"),
    ]


def test_entries_keep_their_order(in_tmp: Path) -> None:
    touch(in_tmp, "z/a.png", "a/b.png")
    assert [file.path for file in expand_content(["z", "a"])] == [os.path.join("z", "a.png"), os.path.join("a", "b.png")]


def test_no_entries_is_no_files() -> None:
    assert expand_content([]) == []


# --- data.manifest ------------------------------------------------------------------------------------------


def write(path: Path, text: str, encoding: str = "utf-8") -> str:
    path.write_text(text, encoding=encoding, newline="")
    return str(path)


def test_csv_manifest_lists_paths_and_optional_cells(tmp_path: Path) -> None:
    manifest = write(
        tmp_path / "jobs.csv",
        "content,styles,masks,prompt,scale,output\n"
        "a.png,van_gogh; monet ;,m1.png;,a cat,7.5,first\n"
        f"{tmp_path.parent / 'b.png'},,,,,\n"
        "sub/c.png, ;monet,,  ,, \n",
    )
    rows = read_manifest(manifest)
    assert rows == [
        ManifestRow(
            1, f"{manifest}:2", os.path.join(tmp_path, "a.png"), "a.png", ("van_gogh", "monet"),
            (os.path.join(tmp_path, "m1.png"), None), "a cat", 7.5, "first",
        ),
        ManifestRow(2, f"{manifest}:3", str(tmp_path.parent / "b.png"), "b.png", (), (), None, None, None),
        ManifestRow(3, f"{manifest}:4", os.path.join(tmp_path, "sub/c.png"), "sub/c.png", ("monet",), (), None, None, None),
    ]  # fmt: skip


def test_csv_line_numbers_count_blank_lines_and_multi_line_cells(tmp_path: Path) -> None:
    manifest = write(
        tmp_path / "jobs.CSV",
        '\ufeffcontent,prompt\r\n\r\na.png,"a long\r\nprompt"\r\n,\r\nb.png\r\nc.png,"x"\r\n',
    )
    rows = read_manifest(manifest)
    assert [(row.number, row.where, row.rel, row.prompt) for row in rows] == [
        (1, f"{manifest}:3", "a.png", "a long\nprompt"),
        (2, f"{manifest}:6", "b.png", None),
        (3, f"{manifest}:7", "c.png", "x"),
    ]


def test_csv_bad_rows_name_their_line(tmp_path: Path) -> None:
    manifest = write(tmp_path / "jobs.csv", 'content,scale\n"a\nb.png",1\nc.png,2,extra\n')
    with pytest.raises(UserError) as caught:
        read_manifest(manifest)
    assert (caught.value.what, caught.value.where) == ("too many cells", f"{manifest}:4")

    write(tmp_path / "jobs.csv", "content,scale\na.png,1\n\nb.png,big\n")
    with pytest.raises(UserError) as caught:
        read_manifest(manifest)
    assert (caught.value.what, caught.value.where) == ("scale is not a number", f"{manifest}:4")

    write(tmp_path / "jobs.csv", "content,prompt\na.png,x\n ,a dog\n")
    with pytest.raises(UserError) as caught:
        read_manifest(manifest)
    assert (caught.value.what, caught.value.where) == ("content is empty", f"{manifest}:3")


def test_csv_masks_must_be_one_per_style(tmp_path: Path) -> None:
    manifest = write(tmp_path / "jobs.csv", "content,styles,masks\na.png,van_gogh;monet,m.png\n")
    with pytest.raises(UserError) as caught:
        read_manifest(manifest)
    assert (caught.value.what, caught.value.where) == ("masks do not match styles", f"{manifest}:2")
    # without styles, the masks go with data.styles: the caller checks them
    write(tmp_path / "jobs.csv", "content,styles,masks\na.png,,m.png\n")
    assert read_manifest(manifest)[0].masks == (os.path.join(tmp_path, "m.png"),)


def test_csv_header_needs_known_columns_and_content(tmp_path: Path) -> None:
    manifest = write(tmp_path / "jobs.csv", "content,style\na.png,monet\n")
    with pytest.raises(UserError) as caught:
        read_manifest(manifest, key="run.manifest")
    assert (caught.value.what, caught.value.where) == ("unknown manifest column", f"{manifest}:1")
    assert "'style'" in caught.value.why and "content, styles, masks, prompt, scale, output" in caught.value.why

    write(tmp_path / "jobs.csv", "styles,prompt\nmonet,x\n")
    with pytest.raises(UserError) as caught:
        read_manifest(manifest)
    assert (caught.value.what, caught.value.where) == ("manifest has no content column", f"{manifest}:1")


def test_jsonl_manifest_lists_strings_and_null_masks(tmp_path: Path) -> None:
    manifest = write(
        tmp_path / "jobs.JSONL",
        '{"content": "a.png", "styles": ["van_gogh", "monet"], "masks": [null, "/abs/m.png"], "scale": 3}\n'
        "\n"
        '{"content": "b.png", "styles": "monet", "masks": "m.png", "prompt": "a dog", "output": "b_out"}\n'
        '{"content": "c.png", "styles": null, "scale": null, "prompt": ""}\n',
    )
    assert read_manifest(manifest) == [
        ManifestRow(
            1, f"{manifest}:1", os.path.join(tmp_path, "a.png"), "a.png", ("van_gogh", "monet"),
            (None, "/abs/m.png"), None, 3.0, None,
        ),
        ManifestRow(
            2, f"{manifest}:3", os.path.join(tmp_path, "b.png"), "b.png", ("monet",),
            (os.path.join(tmp_path, "m.png"),), "a dog", None, "b_out",
        ),
        ManifestRow(3, f"{manifest}:4", os.path.join(tmp_path, "c.png"), "c.png", (), (), None, None, None),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ('["a.png"]', "not a JSON object"),
        ('{"content": "b.png",}', "not a JSON line"),
        ('{"content": "b.png", "mask": "m.png"}', "unknown manifest column"),
        ('{"content": "b.png", "scale": true}', "scale is not a number"),
        ('{"content": "b.png", "styles": ["a", "b"], "masks": [null]}', "masks do not match styles"),
        ('{"styles": "monet"}', "content is empty"),
    ],
)
def test_jsonl_bad_line_names_its_line(tmp_path: Path, line: str, what: str) -> None:
    manifest = write(tmp_path / "jobs.jsonl", '{"content": "a.png"}\n\n' + line + "\n")
    with pytest.raises(UserError) as caught:
        read_manifest(manifest)
    assert (caught.value.what, caught.value.where) == (what, f"{manifest}:3")


def test_manifest_relative_to_the_current_folder_and_outside_it(in_tmp: Path) -> None:
    (in_tmp / "sets").mkdir()
    write(in_tmp / "sets/jobs.csv", "content,masks\nx/a.png,m.png\n../b.png,\n")
    write(in_tmp / "here.csv", "content\nc.png\n")
    rows = read_manifest("sets/jobs.csv") + read_manifest("here.csv")
    assert [(row.content, row.rel, row.masks) for row in rows] == [
        (os.path.join("sets", "x/a.png"), "x/a.png", (os.path.join("sets", "m.png"),)),
        (os.path.join("sets", "../b.png"), "b.png", ()),
        ("c.png", "c.png", ()),
    ]


def test_empty_manifests_are_no_rows(tmp_path: Path) -> None:
    assert read_manifest(write(tmp_path / "header.csv", "\ufeffcontent,styles\n\n")) == []
    assert read_manifest(write(tmp_path / "nothing.csv", "")) == []
    assert read_manifest(write(tmp_path / "nothing.jsonl", "\n  \n")) == []


def test_manifest_file_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError) as caught:
        read_manifest(str(tmp_path / "gone.csv"))
    assert caught.value.where == "data.manifest" and "gone.csv" in caught.value.why

    with pytest.raises(UserError) as caught:
        read_manifest(write(tmp_path / "jobs.tsv", "content\na.png\n"), key="m")
    assert (caught.value.what, caught.value.where) == ("unknown manifest format", "m")

    latin1 = write(tmp_path / "latin1.csv", "content,prompt\na.png,caf\xe9\n", encoding="latin-1")
    with pytest.raises(UserError) as caught:
        read_manifest(latin1)
    assert (caught.value.what, caught.value.where) == ("cannot read file", latin1)
