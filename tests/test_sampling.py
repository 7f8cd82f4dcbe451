import pytest
import torch
from diffusers import DDIMScheduler

from diffstyler.callbacks.preview import sample_text_to_image
from diffstyler.models import ModelSpec, load_pipeline
from diffstyler.sampling import ddim_schedule, ddim_step, split_prediction


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_diffusers_scheduler(prediction_type):
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    schedule = ddim_schedule(scheduler, 10)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    for i, t in enumerate(schedule.timesteps):
        output = torch.randn(1, 4, 8, 8, generator=generator)
        ours = ddim_step(sample, output, schedule.alphas[i], schedule.alphas[i + 1], prediction_type)
        theirs = scheduler.step(output, t, sample).prev_sample
        assert (ours - theirs).abs().max().item() < 1e-5
        sample = theirs


def test_inverse_step_undoes_a_step_for_a_fixed_noise():
    generator = torch.Generator().manual_seed(1)
    x, eps = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    a_noisy, a_clean = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)
    down = ddim_step(x, eps, a_noisy, a_clean)
    assert (ddim_step(down, eps, a_clean, a_noisy) - x).abs().max().item() < 1e-5
    noise, _ = split_prediction(eps, x, a_noisy, "epsilon")
    assert torch.equal(noise, eps)


def test_preview_sampler_equals_the_diffusers_pipeline():
    pipe = load_pipeline(ModelSpec(name="tiny"))
    ours = sample_text_to_image(pipe, "painting", "ugly", 64, 48, 4, 7.5, torch.Generator().manual_seed(3))
    latents = torch.randn((1, 4, 8, 6), generator=torch.Generator().manual_seed(3))
    theirs = pipe("painting", negative_prompt="ugly", height=64, width=48, num_inference_steps=4, guidance_scale=7.5,
                  latents=latents, output_type="pt").images
    assert ours.shape == theirs.shape == (1, 3, 64, 48)
    assert (ours - theirs).abs().max().item() < 1e-4
