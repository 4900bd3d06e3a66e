"""The paper presets reproduce the model sizes of unCLIP's Table 3 (Ramesh et al. 2022) within 10 %."""

import pytest
import torch

from unclip.models.decoder import Decoder, decoder_paper
from unclip.models.upsampler import Upsampler, sr256_paper, sr1024_paper


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("build", "paper_params"),
    [
        (lambda: Decoder(decoder_paper()), 3.5e9),
        (lambda: Upsampler(sr256_paper()), 700e6),
        (lambda: Upsampler(sr1024_paper()), 300e6),
    ],
    ids=["decoder", "sr256", "sr1024"],
)
def test_paper_preset_matches_table_3(build, paper_params: float) -> None:
    with torch.device("meta"):
        model = build()
    n = _count(model)
    assert abs(n - paper_params) <= 0.1 * paper_params, (
        f"{n / 1e6:.0f}M parameters vs {paper_params / 1e6:.0f}M"
    )


def test_decoder_split_matches_glide() -> None:
    # GLIDE (Nichol et al. 2021 §4): a 2.3B-parameter visual U-Net and a 1.2B-parameter text transformer.
    with torch.device("meta"):
        model = Decoder(decoder_paper())
    assert _count(model.unet) == pytest.approx(2.3e9, rel=0.1)
    assert _count(model.text_encoder) == pytest.approx(1.2e9, rel=0.1)
