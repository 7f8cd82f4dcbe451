import pytest
import torch

from diffstyler.backbones import backbone_for
from diffstyler.inversion import InversionCache, InversionKey, invert
from diffstyler.models import ModelSpec, encode_images, encode_prompts, load_pipeline
from diffstyler.sampling import ddim_schedule, ddim_step


def _sample(unet, latent, embedding, schedule):
    for i in range(schedule.num_steps):
        output = unet(latent, schedule.timesteps[i], encoder_hidden_states=embedding.hidden).sample
        latent = ddim_step(latent, output, schedule.alphas[i], schedule.alphas[i + 1])
    return latent


@pytest.mark.slow
@torch.no_grad()
def test_inversion_reconstructs_better_than_fresh_noise():
    pipe = load_pipeline(ModelSpec(name="tiny"))
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 64, 48, generator=generator) * 2 - 1
    z0 = encode_images(pipe, pixels)
    embedding = encode_prompts(pipe, [""])
    schedule = ddim_schedule(pipe.scheduler, 10)

    trajectory = invert(backbone_for(pipe), z0, embedding, schedule, progress=False)
    from_inversion = _sample(pipe.unet, trajectory[:1], embedding, schedule)
    from_noise = _sample(pipe.unet, torch.randn(z0.shape, generator=generator), embedding, schedule)

    inversion_error = (from_inversion - z0).pow(2).mean().item()
    noise_error = (from_noise - z0).pow(2).mean().item()
    assert trajectory.shape == (11, 4, 8, 6)
    assert torch.equal(trajectory[-1:], z0)
    assert inversion_error < 0.1 * noise_error, (inversion_error, noise_error)


def test_inversion_visits_only_the_sampler_timesteps():
    pipe = load_pipeline(ModelSpec(name="tiny"))
    schedule = ddim_schedule(pipe.scheduler, 50)
    moves = [(move.start, move.end, move.keep) for move in schedule.inversion_moves(substeps=1)]
    assert len(moves) == 50
    assert [high for _, high, keep in moves] == schedule.timesteps.flip(0).tolist()
    assert all(keep for _, _, keep in moves)
    assert moves[0][0] == -1  # starts at the clean end


def test_inversion_substeps_add_moves_between_sampler_timesteps():
    pipe = load_pipeline(ModelSpec(name="tiny"))
    schedule = ddim_schedule(pipe.scheduler, 50)
    moves = [(move.start, move.end, move.keep) for move in schedule.inversion_moves(substeps=20)]
    kept = [high for _, high, keep in moves if keep]
    assert kept == schedule.timesteps.flip(0).tolist()
    highs = [high for _, high, _ in moves]
    assert highs == sorted(set(highs))  # strictly climbing
    # every integer timestep from 0 to 981 once: the paper's 1000-step inversion, up to t = 981
    assert highs == list(range(0, 982))


@torch.no_grad()
def test_callback_sees_every_move():
    pipe = load_pipeline(ModelSpec(name="tiny"))
    schedule = ddim_schedule(pipe.scheduler, 5)
    seen = []
    latent = torch.zeros(1, 4, 8, 8)
    invert(backbone_for(pipe), latent, encode_prompts(pipe, [""]), schedule, substeps=2,
           callback=lambda i, t, x: seen.append((i, t)), progress=False)
    assert [i for i, _ in seen] == list(range(10))
    assert seen[-1][1] == int(schedule.timesteps[0])


def test_cache_round_trip_and_key(tmp_path):
    cache = InversionCache(tmp_path)
    key = InversionKey("abc", "tiny@", 64, 48, 10, 1, "", "torch.float32")
    assert cache.load(key) is None
    trajectory = torch.randn(11, 4, 8, 6)
    path = cache.save(key, trajectory)
    assert path.is_file() and not list(tmp_path.glob("*.tmp"))
    assert torch.equal(cache.load(key), trajectory)
    other = InversionKey("abc", "tiny@", 64, 48, 10, 1, "a prompt", "torch.float32")
    assert cache.path(other) != cache.path(key)
    assert cache.load(other) is None


def test_a_broken_cache_file_is_named_in_a_warning_and_ignored(tmp_path):
    import pytest

    cache = InversionCache(tmp_path)
    key = InversionKey("abc", "tiny@", 64, 48, 10, 1, "", "torch.float32")
    cache.path(key).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.warns(UserWarning, match=f"inversion cache file ignored.*{cache.path(key).name}"):
        assert cache.load(key) is None
    cache.save(key, torch.zeros(11, 4, 8, 6))
    with pytest.warns(UserWarning, match=r"shape \(11, 4, 8, 6\), expected \(11, 4, 6, 8\)"):
        assert cache.load(key, shape=(11, 4, 6, 8)) is None
    assert cache.load(key, shape=(11, 4, 8, 6)) is not None


def test_a_cache_folder_that_cannot_be_written_is_a_warning_not_an_error(tmp_path):
    import pytest

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cache = InversionCache(blocker / "cache")
    key = InversionKey("abc", "tiny@", 64, 48, 10, 1, "", "torch.float32")
    with pytest.warns(UserWarning, match="inversion cache not written"):
        assert cache.save(key, torch.zeros(11, 4, 8, 6)) is None


def _key(name: str, height: int = 16, prompt: str = "") -> "InversionKey":
    from diffstyler.inversion import InversionKey

    return InversionKey(image_sha256=name, model="m", height=height, width=16, steps=2, substeps=1, prompt=prompt, dtype="float32")


def test_the_store_inverts_each_missing_content_once_grouped_by_size_and_remembers_it(tmp_path):
    """Caught: a content named by two jobs inverted twice; contents of two sizes in one call; a group
    larger than `max_batch`; a stored trajectory inverted again; the wrong trajectory for a request."""
    from diffstyler.inversion import TrajectoryStore

    calls = []

    def invert_many(contents):
        calls.append(list(contents))
        return [torch.full((3, 4, 2, 2), float(ord(c))) for c in contents]

    store = TrajectoryStore(tmp_path / "cache")
    requests = [(_key("a"), "a"), (_key("b"), "b"), (_key("a"), "a"), (_key("c", height=24), "c"), (_key("d"), "d")]
    found = store.trajectories(requests, lambda key: (3, 4, 2, 2), invert_many, torch.device("cpu"), torch.float32, max_batch=2)
    assert calls == [["a", "b"], ["d"], ["c"]]
    assert [float(t[0, 0, 0, 0]) for t in found] == [ord(c) for c in "abacd"]
    calls.clear()
    again = TrajectoryStore(tmp_path / "cache").trajectories(requests[:2], lambda key: (3, 4, 2, 2), invert_many,
                                                              torch.device("cpu"), torch.float32)
    assert calls == [] and torch.equal(again[0], found[0])  # from disk, in a new store


def test_the_store_keeps_only_the_last_trajectories_in_memory():
    from diffstyler.inversion import TrajectoryStore

    store = TrajectoryStore(None, recent=2)
    for name in "abc":
        store.remember(_key(name), torch.zeros(1))
    assert [key.image_sha256 for key in store.memory] == ["b", "c"]
    assert store.lookup(_key("a"), (1,), torch.device("cpu"), torch.float32) is None
