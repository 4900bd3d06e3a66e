"""Image variation: shapes, seeds, DDIM-inverted noise and eta, and `unclip-sample image=...`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import TINY_ARCH, run_sample_cli
from tests.test_decoder_stage import small_decoder
from unclip.clip.model import ClipEncoder
from unclip.decoder_sampling import invert_decoder, sample_decoder
from unclip.errors import ConfigError
from unclip.images import load_image
from unclip.pipeline import assemble
from unclip.variation import image_variations


def _randomised(decoder):
    """A decoder whose zero-initialised output layers get small random weights, so that its output is a
    non-trivial function of x_t (a fresh one predicts eps = 0 and every inversion would be exact)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in decoder.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return decoder.eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return ClipEncoder("tiny-test", None, TINY_ARCH).eval(), _randomised(small_decoder())


@pytest.fixture(scope="module")
def trained():
    """A small decoder trained briefly to draw four flat colours, one per embedding; (decoder, embeddings,
    held-out loss before, after). A denoiser, if a poor one: its x_0 guesses lie near the data."""
    decoder = small_decoder(variance="fixed_small")
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])
    images = colours[:, :, None, None].expand(4, 3, 16, 16)
    z = torch.randn(4, 32, generator=g)

    def held_out_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return float(decoder(images.repeat(8, 1, 1, 1), z.repeat(8, 1), None)["loss"].mean())

    before = held_out_loss()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    for _ in range(60):
        pick = torch.randint(4, (16,), generator=g)
        decoder(images[pick], z[pick], None, 0.1)["loss"].mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return decoder.eval(), z, before, held_out_loss()


def test_loss_falls_on_a_tiny_problem(trained):
    _, _, before, after = trained
    assert after < 0.6 * before


