"""The upsampler stages: degradations, tiling, the component (train loss, save/load, sampling), the stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from tests.conftest import FAST_RUN
from unclip.config.schema import validate
from unclip.data.degrade import bsr_degrade, degrade, gaussian_blur
from unclip.diffusion.tiling import tile_starts, tiled
from unclip.errors import CheckpointError, ConfigError
from unclip.eval.upsampler_eval import bicubic, psnr
from unclip.io import read_yaml
from unclip.stages.upsampler import random_crops
from unclip.train.trainer import Trainer
from unclip.upsampler_sampling import (
    DiffusionUpsampler,
    back_project,
    check_sampling,
    upsample,
    upsampler_config,
)

FAST_SR = [
    "stage=sr256",
    "stage.image_size=64",
    "stage.low_res_size=16",
    "stage.crop_fraction=0.5",
    "stage.model.unet.model_channels=8",
    "stage.model.unet.num_groups=4",
    "stage.sampling.steps=3",
    "stage.eval_images=4",
    *FAST_RUN,
]
DIFFUSION = {
    "schedule": "cosine",
    "schedule_shift": 1.0,
    "num_timesteps": 100,
    "prediction": "x0",
    "variance": "fixed_small",
    "loss_weighting": "none",
}
SAMPLING = {"sampler": "ddim", "steps": "4", "eta": 0.0, "aug_level": 0.0, "tile_size": 0, "tile_overlap": 8}


def small_upsampler(noise_aug: bool = False, seed: int = 0, **sampling) -> DiffusionUpsampler:
    torch.manual_seed(seed)
    config = upsampler_config("sr256_tiny", noise_aug=noise_aug, unet={"model_channels": 8, "num_groups": 4})
    model = DiffusionUpsampler(config, 4, DIFFUSION, {**SAMPLING, **sampling})
    with torch.no_grad():  # zero-initialised output layers would make every output alike
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model.eval()


def test_gaussian_blur_matches_scipy_per_sample():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, 9, 11, generator=g)
    sigma = torch.tensor([0.6, 1.3, 0.0])
    out = gaussian_blur(images, sigma, kernel_size=5)
    for image, s, blurred in zip(images.numpy(), sigma.tolist(), out.numpy()):
        if s == 0:
            np.testing.assert_array_equal(blurred, image)
            continue
        reference = ndimage.gaussian_filter(image, sigma=(0, s, s), mode="mirror", radius=(0, 2, 2))
        np.testing.assert_allclose(blurred, reference, atol=1e-5)


def test_degradations_keep_size_and_range_and_follow_the_generator():
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    a = bsr_degrade(images, torch.Generator().manual_seed(5))
    b = bsr_degrade(images, torch.Generator().manual_seed(5))
    assert a.shape == images.shape and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, images)
    assert torch.equal(degrade(images, "none"), images)
    assert torch.equal(degrade(images, "bsr", probability=0.0), images)
    blurred = degrade(images, "blur", blur_sigma=(0.6, 0.6), probability=1.0)
    assert blurred.std() < images.std()  # blur removes the white noise's high frequencies
    with pytest.raises(ConfigError, match="degradation 'jpeg'"):
        degrade(images, "jpeg")


def test_tiles_cover_the_image_and_pointwise_models_tile_exactly():
    assert tile_starts(64, 64, 8) == [0] and tile_starts(100, 40, 8) == [0, 32, 60]
    condition = torch.randn(2, 3, 40, 56)

    def fn(x, t, region):
        return 2 * x + condition[..., region[0], region[1]] + t.float()[:, None, None, None]

    x, t = torch.randn(2, 3, 40, 56), torch.tensor([3, 7])
    whole = fn(x, t, (slice(None), slice(None)))
    torch.testing.assert_close(tiled(fn, 16, 8)(x, t), whole)
    torch.testing.assert_close(tiled(fn, 24, 0)(x, t), whole)
    with pytest.raises(ConfigError, match="tile_overlap"):
        tiled(fn, 16, 16)
    with pytest.raises(ConfigError, match="multiples of 8"):
        tiled(fn, 20, 4, multiple=8)


def test_local_models_tile_closely():
    conv = torch.nn.Conv2d(3, 3, 5, padding=2)

    def fn(x, t, region):
        return conv(x)

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        whole, pieces = fn(x, None, None), tiled(fn, 32, 16)(x, None)
    # only pixels within 2 px of an inner tile edge differ, each by a blend weight < 1
    assert (pieces - whole).abs().mean() < 0.05 * whole.abs().mean()


def test_training_loss_uses_the_condition_and_noise_augmentation():
    model = small_upsampler(noise_aug=True).train()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    low = F.avg_pool2d(images, 4)

    def loss(condition, aug_max):
        torch.manual_seed(3)
        return model(images, condition, aug_max=aug_max)["loss"]

    assert loss(low, 0.0).shape == (4,)
    assert not torch.allclose(loss(low, 0.0), loss(-low, 0.0))
    assert not torch.allclose(loss(low, 0.0), loss(low, 0.5))
    with pytest.raises(ValueError, match="not 1/4"):
        model(images, F.avg_pool2d(images, 2))


def test_upsample_sizes_tiling_and_save_load(tmp_path):
    model = small_upsampler()
    low = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    out = upsample(model, low, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 3, 32, 48) and out.min() >= 0 and out.max() <= 1
    tiles = upsample(model, low, generator=torch.Generator().manual_seed(1), tile_size=16, tile_overlap=8)
    assert tiles.shape == out.shape and not torch.equal(tiles, out)
    one_tile = upsample(model, low, generator=torch.Generator().manual_seed(1), tile_size=48, tile_overlap=8)
    torch.testing.assert_close(one_tile, out)
    model.save(tmp_path / "sr")
    loaded = DiffusionUpsampler.load(tmp_path / "sr")
    again = upsample(loaded, low, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, out)
    assert read_yaml(tmp_path / "sr" / "config.yaml")["scale"] == 4
    with pytest.raises(ConfigError, match="multiples of 8"):
        upsample(model, torch.rand(1, 3, 9, 8))
    with pytest.raises(ConfigError, match="guidance_scale"):
        upsample(model, low, guidance_scale=2.0)
    # weights of another architecture under this config are refused, naming the mismatch
    small_upsampler(noise_aug=True).save(tmp_path / "other")
    (tmp_path / "other" / "config.yaml").write_text((tmp_path / "sr" / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="does not fit this model"):
        DiffusionUpsampler.load(tmp_path / "other")


def test_back_projection_fixes_block_means_and_keeps_the_detail_inside_blocks():
    g = torch.Generator().manual_seed(0)
    x0, low = torch.randn(2, 3, 16, 24, generator=g), torch.randn(2, 3, 4, 6, generator=g)
    projected = back_project(x0, low, 4)
    torch.testing.assert_close(F.avg_pool2d(projected, 4), low)  # consistent with the input, in one step
    shift = projected - x0  # the correction is constant over each 4 x 4 block: detail is untouched
    torch.testing.assert_close(shift, F.interpolate(F.avg_pool2d(shift, 4), scale_factor=4, mode="nearest"))
    torch.testing.assert_close(back_project(projected, low, 4), projected)  # a projection


def test_consistent_sampling_matches_its_input_and_old_exports_sample_as_before():
    model = small_upsampler()
    low = 0.25 + 0.5 * torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    raw = upsample(model, low, generator=torch.Generator().manual_seed(1))
    kept = upsample(model, low, generator=torch.Generator().manual_seed(1), consistent=True)
    assert (F.avg_pool2d(raw, 4) - low).abs().max() > 1e-3
    inside = F.avg_pool2d(((kept > 0) & (kept < 1)).float(), 4) == 1  # blocks the final clamp to [0, 1] left
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(F.avg_pool2d(kept, 4)[inside], low[inside], atol=1e-5, rtol=0)
    assert "consistent" not in SAMPLING and check_sampling(SAMPLING, 100)["consistent"] is False
    with pytest.raises(ConfigError, match="sampling.consistent"):
        upsample(model, low, consistent="yes")


def test_edge_centred_crops_hold_the_detail_and_stay_on_the_grid():
    # channels 0 and 1 hold each pixel's row and column (ramps too gentle to count as detail), channel 2 one
    # small square per image, which most uniform crops miss
    ramp = torch.arange(128.0) / 1024
    images = torch.stack(
        [ramp[:, None].expand(128, 128), ramp[None, :].expand(128, 128), torch.full((128, 128), -0.5)]
    )
    images = images.repeat(64, 1, 1, 1)
    images[:, 2, 90:100, 20:30] = 0.5
    has_edge = lambda crops: (crops[:, 2].amax(dim=(1, 2)) > 0) & (crops[:, 2].amin(dim=(1, 2)) < 0)  # noqa: E731
    uniform = random_crops(images, 32, 4, torch.Generator().manual_seed(0))
    centred = random_crops(images, 32, 4, torch.Generator().manual_seed(0), edge_fraction=1.0)
    assert has_edge(uniform).float().mean() < 0.3 and has_edge(centred).all()
    assert torch.equal(
        random_crops(images, 32, 4, torch.Generator().manual_seed(0), edge_fraction=1.0), centred
    )
    offsets = (centred[:, :2, 0, 0] * 1024).round().long()  # each crop's top-left row and column
    assert (offsets % 4 == 0).all() and (offsets >= 0).all() and (offsets <= 96).all()
    flat = torch.zeros(2, 3, 64, 64)  # nothing to centre on: the uniform crop is kept
    assert random_crops(flat, 32, 4, edge_fraction=1.0).shape == (2, 3, 32, 32)


def test_psnr_and_bicubic_reference():
    image = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    assert psnr(image, image) == 100.0
    noisy = np.clip(image.astype(int) + 16, 0, 255).astype(np.uint8)
    assert psnr(image, noisy) == pytest.approx(
        10 * np.log10(255**2 / np.mean((noisy.astype(int) - image) ** 2))
    )
    flat = np.full((4, 4, 3), 77, np.uint8)
    assert (bicubic(flat, 4) == 77).all() and bicubic(flat, 4).shape == (16, 16, 3)


def test_stage_config_composes_and_bad_values_are_named(compose_cfg):
    for name, size, low, schedule in (("sr256", 256, 64, "cosine"), ("sr1024", 1024, 256, "linear")):
        cfg = compose_cfg([f"stage={name}"])
        validate(cfg)
        assert (cfg.stage.image_size, cfg.stage.low_res_size, cfg.stage.schedule) == (size, low, schedule)
        recipe = compose_cfg([f"experiment=shapes_{name}"])
        validate(recipe)
        assert recipe.stage.name == name and Trainer(recipe, "unused").stage.crop == size // 4
    for override, key in [
        ("stage.low_res_size=48", "stage.low_res_size"),
        ("stage.crop_fraction=0", "stage.crop_fraction"),
        ("stage.edge_crop_fraction=1.5", "stage.edge_crop_fraction"),
        ("stage.degradation=jpeg", "stage.degradation"),
        ("stage.blur_sigma=[0.6,0.2]", "stage.blur_sigma"),
        ("stage.sampling.aug_level=0.1", "noise_aug_max"),
        ("stage.sampling.tile_size=100", "tile_size"),
        ("stage.model.preset=sr512_tiny", "sr512_tiny"),
        ("stage.sampling.steps=ddim2000", "ddim2000"),
    ]:
        with pytest.raises(ConfigError, match=key):
            Trainer(compose_cfg(["stage=sr256", override]), "unused")


def test_stage_trains_evaluates_exports_and_reloads(compose_cfg, tmp_path):
    cfg = compose_cfg([*FAST_SR, "trainer.max_steps=3"])
    metrics = Trainer(cfg, tmp_path).fit()
    for split in ("eval_seen", "eval_holdout"):
        for key in ("psnr", "psnr_bicubic", "psnr_gain", "psnr_consistency"):
            assert np.isfinite(metrics[f"{split}/{key}"])
    config = read_yaml(tmp_path / "export" / "config.yaml")
    assert config["kind"] == "upsampler" and config["scale"] == 4 and config["sampling"]["steps"] == "3"
    model = DiffusionUpsampler.load(tmp_path / "export")
    assert upsample(model, torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)
    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder" / "config.yaml").write_text("kind: decoder\n")
    with pytest.raises(CheckpointError, match="not an upsampler"):
        DiffusionUpsampler.load(tmp_path / "decoder")


def test_an_untrained_residual_upsampler_returns_the_clamped_bicubic_upsampling():
    torch.manual_seed(0)
    config = upsampler_config(
        "sr256_tiny", noise_aug=False, residual=True, unet={"model_channels": 8, "num_groups": 4}
    )
    model = DiffusionUpsampler(config, 4, DIFFUSION, SAMPLING).eval()  # zero-initialised output layer
    low = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    bicubic_x4 = F.interpolate(low * 2 - 1, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(upsample(model, low), (bicubic_x4 + 1) / 2, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="prediction='x0'"):
        DiffusionUpsampler(config, 4, {**DIFFUSION, "prediction": "eps"}, SAMPLING)


def test_a_small_upsampler_learns_to_beat_bicubic_on_shapes():
    """Trained briefly on 32 px renders from 8 px ones, the upsampler beats bicubic on held-out renders."""
    from unclip.data import shapes

    def renders(split, count, size):
        specs = [shapes.sample_spec(0, split, i, shapes.DEFAULT_HOLDOUT) for i in range(count)]
        return np.stack([np.array(shapes.render(spec, size).convert("RGB")) for spec in specs])

    torch.manual_seed(0)
    config = upsampler_config("sr256_tiny", noise_aug=False, residual=True, unet={"model_channels": 16})
    model = DiffusionUpsampler(config, 4, DIFFUSION, {**SAMPLING, "steps": "2"})
    images = torch.from_numpy(renders("train", 256, 32)).permute(0, 3, 1, 2).float() / 127.5 - 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(150):
        batch = images[torch.randint(0, len(images), (32,))]
        loss = model(batch, F.avg_pool2d(batch, 4))["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lows, highs = renders("eval_seen", 16, 8), renders("eval_seen", 16, 32)
    out = upsample(model.eval(), torch.from_numpy(lows).permute(0, 3, 1, 2).float() / 255)
    out = (out * 255).round().byte().permute(0, 2, 3, 1).numpy()
    gain = np.mean([psnr(o, h) - psnr(bicubic(lo, 4), h) for o, lo, h in zip(out, lows, highs)])
    assert gain > 1.0, gain
