"""SplitPixels: a cached split's images decoded at most once when they fit, the same pixels either way."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from unclip.data import pixels as pixels_module
from unclip.data.pixels import SplitPixels
from unclip.errors import DataError


def _split(sizes: list[int]) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)) for s in sizes]
    return datasets.Dataset.from_dict(
        {"image": images}, features=datasets.Features({"image": datasets.Image()})
    )


def _reference(split: datasets.Dataset, indices: list[int]) -> np.ndarray:
    return np.stack([np.asarray(split[i]["image"].convert("RGB")) for i in indices])


@pytest.mark.parametrize("budget_mb, kept", [(1, True), (0, False)])
def test_pixels_match_a_plain_decode_in_the_order_asked(budget_mb: int, kept: bool) -> None:
    split = _split([16] * 10)
    pixels = SplitPixels(split, budget_mb)
    assert pixels.keeps_decoded is kept and len(pixels) == 10
    for indices in ([3, 1, 3, 0], [9, 8, 7, 3, 1], list(range(10))):
        got = pixels[indices]
        assert got.dtype == np.uint8 and got.shape == (len(indices), 16, 16, 3)
        np.testing.assert_array_equal(got, _reference(split, indices))


def test_each_image_is_decoded_once_when_kept(monkeypatch) -> None:
    split = _split([16] * 6)
    pixels = SplitPixels(split, budget_mb=1)
    calls = []
    real = pixels_module.rgb_pixels
    monkeypatch.setattr(pixels_module, "rgb_pixels", lambda picture: calls.append(1) or real(picture))
    pixels[[0, 1, 1]]
    pixels[[1, 2, 0, 5]]
    pixels[list(range(6))]
    assert len(calls) == 6


def test_a_split_over_the_budget_is_decoded_every_read() -> None:
    split = _split([64] * 200)  # 200 x 64 x 64 x 3 bytes = 2.3 MiB
    assert not SplitPixels(split, budget_mb=2).keeps_decoded
    assert SplitPixels(split, budget_mb=3).keeps_decoded


def test_an_image_of_another_size_is_named() -> None:
    pixels = SplitPixels(_split([16, 16, 20]), budget_mb=1)
    with pytest.raises(DataError, match="image 2 is 20x20 px"):
        pixels[[0, 2]]