def _source(size: int = 16) -> torch.Tensor:
    """A smooth test picture in [0, 1]: a red disc on a blue-green gradient."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((xs - 0.2) ** 2 + ys**2 < 0.3).float()
    return torch.stack([0.2 + 0.7 * disc, 0.5 + 0.3 * xs * (1 - disc), 0.6 - 0.3 * ys * (1 - disc)]).clamp(
        0, 1
    )


def test_variations_have_the_decoder_size_and_follow_the_seed(models):
    clip, decoder = models
    photo = torch.rand(3, 45, 30, generator=torch.Generator().manual_seed(0))  # any size, not square

    def run(seed, **kwargs):
        return image_variations(
            clip, decoder, photo, 3, generator=torch.Generator().manual_seed(seed), **kwargs
        )

    a = run(0)
    assert a.shape == (3, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, run(0)) and not torch.equal(a, run(1))
    assert not torch.allclose(a[0], a[1])  # fresh noise: each variation its own sample
    captioned = run(0, caption="a red star")
    assert captioned.shape == a.shape and not torch.allclose(captioned, a)
    assert run(0, steps="3", guidance_scale=1.0).shape == a.shape


def _reconstruction_error(decoder, z, steps: str, guidance_scale: float = 1.0) -> tuple[float, float]:
    """Mean abs error of inverting then decoding the source at eta = 0, and of a fresh sample."""
    source, options = _source()[None], {"steps": steps, "guidance_scale": guidance_scale}
    noise = invert_decoder(decoder, source, z, **options)
    assert noise.std() > 0.3  # x_T is noise-like, not the image
    back = sample_decoder(decoder, z, inverted_noise=noise, eta=0.0, **options)
    fresh = sample_decoder(decoder, z, generator=torch.Generator().manual_seed(0), **options)
    return float((back - source).abs().mean()), float((fresh - source).abs().mean())


def test_inversion_is_first_order_exact_for_an_exact_denoiser(monkeypatch):
    # the network replaced by the optimal eps predictor for data ~ N(mu, var) per pixel: then DDIM is the
    # exact probability-flow ODE, and invert -> decode errs only by the O(1/steps) of Euler steps
    decoder = small_decoder(variance="fixed_small").eval()
    alpha_bar = torch.tensor(decoder.diffusion.schedule.alphas_cumprod, dtype=torch.float32)
    mu, var = 0.2, 0.25

    def optimal_eps(x, t, cond):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * var + 1 - a)

    monkeypatch.setattr(decoder.net, "forward", optimal_eps)
    z = torch.randn(1, 32)
    coarse, fine = _reconstruction_error(decoder, z, "25")[0], _reconstruction_error(decoder, z, "50")[0]
    assert coarse < 0.03 and fine < 0.6 * coarse, (coarse, fine)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_inverted_noise_reconstructs_the_source_for_a_trained_decoder(trained, guidance_scale):
    decoder, z, _, _ = trained
    # a picture it never saw, decoded with the embedding of one it did: only the inversion can bring it back
    error, baseline = _reconstruction_error(decoder, z[:1], "25", guidance_scale)
    assert error < 0.3 * baseline, (error, baseline)  # measured: about 0.2


def test_eta_sets_how_far_inverted_variations_stray(models, trained):
    clip, decoder = models[0], trained[0]
    source = _source()

    def distance(eta: float) -> tuple[torch.Tensor, float]:
        out = image_variations(
            clip,
            decoder,
            source,
            4,
            invert=True,
            eta=eta,
            steps="30",
            generator=torch.Generator().manual_seed(0),
        )
        return out, float((out - source).abs().mean())

    same, d0 = distance(0.0)
    assert torch.allclose(same, same[:1].expand_as(same))  # eta = 0 is deterministic: one reconstruction
    spread, d_half = distance(0.5)
    assert not torch.allclose(spread[0], spread[1])
    assert d0 < d_half < distance(1.0)[1]


def test_bad_variation_requests_are_named(models):
    clip, decoder = models
    with pytest.raises(ConfigError, match="ddim"):
        image_variations(clip, decoder, _source(), 2, invert=True, sampler="dpmpp_2m")
    with pytest.raises(ConfigError, match="num_images=0"):
        image_variations(clip, decoder, _source(), 0)
    with pytest.raises(ConfigError, match=r"\(3, H, W\)"):
        image_variations(clip, decoder, torch.rand(1, 3, 8, 8), 2)
    with pytest.raises(ConfigError, match="prompt is empty"):
        image_variations(clip, decoder, _source(), 2, caption=" ")


def test_sample_cli_makes_variations_of_an_image_file(models, tmp_path):
    clip, decoder = models
    fingerprint = clip.save(tmp_path / "clip")
    decoder.save(tmp_path / "decoder", fingerprint)
    folder = assemble(tmp_path / "pipe", {"clip": tmp_path / "clip", "decoder": tmp_path / "decoder"})
    exif = Image.Exif()
    exif[0x0112] = 8
    photo = Image.fromarray((_source(40).permute(1, 2, 0).numpy() * 255).astype("uint8"))
    photo.convert("RGBA").save(tmp_path / "photo.png", exif=exif)
    args = [f"pipeline={folder}", f"image={tmp_path / 'photo.png'}", "num_images=2", "progress=false"]
    result = run_sample_cli(
        [
            *args,
            "prompt=a red circle",
            "invert=true",
            "decoder.eta=0.5",
            "decoder.steps=4",
            f"out={tmp_path / 'v'}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    sidecar = json.loads((tmp_path / "v" / "samples.json").read_text())
    assert sidecar["invert"] is True and sidecar["caption"] == "a red circle"
    assert sidecar["settings"]["decoder"]["eta"] == 0.5 and len(sidecar["rows"]) == 2
    assert load_image(tmp_path / "v" / "0001.png").shape == (3, 16, 16)

    (tmp_path / "notes.jpg").write_text("not a picture")
    bad = run_sample_cli(
        [f"pipeline={folder}", f"image={tmp_path / 'notes.jpg'}", f"out={tmp_path / 'b'}"], tmp_path
    )
    assert bad.returncode == 1 and "notes.jpg" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("name", ["astronaut.png", "camera.png", "rocket.jpg", "coffee.png"])
def test_variations_of_real_photographs(models, name):
    data = pytest.importorskip("skimage.data")
    clip, decoder = models
    photo = load_image(Path(data.__file__).parent / name)
    for invert in (False, True):
        out = image_variations(
            clip, decoder, photo, 2, invert=invert, steps="4", generator=torch.Generator().manual_seed(0)
        )
        assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
        assert out.min() >= 0 and out.max() <= 1
