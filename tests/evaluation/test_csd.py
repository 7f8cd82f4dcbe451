"""CSD (diffstyler.evaluation.csd and networks.csd_network): the architecture against the authors' code
and against transformers' CLIP, the metric against a computation by hand, the authors' input transform,
and loading their checkpoint weights-only.

What the authors' checkpoint holds is reconstructed here from their code (github.com/learn2phoenix/CSD):
`CSD/model.py` `CSD_CLIP("vit_large", content_proj_head="default")` keeps OpenAI CLIP's ViT-L/14
`clip.load("ViT-L/14")[0].visual` as `backbone` with `proj = None`, and two copies of `proj` as the
parameters `last_layer_style` and `last_layer_content`; `CSD/train_csd.py` saves
`{"model_state_dict": <DistributedDataParallel state dict, "module." first>, "opt_bb", "opt_proj",
"iter", "args": argparse.Namespace, ("fp16_scaler")}`. The names and shapes of OpenAI's `visual` are
those of `clip/model.py` `VisionTransformer(input_resolution=224, patch_size=14, width=1024, layers=24,
heads=1024 // 64, output_dim=768)`.
"""

from __future__ import annotations

import argparse
import io
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize, ToTensor

from diffstyler.errors import MissingFileError, UserError
from diffstyler.evaluation import networks
from diffstyler.evaluation.csd import CSD, VIT_L_14, CSDNetwork, csd_input
from diffstyler.evaluation.random_networks import TINY_CSD, random_csd_network
from tests.evaluation.images import images
from tests.evaluation.weights import CreatesMarker

# CLIP's normalisation as the authors' `CSD/loss_utils.py` `transforms_branch0` writes it.
AUTHORS_MEAN = (0.48145466, 0.4578275, 0.40821073)
AUTHORS_STD = (0.26862954, 0.26130258, 0.27577711)


