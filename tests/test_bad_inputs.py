"""The catalogue of bad inputs: one row per case, each run through `diffstyler.cli.main` in-process.

Every row asserts what the "Bad input" table of docs/errors.md promises: exit status 2, one line
`diffstyler <cmd>: error: ...` (`diffstyler: error: ...` for a bad subcommand) on stderr naming the
file or config key and no traceback, no model loaded when the check needs none, and no file left
in the output folder. Two cases run as real subprocesses to check the console output itself (one
of them on two DDP processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffstyler.checks
import diffstyler.models
from diffstyler.cli import main
from diffstyler.cli.command_line import SUBCOMMANDS
from diffstyler.images import sha256_file
from tests.helpers import write_random_lora

REPO_ROOT = Path(__file__).resolve().parents[1]
STYLIZE_CONFIG = str(REPO_ROOT / "configs" / "smoke" / "stylize.yaml")
STYLE_CONFIG = str(REPO_ROOT / "configs" / "smoke" / "style.yaml")
CONTENT = REPO_ROOT / "data" / "content_shapes.png"
STYLE_IMAGE = REPO_ROOT / "data" / "style_stripes.png"
USER_ERROR_STATUS = 2


# --- the bad files, made once --------------------------------------------------------------------

class BadFiles:
    """Every bad file of the catalogue, in one folder shared by the rows."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.lora = write_random_lora(folder / "good_lora", seed=3).parent
        self.pickled_lora = self.write(folder / "style.ckpt", b"a pickled LoRA")
        self.broken_lora = self.write(folder / "broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
        self.not_a_lora = folder / "weights.safetensors"
        save_file({"conv.weight": torch.zeros(2, 2)}, str(self.not_a_lora))
        self.sd1_lora = folder / "sd1_style.safetensors"
        self.write_lora_for_width(self.sd1_lora, 768)
        self.lora_with_broken_info = self.lora_folder_with_info(folder / "broken_info", "{not json")
        self.lora_without_prompt = self.lora_folder_with_info(folder / "no_prompt", json.dumps({"rank": 4}))
        self.text_file = self.write(folder / "notes.png", b"this is not an image")
        self.truncated_photo = self.write(folder / "truncated.png", CONTENT.read_bytes()[: CONTENT.stat().st_size // 2])
        self.black_mask = folder / "black_mask.png"
        Image.new("L", (64, 48)).save(self.black_mask)
        self.checkpoint_text = self.write(folder / "notes.ckpt", b"this is not a checkpoint")
        self.checkpoint_with_code = folder / "crafted.ckpt"
        self.code_ran_marker = folder / "code_ran"
        torch.save({"state_dict": {}, "payload": RunsCodeWhenUnpickled(self.code_ran_marker)}, self.checkpoint_with_code)
        self.plain_file = self.write(folder / "a_file", b"x")
        self.styles_sharing_a_stem = folder / "styles_sharing_a_stem"
        self.styles_sharing_a_stem.mkdir()
        Image.open(STYLE_IMAGE).save(self.styles_sharing_a_stem / "stripes.png")
        Image.open(STYLE_IMAGE).save(self.styles_sharing_a_stem / "stripes.jpg")
        self.loras_of_other_steps = folder / "loras_of_other_steps"
        self.lora_folder_with_info(self.loras_of_other_steps / STYLE_IMAGE.stem, json.dumps(
            {"steps": 999, "style_images": [{"path": str(STYLE_IMAGE), "sha256": sha256_file(STYLE_IMAGE)}]}))
        self.lora_collection = folder / "lora_collection"
        for name in ("ink", "oil"):
            write_random_lora(self.lora_collection / name, seed=4)
        self.protocol_without_fit = folder / "protocol.yaml"
        self.protocol_without_fit.write_text("predict:\n  data:\n    content: [x.png]\ntest:\n  data:\n    results: [out]\n")
        self.protocol_with_a_typo = folder / "protocol_typo.yaml"
        self.protocol_with_a_typo.write_text("fit:\n  trainer:\n    max_stepz: 3\npredict:\n  data:\n    content: [x.png]\n")
        self.config_with_a_typo = folder / "typo.yaml"
        self.config_with_a_typo.write_text("model:\n  sampling:\n    stepz: 3\n")
        self.config_not_yaml = folder / "broken.yaml"
        self.config_not_yaml.write_text("model:\n  sampling: [3,\n")
        self.config_not_a_mapping = folder / "list.yaml"
        self.config_not_a_mapping.write_text("- model\n- data\n")
        self.fastsam_with_code = folder / "FastSAM-crafted.pt"
        torch.save({"model": RunsCodeWhenUnpickled(self.code_ran_marker)}, self.fastsam_with_code)
        self.nan_lora = self.lora_folder_with_info(folder / "nan_lora", json.dumps({"prompt": "painting"}))
        weights = load_file(self.nan_lora / "pytorch_lora_weights.safetensors")
        weights[sorted(weights)[-1]][0, 0] = float("nan")
        save_file(weights, str(self.nan_lora / "pytorch_lora_weights.safetensors"))
        self.model_folder_without_index = folder / "not_a_model"
        self.model_folder_without_index.mkdir()

    @staticmethod
    def write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        return path

    def lora_folder_with_info(self, folder: Path, info: str) -> Path:
        folder.mkdir(parents=True)
        (folder / "pytorch_lora_weights.safetensors").write_bytes((self.lora / "pytorch_lora_weights.safetensors").read_bytes())
        (folder / "diffstyler_lora.json").write_text(info)
        return folder

    @staticmethod
    def write_lora_for_width(path: Path, width: int) -> None:
        """A diffusers-format LoRA whose cross-attention to_k reads `width`-wide text embeddings."""
        key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        save_file({f"{key}.lora.down.weight": torch.zeros(4, width), f"{key}.lora.up.weight": torch.zeros(32, 4)}, str(path))


class RunsCodeWhenUnpickled:
    """A crafted checkpoint payload: unpickling it would create `marker` (it must never run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> BadFiles:
    return BadFiles(tmp_path_factory.mktemp("bad_inputs"))


# --- the commands ----------------------------------------------------------------------------------

def predict_args(tmp_path: Path, lora: str | Path, *extra: str) -> list[str]:
    """A predict run that stops at the first failing job (`data.on_error stop`), so that an error
    found when a job runs is the run's one line too (with "continue" it is recorded in
    results.jsonl and the run exits with status 1: tests/test_cli_batch.py)."""
    return ["predict", "--config", STYLIZE_CONFIG, "--data.on_error", "stop", "--data.content", json.dumps([str(CONTENT)]),
            "--data.styles", json.dumps([{"lora": str(lora)}]),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--model.output.folder", str(tmp_path / "out"), "--model.inversion_cache", str(tmp_path / "cache"), *extra]


def masked_predict_args(tmp_path: Path, bad: BadFiles, mask: dict) -> list[str]:
    return predict_args(tmp_path, bad.lora, "--data.styles", json.dumps([{"lora": str(bad.lora), "mask": mask}]))


def fit_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", STYLE_CONFIG, "--data.images", json.dumps([str(STYLE_IMAGE)]),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--model.output_dir", str(tmp_path / "lora"), *extra]


@dataclass
class Row:
    """One bad input: the command, what the line must name, and whether it fails before the model loads."""

    id: str
    args: Callable[[Path, BadFiles], list[str]]
    names: list[str] = field(default_factory=list)
    before_model: bool = True
    setup: Callable[[pytest.MonkeyPatch], None] = lambda monkeypatch: None


def refuse_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in for a read-only folder (the tests may run as root, for whom every folder is writable)."""
    monkeypatch.setattr(diffstyler.checks, "folder_is_writable", lambda folder: False)


ROWS = [
    # config values
    Row("steps_below_1", lambda t, b: predict_args(t, b.lora, "--model.sampling.steps", "0"), ["model.sampling.steps"]),
    Row("steps_not_a_number", lambda t, b: predict_args(t, b.lora, "--model.sampling.steps", "many"), ["model.sampling.steps"]),
    Row("injection_window_below_0", lambda t, b: predict_args(t, b.lora, "--model.injection.feature_steps", "-1"),
        ["model.injection.feature_steps"]),
    # layer numbers are checked against the loaded UNet's decoder (families.decoder_layers)
    Row("injection_layer_missing", lambda t, b: predict_args(t, b.lora, "--model.injection.feature_layers", "[12]"),
        ["model.injection.feature_layers", "decoder layers: 0-11"], before_model=False),
    Row("attention_layer_without_attention", lambda t, b: predict_args(t, b.lora, "--model.injection.attention_layers", "[1]"),
        ["model.injection.attention_layers", "layers with attention: 3-11"], before_model=False),
    Row("injection_layer_rule_unknown", lambda t, b: predict_args(t, b.lora, "--model.injection.attention_layers", "every"),
        ["model.injection.attention_layers", "unknown layer rule 'every'", "all, from_pnp"]),
    Row("predict_resolution_not_multiple_of_8", lambda t, b: predict_args(t, b.lora, "--data.resolution", "60"), ["data.resolution"]),
    Row("fit_resolution_not_multiple_of_8", lambda t, b: fit_args(t, "--data.resolution", "60"), ["data.resolution"]),
    Row("bad_dtype", lambda t, b: predict_args(t, b.lora, "--model.model.dtype", "float64"), ["model.model", "dtype"]),
    Row("lora_rank_below_1", lambda t, b: fit_args(t, "--model.lora.rank", "0"), ["model.lora.rank"]),
    Row("max_steps_below_1", lambda t, b: fit_args(t, "--trainer.max_steps", "0"), ["trainer.max_steps", ">= 1"]),
    # keys: exact, named with their option or file and the nearest known key
    Row("unknown_option", lambda t, b: predict_args(t, b.lora, "--model.sampling.stepz", "3"),
        ["unknown option (--model.sampling.stepz)", "did you mean --model.sampling.steps?"]),
    Row("abbreviated_option", lambda t, b: predict_args(t, b.lora, "--model.sampling.step", "20"),
        ["unknown option (--model.sampling.step)", "did you mean --model.sampling.steps?"]),
    Row("abbreviated_trainer_option", lambda t, b: fit_args(t, "--trainer.max_step", "20"),
        ["unknown option (--trainer.max_step)", "did you mean --trainer.max_steps?"]),
    Row("unknown_key_in_a_config_file", lambda t, b: predict_args(t, b.lora, "--config", str(b.config_with_a_typo)),
        ["unknown config key (model.sampling.stepz in /", "typo.yaml)", "did you mean model.sampling.steps?"]),
    Row("unknown_key_in_a_protocol_section", lambda t, b: ["fit", "--config", str(b.protocol_with_a_typo)],
        ["trainer.max_stepz in", "protocol_typo.yaml (fit section)", "did you mean trainer.max_steps?"]),
    Row("unknown_key_in_a_style_entry", lambda t, b: predict_args(t, b.lora, "--data.styles", json.dumps([{"lroa": str(b.lora)}])),
        ["unknown config key (data.styles[].lroa)", "did you mean lora?"]),
    Row("style_value_of_the_wrong_type", lambda t, b: predict_args(t, b.lora, "--data.styles", json.dumps(
        [{"lora": str(b.lora), "scale": "big"}])), ["invalid config value (data.styles[].scale)", "expected float, got big"]),
    Row("single_value_of_the_wrong_type", lambda t, b: predict_args(t, b.lora, "--model.sweep.feature_steps", "abc"),
        ["model.sweep.feature_steps", "expected int, got abc"]),
    Row("unknown_subcommand", lambda t, b: ["predcit", "--config", STYLIZE_CONFIG], ["unknown subcommand 'predcit'", "did you mean predict?"]),
    # config files
    Row("config_file_missing", lambda t, b: predict_args(t, b.lora, "--config", str(t / "nope.yaml")), ["config file not found", "nope.yaml"]),
    Row("config_file_not_yaml", lambda t, b: predict_args(t, b.lora, "--config", str(b.config_not_yaml)),
        ["config file is not valid YAML", "broken.yaml:3"]),
    Row("config_file_not_a_mapping", lambda t, b: fit_args(t, "--config", str(b.config_not_a_mapping)), ["list.yaml", "mapping"]),
    Row("mask_with_two_sources", lambda t, b: masked_predict_args(t, b, {"box": [1, 2], "file": "y.png"}), ["data.styles[0].mask"]),
    Row("mask_without_source", lambda t, b: masked_predict_args(t, b, {"grow": 1}), ["data.styles[0].mask"]),
    Row("box_of_three_numbers", lambda t, b: masked_predict_args(t, b, {"box": [1, 2, 3]}), ["data.styles[0].mask", "box"]),
    Row("box_inside_out", lambda t, b: masked_predict_args(t, b, {"box": [5, 5, 1, 1]}), ["data.styles[0].mask", "box"]),
    Row("mask_on_some_styles_only", lambda t, b: predict_args(t, b.lora, "--data.styles", json.dumps(
        [{"lora": str(b.lora), "mask": {"box": [0, 0, 8, 8]}}, {"lora": str(b.lora), "name": "other"}])), ["data.styles"]),
    Row("process_index_out_of_range", lambda t, b: fit_args(t, "--data.one_lora_per_image", "true", "--data.process_index", "3",
        "--data.num_processes", "2"), ["data.process_index"]),
    Row("protocol_without_the_section", lambda t, b: ["fit", "--config", str(b.protocol_without_fit)],
        ["protocol.yaml", "no fit section"]),
    # input files
    Row("content_missing", lambda t, b: predict_args(t, b.lora, "--data.content", json.dumps([str(t / "nope.png")])), ["nope.png"]),
    Row("content_not_an_image", lambda t, b: predict_args(t, b.lora, "--data.content", json.dumps([str(b.text_file)])), ["notes.png"]),
    Row("style_image_missing", lambda t, b: fit_args(t, "--data.images", json.dumps([str(t / "nope.png")])), ["nope.png"]),
    Row("style_images_sharing_a_stem", lambda t, b: fit_args(t, "--data.images", json.dumps([str(b.styles_sharing_a_stem)]),
        "--data.one_lora_per_image", "true"), ["data.images", "stripes.png", "stripes.jpg"]),
    Row("mask_file_not_an_image", lambda t, b: masked_predict_args(t, b, {"file": str(b.text_file)}), ["notes.png"]),
    # what differs per job, where the files show it: before the model loads too (data.inputs)
    Row("content_truncated", lambda t, b: predict_args(t, b.lora, "--data.content", json.dumps([str(b.truncated_photo)])),
        ["not a readable image", "truncated.png"]),
    Row("mask_file_empty", lambda t, b: masked_predict_args(t, b, {"file": str(b.black_mask)}), ["empty mask", "black_mask.png"]),
    Row("box_outside_the_photo", lambda t, b: masked_predict_args(t, b, {"box": [0, 0, 100, 80]}) + ["--model.segmenter.weights", "tiny"],
        ["box outside the content image", "64x48"]),
    # LoRA files
    Row("lora_missing", lambda t, b: predict_args(t, t / "no_lora"), ["no_lora"]),
    Row("lora_pickled", lambda t, b: predict_args(t, b.pickled_lora), ["style.ckpt", "pickled"]),
    Row("lora_broken_header", lambda t, b: predict_args(t, b.broken_lora), ["broken.safetensors"]),
    Row("lora_without_lora_keys", lambda t, b: predict_args(t, b.not_a_lora), ["weights.safetensors", "LoRA"]),
    Row("lora_for_another_model", lambda t, b: predict_args(t, b.sd1_lora, "--data.styles", json.dumps(
        [{"lora": str(b.sd1_lora), "prompt": "p"}])), ["sd1_style.safetensors", "SD 1.x"]),
    Row("lora_with_nan_weights", lambda t, b: predict_args(t, b.nan_lora), ["nan_lora", "NaN"]),
    Row("style_scale_not_finite", lambda t, b: predict_args(t, b.lora, "--data.styles", f"[{{lora: {b.lora}, scale: .inf}}]"),
        ["data.styles[0].scale", "finite"]),
    Row("lora_info_not_json", lambda t, b: predict_args(t, b.lora_with_broken_info), ["diffstyler_lora.json", "JSON"]),
    Row("lora_info_without_prompt", lambda t, b: predict_args(t, b.lora_without_prompt), ["diffstyler_lora.json", "prompt"]),
    Row("lora_folder_given_one_name", lambda t, b: predict_args(t, b.lora, "--data.styles", json.dumps(
        [{"lora": str(b.lora_collection), "name": "mine"}])), ["data.styles[0].name", "2 LoRAs"]),
    Row("one_lora_per_image_over_a_lora_of_other_steps", lambda t, b: fit_args(t, "--data.one_lora_per_image", "true",
        "--model.output_dir", str(b.loras_of_other_steps)), ["diffstyler_lora.json", "a LoRA with other settings"]),
    # checkpoints for fit --ckpt_path
    Row("checkpoint_missing", lambda t, b: fit_args(t, "--ckpt_path", str(t / "step=2.ckpt")), ["ckpt_path", "step=2.ckpt"]),
    Row("checkpoint_is_a_folder", lambda t, b: fit_args(t, "--ckpt_path", str(b.folder)), ["ckpt_path"]),
    Row("checkpoint_not_a_checkpoint", lambda t, b: fit_args(t, "--ckpt_path", str(b.checkpoint_text)), ["notes.ckpt"]),
    Row("checkpoint_without_state_dict", lambda t, b: fit_args(t, "--ckpt_path", str(b.not_a_lora)), ["weights.safetensors"]),
    Row("checkpoint_needing_code", lambda t, b: fit_args(t, "--ckpt_path", str(b.checkpoint_with_code)), ["crafted.ckpt", "code"]),
    # output folders
    Row("predict_output_folder_is_a_file", lambda t, b: predict_args(t, b.lora, "--model.output.folder", str(b.plain_file)),
        ["model.output.folder", "a_file"]),
    Row("predict_output_folder_inside_a_file", lambda t, b: predict_args(t, b.lora, "--model.output.folder", str(b.plain_file / "out")),
        ["model.output.folder"]),
    Row("predict_output_folder_not_writable", lambda t, b: predict_args(t, b.lora), ["model.output.folder"], setup=refuse_writes),
    Row("fit_output_dir_is_a_file", lambda t, b: fit_args(t, "--model.output_dir", str(b.plain_file)), ["model.output_dir", "a_file"]),
    Row("fit_output_dir_not_writable", lambda t, b: fit_args(t), ["model.output_dir"], setup=refuse_writes),
    # the base model
    Row("model_not_found", lambda t, b: predict_args(t, b.lora, "--model.model.name", str(t / "no_model")),
        ["no_model", "model.model.name"]),
    Row("model_folder_without_model_index", lambda t, b: predict_args(
        t, b.lora, "--model.model.name", str(b.model_folder_without_index)), ["not_a_model", "model.model.name", "model_index.json"]),
    # the rest of what is the same for every job: checked before the model loads, however many jobs
    Row("fastsam_weights_missing", lambda t, b: masked_predict_args(t, b, {"box": [0, 0, 8, 8]}) + [
        "--model.segmenter.weights", str(t / "FastSAM-s.pt")], ["model.segmenter.weights", "FastSAM-s.pt"]),
    Row("fastsam_weights_running_code", lambda t, b: masked_predict_args(t, b, {"box": [0, 0, 8, 8]}) + [
        "--model.segmenter.weights", str(b.fastsam_with_code)], ["model.segmenter.weights", "FastSAM-crafted.pt", "refused"]),
    Row("clip_model_not_cached_offline", lambda t, b: masked_predict_args(t, b, {"text": "the square"}) + [
        "--model.segmenter.weights", "tiny", "--model.segmenter.clip_model", "nobody/no-such-clip"],
        ["model.segmenter.clip_model", "nobody/no-such-clip"]),
    Row("guidance_scale_not_finite", lambda t, b: predict_args(t, b.lora, "--model.sampling.guidance_scale", ".nan"),
        ["model.sampling.guidance_scale", "finite"]),
    Row("inversion_cache_is_a_file", lambda t, b: predict_args(t, b.lora, "--model.inversion_cache", str(b.plain_file)),
        ["model.inversion_cache", "a_file"]),
    Row("injection_window_longer_than_sampling", lambda t, b: predict_args(t, b.lora, "--model.injection.feature_steps", "99"),
        ["model.injection.feature_steps", "0..10", "99"]),
    Row("swept_window_longer_than_sampling", lambda t, b: predict_args(t, b.lora, "--model.sweep.attention_steps", "[0, 11]"),
        ["model.sweep.attention_steps", "0..10", "11"]),
]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def error_lines(stderr: str, subcommand: str) -> list[str]:
    command = f"diffstyler {subcommand}" if subcommand in SUBCOMMANDS else "diffstyler"
    return [line for line in stderr.splitlines() if line.startswith(f"{command}: error: ")]


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_one_line_naming_it(row: Row, bad, tmp_path, capsys, monkeypatch, model_builds):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    monkeypatch.setenv("DIFFSTYLER_DEBUG", "0")  # off; and undone after the test, also when --debug set it
    row.setup(monkeypatch)
    args = row.args(tmp_path, bad)
    status, stderr = run_cli(args, capsys)

    assert status == USER_ERROR_STATUS, stderr[-2000:]
    assert "Traceback" not in stderr and "Union subtypes" not in stderr, stderr[-2000:]
    lines = error_lines(stderr, args[0])
    assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr[-2000:]
    assert all(name in lines[0] for name in row.names), lines[0]
    if row.before_model:
        assert model_builds == [], "the model was loaded before the check"
    assert files_under(tmp_path / "out") == [] and files_under(tmp_path / "lora") == []
    assert not bad.code_ran_marker.exists()


@pytest.mark.slow
def test_a_corrupt_inversion_cache_file_is_named_ignored_and_recomputed(bad, tmp_path, monkeypatch):
    """Not an error: the cache only saves time. The broken file is replaced by a good one."""
    from safetensors.torch import load_file

    from diffstyler.inversion import InversionCache

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    cache_file = tmp_path / "cache" / "trajectory.safetensors"
    cache_file.parent.mkdir()
    cache_file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    # Whatever the key, the run looks up this file (the digest is not what is tested here).
    monkeypatch.setattr(InversionCache, "path", lambda cache, key: cache_file)
    cheap = ["--model.progress", "false", "--model.sampling.steps", "2", "--model.injection.feature_steps", "1",
             "--model.injection.attention_steps", "1", "--model.output.grid", "false"]

    with pytest.warns(UserWarning, match=f"inversion cache file ignored.*{cache_file.name}"):
        main(predict_args(tmp_path, bad.lora, *cheap))
    assert (tmp_path / "out" / "content_shapes.png").is_file()
    assert load_file(str(cache_file))["trajectory"].shape[0] == 3  # recomputed (2 steps + z_0) and written again


@pytest.mark.slow
def test_debug_flag_shows_the_traceback_instead(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    monkeypatch.setenv("DIFFSTYLER_DEBUG", "0")  # off; and undone after the test, also when --debug set it
    with pytest.raises(ValueError, match="model.sampling"):
        main(predict_args(tmp_path, bad.lora, "--model.sampling.steps", "0", "--debug"))
    monkeypatch.setenv("DIFFSTYLER_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="no_lora"):
        main(predict_args(tmp_path, tmp_path / "no_lora"))


# --- real console output -------------------------------------------------------------------------

def run_console(args: list[str]) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "diffstyler"), *args]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    environment.pop("DIFFSTYLER_DEBUG", None)
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_console_mask_spec_error_is_one_line_with_status_2(bad, tmp_path):
    """jsonargparse would print a multi-line union report with a traceback for a bad mask spec."""
    result = run_console(masked_predict_args(tmp_path, bad, {"box": [1, 2], "file": "y.png"}))
    assert result.returncode == USER_ERROR_STATUS
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "diffstyler predict: error: invalid config value (data.styles[0].mask): "
        "a mask needs exactly one of file, text, box, points (got: file, box)")


@pytest.mark.slow
def test_ddp_job_failing_on_one_rank_is_the_last_line(bad, tmp_path):
    """Job 1 (rank 1) fails: its style's scale overflows the latents, which only the run can find
    (what the files show stops the run before any process starts: tests/data/test_inputs.py); job 0
    (rank 0) is fine. The user must read rank 1's error last, not rank 0's broken connection."""
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"content,styles,scale,output\n{CONTENT},{bad.lora},1,fine\n{CONTENT},{bad.lora},1e30,overflowing\n")
    args = predict_args(tmp_path, bad.lora, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.progress", "false",
                        "--data.content", "null", "--data.manifest", str(manifest))
    result = run_console(args)
    assert result.returncode == USER_ERROR_STATUS, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("diffstyler predict: error: [rank 1] ") and "non-finite" in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


