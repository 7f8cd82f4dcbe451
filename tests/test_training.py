"""Style LoRA training on the tiny model: what is trained, that it learns, checkpoints, resume, bad inputs."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import diffstyler.training
from diffstyler.conditioning import Conditioning
from diffstyler.callbacks import PreviewGrid, sample_text_to_image
from diffstyler.cli import main
from diffstyler.data import StyleDataModule
from diffstyler.data.style import OneBatchPerEpochSampler
from diffstyler.images import ImageLoadError, resize_to_multiple, sha256_file, to_tensor
from diffstyler.lora import LORA_WEIGHTS_NAME, StyleLoRAConfig
from diffstyler.models import ModelSpec
from diffstyler.training import METADATA_NAME, StyleLoRAModule

STEPS = 40
CHECKPOINT_EVERY = 10
RESUME_FROM = 30
# Far above the paper's 2e-4 so that 40 steps on the tiny random model learn something clear.
LEARNING_RATE = 5e-3


class LossRecorder(Callback):
    """Loss of every optimizer step, keyed by the global step it completed."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def make_module(output_dir: Path) -> StyleLoRAModule:
    return StyleLoRAModule(
        model=ModelSpec("tiny"),
        lora=StyleLoRAConfig(rank=4),
        learning_rate=LEARNING_RATE,
        output_dir=str(output_dir),
        seed=0,
    )


def make_trainer(callbacks: list[Callback], root: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=STEPS,
        logger=False,
        callbacks=callbacks,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@torch.no_grad()
def fixed_set_loss(module: StyleLoRAModule, datamodule: StyleDataModule) -> float:
    """Mean loss over 8 fixed (noise, timestep) pairs spread over the whole schedule."""
    batch = next(iter(datamodule.train_dataloader()))
    latents = module.style_latents(batch).repeat(8, 1, 1, 1)
    prompt_embeds = module.prompt_conditioning(batch["prompt"] * 8)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(123))
    timesteps = torch.linspace(50, 950, 8).long()
    return module.denoising_loss(latents, prompt_embeds, noise, timesteps).item()


@dataclass
class TrainedRun:
    module: StyleLoRAModule
    datamodule: StyleDataModule
    losses: dict[int, float]
    frozen_before: dict[str, torch.Tensor]
    fixed_loss_before: float
    fixed_loss_after: float
    checkpoint_dir: Path
    output_dir: Path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, style_image) -> TrainedRun:
    root = tmp_path_factory.mktemp("fit")
    datamodule = StyleDataModule([str(style_image)], resolution=64)
    module = make_module(root / "lora")
    torch.manual_seed(0)  # PEFT draws the initial lora_A from the global RNG
    module.configure_model()  # early, to snapshot the base and measure the untrained LoRA
    trainable = module.trainable_parameter_names()
    frozen_before = {name: value.clone() for name, value in module.state_dict().items() if name not in trainable}
    fixed_loss_before = fixed_set_loss(module, datamodule)

    recorder = LossRecorder()
    checkpoints = ModelCheckpoint(
        dirpath=root / "checkpoints", filename="{step}", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1
    )
    make_trainer([recorder, checkpoints], root).fit(module, datamodule)
    return TrainedRun(
        module=module,
        datamodule=datamodule,
        losses=recorder.losses,
        frozen_before=frozen_before,
        fixed_loss_before=fixed_loss_before,
        fixed_loss_after=fixed_set_loss(module, datamodule),
        checkpoint_dir=root / "checkpoints",
        output_dir=root / "lora",
    )


@pytest.mark.slow
def test_only_lora_parameters_are_trainable(trained_run):
    module = trained_run.module
    trainable = module.trainable_parameter_names()
    lora_names = {name for name, _ in module.named_parameters() if ".lora_" in name}
    assert trainable == lora_names and len(trainable) > 0
    assert all(name.startswith("denoiser.") for name in trainable)
    assert all(parameter.dtype == torch.float32 for name, parameter in module.named_parameters() if name in trainable)


