"""Small builders shared by the stylization tests (tiny models only, no weights, no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from diffstyler.backbones import backbone_for
from diffstyler.inversion import invert
from diffstyler.lora import StyleLoRAConfig, add_style_adapter, save_lora, set_adapter_scales
from diffstyler.models import ModelSpec, encode_images, encode_prompts, load_pipeline
from diffstyler.sampling import ddim_schedule


def randomize_adapter(unet, name: str, seed: int, std: float = 0.3) -> None:
    """Give an adapter non-zero B matrices so that it changes the UNet (a fresh LoRA is a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in unet.named_parameters():
            if f"lora_B.{name}." in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def tiny_pipe_with_adapter(name: str = "style", seed: int = 1, rank: int = 4, model: str = "tiny"):
    pipe = load_pipeline(ModelSpec(name=model))
    denoiser = backbone_for(pipe).denoiser
    add_style_adapter(denoiser, StyleLoRAConfig(rank=rank), name)
    randomize_adapter(denoiser, name, seed)
    denoiser.requires_grad_(False)
    return pipe


def write_random_lora(folder: Path, seed: int, prompt: str = "painting of sss", model: str = "tiny") -> Path:
    """A LoRA file as `diffstyler fit` writes it for the tiny `model`, with random weights, plus its info file."""
    pipe = tiny_pipe_with_adapter("style", seed, model=model)
    save_lora(backbone_for(pipe).denoiser, "style", folder)
    (folder / "diffstyler_lora.json").write_text(json.dumps({"prompt": prompt, "base_model": model}))
    return folder / "pytorch_lora_weights.safetensors"


def lora_and_rotated_photos(folder: Path, photos: int, degrees: int) -> tuple[str, str]:
    """A random LoRA folder and a folder of `photos` copies of the test photo, each rotated by
    `degrees` more than the last (different contents of one size): both as the CLI takes them."""
    lora = write_random_lora(folder / "lora", seed=2).parent
    (folder / "photos").mkdir()
    for k in range(photos):
        Image.open(CONTENT).rotate(degrees * k).save(folder / "photos" / f"photo{k}.png")
    return str(lora), str(folder / "photos")


def two_style_setup(steps: int):
    """A tiny pipeline with adapters "a" and "b", a DDIM schedule of `steps`, the prompt embeddings
    ["", "painting a", "painting b", "ugly"] and the inversion trajectory of a seeded 64x48 image."""
    pipe = tiny_pipe_with_adapter("a", seed=1)
    add_style_adapter(pipe.unet, StyleLoRAConfig(rank=4), "b")
    randomize_adapter(pipe.unet, "b", seed=2)
    pipe.unet.requires_grad_(False)
    set_adapter_scales(pipe.unet, {"a": 1.0, "b": 1.0})
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 64, 48, generator=generator) * 2 - 1
    schedule = ddim_schedule(pipe.scheduler, steps)
    prompts = encode_prompts(pipe, ["", "painting a", "painting b", "ugly"])
    pipe.unet.disable_adapters()
    trajectory = invert(backbone_for(pipe), encode_images(pipe, pixels), prompts[:1], schedule, progress=False)
    pipe.unet.enable_adapters()
    return pipe, schedule, prompts, trajectory