# --- what is the same for every job stops the run, whatever the number of jobs ---------------------

def three_boxed_jobs(tmp_path: Path, bad: BadFiles, *extra: str) -> list[str]:
    """Three contents, each with a FastSAM box mask, failures recorded and the run going on."""
    contents = []
    for k in range(3):
        contents.append(tmp_path / f"photo{k}.png")
        Image.open(CONTENT).rotate(30 * k).save(contents[-1])
    return masked_predict_args(tmp_path, bad, {"box": [0, 0, 8, 8]}) + [
        "--data.on_error", "continue", "--data.content", json.dumps([str(path) for path in contents]), *extra]


def test_missing_fastsam_weights_stop_a_run_of_three_jobs_in_one_line(bad, tmp_path, capsys, monkeypatch, model_builds):
    """Catches the weights checked per job: three "job failed" lines, a summary naming neither key
    nor file, exit status 1, after the base model loaded."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    monkeypatch.setenv("DIFFSTYLER_DEBUG", "0")
    status, stderr = run_cli(three_boxed_jobs(tmp_path, bad, "--model.segmenter.weights", str(tmp_path / "FastSAM-s.pt")), capsys)
    assert status == USER_ERROR_STATUS, stderr[-2000:]
    lines = error_lines(stderr, "predict")
    assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr[-2000:]
    assert "(model.segmenter.weights)" in lines[0] and "FastSAM-s.pt" in lines[0]
    assert "job failed" not in stderr and " jobs: " not in stderr  # no job counted
    assert model_builds == []
    assert files_under(tmp_path / "out") == []


@pytest.mark.slow
def test_on_two_processes_an_error_of_the_run_is_one_line_without_a_rank(bad, tmp_path):
    """The run-wide checks run before the processes start: catches the checks left to each rank
    (`[rank 1] ...`, or a rank's broken connection as the last line) and processes started for nothing."""
    args = three_boxed_jobs(tmp_path, bad, "--model.segmenter.weights", str(tmp_path / "FastSAM-s.pt"),
                            "--trainer.devices", "2", "--trainer.strategy", "ddp")
    result = run_console(args)
    assert result.returncode == USER_ERROR_STATUS, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("diffstyler predict: error: FastSAM weights file"), result.stderr[-3000:]
    assert "(model.segmenter.weights)" in last
    assert "Traceback" not in result.stderr and "Initializing distributed" not in result.stderr