def test_base_weights_are_bit_identical_after_fit(trained_run):
    after = trained_run.module.state_dict()
    assert trained_run.module.global_step == STEPS
    for name, before in trained_run.frozen_before.items():
        assert torch.equal(after[name], before), name


def test_training_lowers_the_loss_on_fixed_noise_and_timesteps(trained_run):
    assert trained_run.fixed_loss_after < 0.95 * trained_run.fixed_loss_before


def test_checkpoint_holds_only_the_lora_and_is_small(trained_run):
    checkpoint_file = trained_run.checkpoint_dir / f"step={CHECKPOINT_EVERY}.ckpt"
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    assert set(checkpoint["state_dict"]) == trained_run.module.trainable_parameter_names()
    assert checkpoint["optimizer_states"]
    unet_bytes = sum(p.numel() * p.element_size() for p in trained_run.module.denoiser.parameters())
    assert checkpoint_file.stat().st_size < 0.1 * unet_bytes


@pytest.mark.slow
def test_resume_continues_at_the_saved_step_with_the_same_losses(trained_run, tmp_path):
    module = make_module(tmp_path / "lora")
    recorder = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1)
    checkpoint_file = trained_run.checkpoint_dir / f"step={RESUME_FROM}.ckpt"
    make_trainer([recorder, checkpoints], tmp_path).fit(module, trained_run.datamodule, ckpt_path=checkpoint_file)

    assert sorted(recorder.losses) == list(range(RESUME_FROM + 1, STEPS + 1))
    for step, loss in recorder.losses.items():
        assert loss == pytest.approx(trained_run.losses[step], abs=1e-6), f"step {step}"
    uninterrupted = trained_run.module.state_dict()
    for name in module.trainable_parameter_names():
        torch.testing.assert_close(module.state_dict()[name], uninterrupted[name], rtol=0, atol=1e-6)


def test_fit_exports_a_loadable_lora_and_its_metadata(trained_run, tiny_pipe, unet_probe, style_image):
    metadata = json.loads((trained_run.output_dir / METADATA_NAME).read_text())
    assert metadata["base_model"]["name"] == "tiny"
    assert (metadata["rank"], metadata["alpha"], metadata["steps"], metadata["seed"]) == (4, 4, STEPS, 0)
    assert metadata["target_modules"] == ["to_q", "to_k", "to_v"]
    assert metadata["prompt"] == "painting of <sss>"
    assert metadata["style_images"][0]["sha256"] == sha256_file(style_image)

    fresh = tiny_pipe()
    fresh.load_lora_weights(str(trained_run.output_dir), weight_name=LORA_WEIGHTS_NAME, adapter_name="style")
    difference = unet_probe(fresh.unet) - unet_probe(trained_run.module.denoiser)
    assert difference.abs().max() < 1e-5


def lora_gradients(module: StyleLoRAModule, datamodule: StyleDataModule) -> dict[str, torch.Tensor]:
    batch = next(iter(datamodule.train_dataloader()))
    generator = torch.Generator().manual_seed(5)
    latents = module.style_latents(batch)
    noise = torch.randn(latents.shape, generator=generator)
    loss = module.denoising_loss(latents, module.prompt_conditioning(batch["prompt"]), noise, torch.tensor([400]))
    loss.backward()
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, style_image):
    datamodule = StyleDataModule([str(style_image)], resolution=64)
    gradients = []
    for checkpointing in (False, True):
        module = StyleLoRAModule(ModelSpec("tiny"), StyleLoRAConfig(rank=4), gradient_checkpointing=checkpointing)
        torch.manual_seed(0)  # PEFT draws the initial lora_A from the global RNG
        module.configure_model()
        with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without gradient
            for name, parameter in module.denoiser.named_parameters():
                if "lora_B" in name:
                    parameter.fill_(0.01)
        gradients.append(lora_gradients(module, datamodule))
    assert module.denoiser.is_gradient_checkpointing
    for name, gradient in gradients[0].items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-4, atol=1e-7)