def authors_checkpoint_shapes(width=1024, layers=24, patch=14, resolution=224, embedding=768) -> dict[str, tuple]:
    """The names and shapes of `checkpoint["model_state_dict"]` of the authors' CSD ViT-L (see the module
    docstring): OpenAI's `VisionTransformer` names under `backbone.`, without `proj`, and the two heads."""
    tokens = (resolution // patch) ** 2 + 1
    visual = {
        "class_embedding": (width,),
        "positional_embedding": (tokens, width),
        "conv1.weight": (width, 3, patch, patch),  # bias=False
        "ln_pre.weight": (width,), "ln_pre.bias": (width,),
        "ln_post.weight": (width,), "ln_post.bias": (width,),
    }
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        visual.update({
            block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
            block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
            block + "mlp.c_fc.weight": (4 * width, width), block + "mlp.c_fc.bias": (4 * width,),
            block + "mlp.c_proj.weight": (width, 4 * width), block + "mlp.c_proj.bias": (width,),
            block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
        })
    state = {f"backbone.{name}": shape for name, shape in visual.items()}
    state["last_layer_style"] = state["last_layer_content"] = (width, embedding)  # copies of proj [width, output_dim]
    return {f"module.{name}": shape for name, shape in state.items()}


def test_the_network_has_the_names_and_shapes_of_the_authors_checkpoint():
    """At the real sizes (on the meta device: no memory, no time). Catches: a bias on conv1, `proj` kept,
    the heads as nn.Linear (`.weight`, transposed), another MLP ratio, another patch size or token
    count, a missing ln_pre or ln_post, names that differ from OpenAI's."""
    with torch.device("meta"):
        network = CSDNetwork(VIT_L_14)
    ours = {f"module.{name}": tuple(value.shape) for name, value in network.state_dict().items()}
    expected = authors_checkpoint_shapes()
    assert len(expected) == 7 + 24 * 12 + 2
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert ours == expected
    assert sum(value.numel() for value in network.parameters()) == sum(int(np.prod(shape)) for shape in expected.values())


def to_transformers_clip(backbone_state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Our (OpenAI CLIP) backbone weights in the names of transformers' `CLIPVisionModel` (`model`):
    nn.MultiheadAttention's in_proj packs q, k, v in this order, transformers keeps them apart."""
    renamed = {}
    for name, value in backbone_state.items():
        if ".attn.in_proj_" in name:
            block, kind = name.split(".attn.in_proj_")
            for part, tensor in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                renamed[f"{block}.self_attn.{part}_proj.{kind}"] = tensor
            continue
        renamed[name] = value
    replacements = [
        ("conv1.weight", "embeddings.patch_embedding.weight"), ("class_embedding", "embeddings.class_embedding"),
        ("positional_embedding", "embeddings.position_embedding.weight"), ("ln_pre.", "pre_layrnorm."),
        ("ln_post.", "post_layernorm."), ("transformer.resblocks.", "encoder.layers."),
        (".attn.out_proj.", ".self_attn.out_proj."), (".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."),
        (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."),
    ]
    mapped = {}
    for name, value in renamed.items():
        for old, new in replacements:
            name = name.replace(old, new)
        mapped[name] = value
    in_4x = any(key.startswith("vision_model.") for key in model.state_dict())  # transformers 4.x nests the model
    prefix = "vision_model." if in_4x else ""
    return {prefix + name: value for name, value in mapped.items()}


def test_the_backbone_equals_transformers_clip_vision_model():
    """The same random weights in transformers' CLIP ViT (QuickGELU, as OpenAI's) give the same pooled
    feature. Catches: nn.GELU for QuickGELU, post-norm blocks, no ln_pre, the class token appended last
    or the mean of the tokens pooled, patches flattened column-major, a missing positional embedding."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    network = random_csd_network(seed=5)
    with torch.no_grad():  # not the initial LayerNorm (1, 0): every LayerNorm's weights count
        for module in network.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    config = CLIPVisionConfig(hidden_size=TINY_CSD.width, intermediate_size=4 * TINY_CSD.width,
                              num_hidden_layers=TINY_CSD.layers, num_attention_heads=TINY_CSD.heads,
                              image_size=TINY_CSD.input_resolution, patch_size=TINY_CSD.patch_size,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    clip = CLIPVisionModel(config).eval()
    backbone_state = {name.removeprefix("backbone."): value for name, value in network.state_dict().items()
                      if name.startswith("backbone.")}
    missing, unexpected = clip.load_state_dict(to_transformers_clip(backbone_state, clip), strict=False)
    assert unexpected == [] and [key for key in missing if not key.endswith("position_ids")] == []

    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = clip(pixel_values=x).pooler_output
        ours = network.backbone(x)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def style_images(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of three 224 x 224 images in [0, 1]: the style images and the results."""
    return images(3, seed=seed, size=224), images(3, seed=seed + 1, size=224)


def by_hand(network: CSDNetwork, style: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """CSD of each pair by hand: CLIP's normalisation, the backbone's feature, the style head, cosine."""
    mean, std = torch.tensor(AUTHORS_MEAN).view(1, 3, 1, 1), torch.tensor(AUTHORS_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        a = network.backbone((style - mean) / std) @ network.last_layer_style
        b = network.backbone((result - mean) / std) @ network.last_layer_style
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))


def test_csd_equals_the_cosine_of_the_style_embeddings_by_hand():
    """Catches: the content head for the style head, no L2 normalisation of the embeddings (their dot
    product instead of the cosine), no or another input normalisation, each result compared with
    another pair's style image, the mean taken over something else than the pairs."""
    network = random_csd_network(seed=7)
    style, result = style_images(seed=20)
    metric = CSD(network)
    with torch.no_grad():
        metric.update(style[:2], result[:2])
        metric.update(style[2:], result[2:])
    expected = by_hand(network, style, result)

    torch.testing.assert_close(metric.pair_values(), expected, rtol=0, atol=1e-6)
    assert float(metric.compute()) == pytest.approx(float(expected.mean()), abs=1e-6)
    # The pairs differ from each other far more than the tolerance: a mix-up of pairs would show.
    shifted = by_hand(network, style, result.roll(1, dims=0))
    assert (expected - shifted).abs().min() > 1e-3
    with torch.no_grad():
        assert network.style_embedding(style).norm(dim=1).sub(1).abs().max() < 1e-6


def test_csd_of_a_result_equal_to_its_style_image_is_one():
    network = random_csd_network(seed=7)
    style, _ = style_images(seed=21)
    metric = CSD(network)
    with torch.no_grad():
        metric.update(style, style.clone())
    torch.testing.assert_close(metric.pair_values(), torch.ones(3), rtol=0, atol=1e-6)


def test_csd_refuses_images_not_at_the_networks_size():
    metric = CSD(random_csd_network(seed=7))
    with pytest.raises(ValueError, match=r"\[B, 3, 224, 224\]"):
        metric.update(images(1, seed=1, size=64), images(1, seed=2, size=64))


@pytest.mark.parametrize("size", [(300, 200), (150, 260), (224, 224)])
def test_csd_input_is_the_authors_transform_pixel_for_pixel(size):
    """The authors' `transforms_branch0` without its Normalize (which the network applies): Resize(224,
    bicubic) on the PIL image, CenterCrop(224), ToTensor. Catches: bilinear, a stretch to 224 x 224, the
    crop before the resize, another rounding of the longer side."""
    pixels = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    authors = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224), ToTensor()])
    torch.testing.assert_close(csd_input(image), authors(image), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Loading the authors' checkpoint (small networks of the same layout written by the tests)
# ---------------------------------------------------------------------------------------------------


class Numpy1Pickler(pickle.Pickler):
    """Writes numpy's scalars under the name numpy 1.x gave them (`numpy.core.multiarray.scalar`), as
    in the authors' file; numpy 2 writes `numpy._core`. Protocol 2 (torch.save's) writes a global's
    name as plain text lines, so renaming them in the output is exact."""

    def __init__(self, file, protocol=None):
        super().__init__(_Renaming(file), protocol)


class _Renaming:
    def __init__(self, file):
        self.file = file

    def write(self, data):
        return self.file.write(bytes(data).replace(b"numpy._core.multiarray\nscalar\n", b"numpy.core.multiarray\nscalar\n"))


NUMPY1_PICKLE = types.SimpleNamespace(__name__="numpy1_pickle", Pickler=Numpy1Pickler, dump=pickle.dump)


def save_like_the_authors(path: Path, network: CSDNetwork) -> None:
    """`network` saved as the authors' `train_csd.py` saves its checkpoint: the DDP state dict, the two
    SGD optimizers' states (momentum buffers), the iteration and the argparse arguments (with numpy
    numbers, which pickle as `numpy.core.multiarray.scalar` and `numpy.dtype`)."""
    state = {f"module.{name}": value.clone() for name, value in network.state_dict().items()}
    parameters = [value.clone().requires_grad_(True) for value in network.state_dict().values()]
    optimizer = torch.optim.SGD(parameters, lr=0.1, momentum=0.9)
    sum(value.sum() for value in parameters).backward()
    optimizer.step()
    arguments = argparse.Namespace(arch="vit_large", lr=0.003, eval_k=[1, 5, 100], content_proj_head="default",
                                   lambda_c=np.float64(0.0), seed=np.int64(42))
    checkpoint = {"model_state_dict": state, "opt_bb": optimizer.state_dict(), "opt_proj": optimizer.state_dict(),
                  "iter": 100000, "args": arguments}
    torch.save(checkpoint, path, pickle_module=NUMPY1_PICKLE)


def test_the_authors_checkpoint_loads_weights_only_with_every_weight(tmp_path):
    """Catches: the release refused (weights_only's default allowlist has neither argparse.Namespace nor
    numpy's scalars), `model_state_dict` not taken, the `module.` prefix kept, only numpy 2's names
    allowed while the file has numpy 1's."""
    source = random_csd_network(seed=9)
    path = tmp_path / "pytorch_model.bin"
    save_like_the_authors(path, source)
    # What Hugging Face's pickle scan of the release lists beyond torch's own classes:
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert unsafe == {"argparse.Namespace", "numpy.core.multiarray.scalar", "numpy.dtype"}

    loaded = networks.csd_network(str(path), architecture=TINY_CSD)

    for name, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    assert not loaded.training and not any(parameter.requires_grad for parameter in loaded.parameters())


def test_a_flat_state_dict_without_the_prefix_loads_too(tmp_path):
    source = random_csd_network(seed=10)
    save_file({name: value.contiguous() for name, value in source.state_dict().items()}, tmp_path / "csd.safetensors")
    loaded = networks.csd_network(str(tmp_path / "csd.safetensors"), architecture=TINY_CSD)
    torch.testing.assert_close(loaded.last_layer_style, source.last_layer_style, rtol=0, atol=0)


def test_a_checkpoint_that_would_run_code_is_refused_and_never_run(tmp_path):
    """The release's allowlist widens weights_only by plain-data classes only."""
    marker = tmp_path / "marker"
    network = random_csd_network(seed=9)
    checkpoint = {"model_state_dict": network.state_dict(), "args": CreatesMarker(marker)}
    torch.save(checkpoint, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refused weights file") as caught:
        networks.csd_network(str(tmp_path / "evil.pth"), architecture=TINY_CSD)
    assert str(tmp_path / "evil.pth") in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


def test_the_default_checkpoint_is_named_where_the_command_runs(tmp_path, monkeypatch):
    """(A missing file given by name: test_networks.py.) The default path is relative to the working folder."""
    monkeypatch.chdir(tmp_path)
    expected = r"\(weights/CSD-ViT-L/pytorch_model.bin\): download https://huggingface.co/tomg-group-umd/CSD-ViT-L"
    with pytest.raises(MissingFileError, match=expected):
        networks.csd_network()


@pytest.mark.parametrize("damage", ["content head of the custom kind", "another width", "missing block"])
def test_a_checkpoint_of_another_layout_fails_loudly(tmp_path, damage):
    """The authors' ViT-B/16 variant, their `content_proj_head="custom"` head (a ProjectionHead module),
    or a truncated file: one line naming the file, never a network with random layers left in it."""
    state = {name: value.clone() for name, value in random_csd_network(seed=9).state_dict().items()}
    if damage == "content head of the custom kind":
        del state["last_layer_content"]
        state["last_layer_content.projection.weight"] = torch.zeros(TINY_CSD.embedding_dim, TINY_CSD.width)
    elif damage == "another width":
        state["last_layer_style"] = torch.zeros(TINY_CSD.width, 2 * TINY_CSD.embedding_dim)
    else:
        state = {name: value for name, value in state.items() if ".resblocks.1." not in name}
    torch.save({"model_state_dict": state}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="weights do not fit the authors' CSD_CLIP") as caught:
        networks.csd_network(str(tmp_path / "other.pth"), architecture=TINY_CSD)
    assert "other.pth" in str(caught.value)


def test_numpy1_pickler_really_writes_numpy1_names():
    """The control of the release test: the file it writes names `numpy.core`, as the release does."""
    buffer = io.BytesIO()
    Numpy1Pickler(buffer, protocol=2).dump(np.float64(1.5))
    assert b"numpy.core.multiarray\nscalar\n" in buffer.getvalue() and b"numpy._core" not in buffer.getvalue()