def run_cli_in_process(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`diffstyler <args>` in this process from the repository root: (exit status, stdout + stderr)."""
    from diffstyler.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    capsys.readouterr()
    try:
        main(args)
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def printed_config(args: list[str], monkeypatch, capsys) -> dict:
    """The config `diffstyler <args> --print_config` prints (in this process), read back."""
    import yaml

    status, output = run_cli_in_process([*args, "--print_config"], monkeypatch, capsys)
    assert status in (0, None), output[-2000:]
    return yaml.safe_load(output[output.index("seed_everything"):])


def run_console(args: list[str], **environment: str) -> subprocess.Popen:
    """`diffstyler <args>` as the console script, offline, from the repository root (DDP needs a
    real process: it starts the other ranks from sys.argv)."""
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    return subprocess.Popen([str(Path(sys.executable).parent / "diffstyler"), *args], cwd=Path(__file__).resolve().parents[1],
                            env={**offline, **environment}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> tuple[int, str]:
    """(exit status, stdout + stderr) of a `run_console` process."""
    out, err = process.communicate(timeout=300)
    return process.returncode, out + err


def stylize_one(predictor, job):
    """`diffstyler predict`'s work for one job without a Trainer: the predictor's result, written by
    its writer; the job's record (status, output paths)."""
    return predictor.writer.write(predictor.stylize_jobs([job]))[0]


def denoise_with_injection(pipe, trajectory, reference, styles, schedule, injection, sampling, callback=None, progress=False):
    """`stylize.denoise_jobs` for one job: each style's final latent."""
    from diffstyler.stylize import DenoiseJob, denoise_jobs

    return denoise_jobs(backbone_for(pipe), [DenoiseJob(trajectory, reference, styles)], schedule, injection, sampling, callback, progress)[0]


REPO_ROOT = Path(__file__).resolve().parents[1]
CONTENT = REPO_ROOT / "data" / "content_shapes.png"  # 64 x 48, not square
MASK = REPO_ROOT / "data" / "content_shapes_mask.png"


def make_predictor(tmp_path: Path, model: str = "tiny", **output):
    """A `StylizePredictor` on a tiny `model` with short windows (6 steps), writing to `tmp_path/out`, model loaded."""
    from diffstyler.injection import InjectionConfig
    from diffstyler.predictor import OutputConfig, StylizePredictor
    from diffstyler.stylize import SamplingConfig

    predictor = StylizePredictor(
        model=ModelSpec(name=model),
        injection=InjectionConfig(feature_steps=4, attention_steps=3),
        sampling=SamplingConfig(steps=6),
        output=OutputConfig(folder=str(tmp_path / "out"), **output),
        inversion_cache=str(tmp_path / "cache"),
        progress=False,
    )
    predictor.configure_model()
    return predictor


def make_job(styles, seed=7, content=CONTENT):
    """The one job of `content` with these styles, at 64 px."""
    from diffstyler.data.jobs import StylizeDataModule

    return StylizeDataModule(content=[str(content)], styles=styles, seed=seed, resolution=64).jobs()[0]


# --- transformer families (SD 3.5, FLUX.1) ----------------------------------------------------------

def write_transformer_lora(folder: Path, model: str, seed: int = 1) -> Path:
    """A random style LoRA of a tiny transformer model, as `diffstyler fit` writes it."""
    transformer = load_pipeline(ModelSpec(model)).transformer
    add_style_adapter(transformer, StyleLoRAConfig(rank=4), "style")
    randomize_adapter(transformer, "style", seed)
    save_lora(transformer, "style", folder)
    (folder / "diffstyler_lora.json").write_text(json.dumps({"prompt": "painting of sss", "base_model": model}))
    return folder


def write_gguf(transformer: torch.nn.Module, path: Path) -> Path:
    """The transformer's weights as a GGUF file, as the community's converters write them: every
    2-D weight whose rows fill whole Q8_0 blocks of 32 quantized to Q8_0, the rest float32. Its
    keys are diffusers' layout, which `from_single_file` reads as it is: published FLUX.1 files use
    Black Forest Labs' layout, whose converter in diffusers assumes FLUX.1's real width (3072), so a
    tiny file cannot be written in it."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, tensor in transformer.state_dict().items():
        values = tensor.float().numpy()
        if values.ndim == 2 and values.shape[1] % 32 == 0:
            blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def inversion_requests(pipe, images, sampling) -> list:
    """The images with their inversion cache keys under `sampling` (`DiffStylerPipeline.trajectories`' input)."""
    from diffstyler.injection import InjectionConfig

    settings = pipe.pixel_settings([], sampling, InjectionConfig(), seed=0, resolution=max(images[0].size), composite=False)
    return [(settings.inversion_key(image), image) for image in images]