def test_latent_augmentation_is_seeded_and_keeps_shapes_batchable():
    module = StyleLoRAModule(ModelSpec("tiny"))
    latents = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8)
    switches = {"crop": torch.tensor([True, True]), "flip": torch.tensor([True, True])}
    first, corners = module.augment_latents(latents, switches, torch.Generator().manual_seed(3))
    again, same_corners = module.augment_latents(latents, switches, torch.Generator().manual_seed(3))
    assert first.shape == (2, 4, 6, 6) and torch.equal(first, again) and corners == same_corners
    assert all(0 <= top <= 2 and 0 <= left <= 2 for top, left in corners)
    untouched, none = module.augment_latents(latents, {"crop": torch.tensor([False] * 2), "flip": torch.tensor([False] * 2)},
                                             torch.Generator())
    assert torch.equal(untouched, latents) and none == [(0, 0), (0, 0)]


def test_half_precision_base_needs_a_mixed_precision_trainer(tmp_path, style_image):
    module = StyleLoRAModule(ModelSpec("tiny", dtype="float16"), output_dir=str(tmp_path / "lora"))
    trainer = L.Trainer(accelerator="cpu", precision="32-true", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="mixed"):
        trainer.fit(module, StyleDataModule([str(style_image)], resolution=64))


@pytest.mark.slow
def test_preview_grids_are_logged_without_changing_training(tmp_path, style_image):
    losses = {}
    for with_preview in (False, True):
        module = make_module(tmp_path / f"lora_{with_preview}")
        recorder = LossRecorder()
        callbacks = [recorder] + ([PreviewGrid(every_n_steps=1, steps=2, images_per_prompt=2)] if with_preview else [])
        trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=TensorBoardLogger(tmp_path, name=str(with_preview)),
                            callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, log_every_n_steps=1)
        torch.manual_seed(0)
        trainer.fit(module, StyleDataModule([str(style_image)], resolution=64))
        losses[with_preview] = recorder.losses

    # Two-thread CPU training is not bit-reproducible (about 1e-7 here); a preview that moved the
    # training's randomness would change the second step's noise and timestep, and its loss by far more.
    assert losses[True].keys() == losses[False].keys()
    assert all(losses[True][step] == pytest.approx(losses[False][step], rel=1e-5) for step in losses[False])
    # `module` and `trainer` are those of the run with previews.
    assert all(p.dtype == torch.float32 for name, p in module.named_parameters() if p.requires_grad)
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    grids = events.Images("preview")
    assert [grid.step for grid in grids] == [1, 2]
    assert (grids[0].width, grids[0].height) == (2 * 64 + 3 * 2, 64 + 2 * 2)  # 2 images, make_grid padding 2
    assert "train/loss" in events.Tags()["scalars"]


def test_text_to_image_sampler_is_seeded_and_leaves_the_pipeline_scheduler_alone(tiny_pipe):
    pipe = tiny_pipe()
    scheduler_timesteps = pipe.scheduler.timesteps.clone()

    def sample() -> torch.Tensor:
        return sample_text_to_image(pipe, "painting of <sss>", "", height=48, width=64, steps=3,
                                    guidance_scale=7.5, generator=torch.Generator().manual_seed(0))

    images = sample()
    assert images.shape == (1, 3, 48, 64) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(sample(), images)
    assert torch.equal(pipe.scheduler.timesteps, scheduler_timesteps)


# --- style data ---------------------------------------------------------------------------------


def test_images_are_resized_to_multiples_of_8_with_the_long_side_at_the_resolution():
    assert resize_to_multiple(Image.new("RGB", (640, 480)), 512).size == (512, 384)
    assert resize_to_multiple(Image.new("RGB", (300, 1000)), 512).size == (152, 512)
    assert resize_to_multiple(Image.new("RGB", (64, 48)), 64).size == (64, 48)
    pixels = to_tensor(Image.new("RGB", (16, 8), (255, 0, 128)))
    assert pixels.shape == (3, 8, 16) and pixels.max() == 1 and pixels.min() == -1


def test_style_batches_cycle_through_the_images_by_epoch():
    sampler = OneBatchPerEpochSampler(num_images=3, batch_size=2)
    batches = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches.append(list(sampler))
    assert batches == [[0, 1], [2, 0], [1, 2]]


def test_style_items_carry_index_prompt_and_pixels_in_range(style_image):
    item = StyleDataModule([str(style_image)], prompt="a <sss> prompt", resolution=32).dataset[0]
    assert item["index"] == 0 and item["prompt"] == "a <sss> prompt"
    assert item["pixel_values"].shape == (3, 32, 32)
    assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1


def write_bad_image(kind: str, folder: Path, style_image: Path) -> Path:
    path = folder / f"{kind}.png"
    if kind == "text":
        path.write_text("this is not an image")
    if kind == "truncated":
        path.write_bytes(style_image.read_bytes()[:120])
    return path  # "missing": never written


@pytest.mark.parametrize(
    "kind, error", [("missing", FileNotFoundError), ("text", ImageLoadError), ("truncated", ImageLoadError)]
)
def test_bad_style_image_is_named_by_the_data_module(kind, error, tmp_path, style_image):
    bad = write_bad_image(kind, tmp_path, style_image)
    with pytest.raises(error, match=re.escape(str(bad))):
        StyleDataModule([str(style_image), str(bad)])


@pytest.mark.parametrize("kind", ["missing", "text"])
def test_bad_style_image_fails_the_cli_before_any_model_is_loaded(kind, tmp_path, style_image, repo_root, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(diffstyler.training, "load_pipeline", lambda spec: loads.append(spec))
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    bad = write_bad_image(kind, tmp_path, style_image)
    args = ["fit", "--config", str(repo_root / "configs/smoke/style.yaml"), "--data.images", f"[{bad}]",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--model.output_dir", str(tmp_path / "lora")]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and str(bad) in capsys.readouterr().err
    assert loads == []
    assert not (tmp_path / "logs").exists()


def test_v_prediction_models_train_on_the_velocity(tmp_path):
    """Eq. 3 for a v-prediction model: the target is sqrt(a) eps - sqrt(1 - a) z0, written out here.
    Catches training a v-prediction model on the noise (or on the latent)."""
    module = StyleLoRAModule(model=ModelSpec("tiny", prediction_type="v_prediction"), lora=StyleLoRAConfig(rank=4),
                             output_dir=str(tmp_path))
    module.configure_model()
    assert module.backbone.family.prediction_type == "v_prediction"
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    prompts = torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([100, 800])
    a = module.backbone.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    velocity = a.sqrt() * noise - (1 - a).sqrt() * latents
    with torch.no_grad():
        loss = module.denoising_loss(latents, Conditioning(prompts), noise, timesteps)
        prediction = module.denoiser(noisy, timesteps, encoder_hidden_states=prompts).sample
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(prediction, velocity).item(), rel=1e-5)
    assert loss.item() != pytest.approx(torch.nn.functional.mse_loss(prediction, noise).item(), rel=1e-2)


@pytest.mark.slow
def test_fit_without_a_config_trains_the_papers_200_steps(tmp_path, style_image, monkeypatch):
    """Every default of `diffstyler fit` is the paper's (only the model and image size are made small)."""
    monkeypatch.chdir(tmp_path)  # the default logs go to outputs/logs under the working folder
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    main(["fit", "--model.model.name", "tiny", "--data.images", f"[{style_image}]", "--data.resolution", "64",
          "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--model.output_dir", "lora"])
    metadata = json.loads((tmp_path / "lora" / METADATA_NAME).read_text())
    assert metadata["steps"] == 200
    assert (metadata["rank"], metadata["alpha"], metadata["learning_rate"]) == (16, 16, 2e-4)
    assert metadata["target_modules"] == ["to_q", "to_k", "to_v"]
