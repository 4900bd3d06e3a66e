"""The open_clip wrapper: encoders, real architectures, local checkpoints, save/load, embedding cache."""

from __future__ import annotations

import datasets
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import TINY_ARCH
from unclip.clip.cache import embed_split
from unclip.clip.conv_tower import ConvTower, MedianCentredInput
from unclip.clip.model import ClipEncoder
from unclip.errors import CheckpointError, ConfigError

CONV_ARCH = {
    "embed_dim": 32,
    "conv_tower": {"image_size": 32, "channels": [8, 16, 16], "strides": [2, 2, 1]},
    "text_cfg": TINY_ARCH["text_cfg"],
}


@pytest.fixture(scope="module")
def tiny() -> ClipEncoder:
    torch.manual_seed(0)
    return ClipEncoder("tiny-test", None, TINY_ARCH).eval()


def test_tiny_encoder_returns_tokens_mask_pooled_and_image_embedding(tiny):
    ids = tiny.tokenize(["a red circle", "a small blue star in the top left!"])
    text = tiny.encode_text(ids)
    assert ids.shape == (2, 24)
    assert text.tokens.shape == (2, 24, 32) and text.pooled.shape == (2, 32)
    # <start> a red circle <end> = 5 real tokens; "!" (id 0, like padding) still counts as a real token
    assert text.mask[0].tolist() == [True] * 5 + [False] * 19
    assert int(text.mask[1].sum()) == int(ids[1].argmax()) + 1
    assert torch.allclose(text.pooled, tiny.model.encode_text(ids))
    images = torch.rand(3, 3, 64, 64)  # resized to the model's 32 px by preprocess
    assert tiny.encode_image(images).shape == (3, 32)
    assert tiny.embed_dim == 32 and tiny.token_dim == 32 and tiny.image_size == 32


def test_real_open_clip_architecture_random_init():
    torch.manual_seed(0)
    encoder = ClipEncoder("ViT-B-32").eval()
    with torch.no_grad():
        text = encoder.encode_text(encoder.tokenize(["a photo of a cat"]))
        image = encoder.encode_image(torch.rand(1, 3, 224, 224))
    assert text.tokens.shape == (1, 77, 512) and text.pooled.shape == (1, 512)
    assert image.shape == (1, 512) and encoder.image_size == 224


def test_pretrained_local_checkpoint_file_is_loaded(tiny, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = ClipEncoder("tiny-test", str(path), TINY_ARCH)
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    assert loaded.fingerprint() == tiny.fingerprint()


def test_pretrained_builtin_from_local_file(tmp_path):
    torch.manual_seed(1)
    source = open_clip.create_model("RN50")
    path = tmp_path / "rn50.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = ClipEncoder("RN50", str(path))
    assert torch.equal(loaded.model.visual.conv1.weight, source.visual.conv1.weight)


@pytest.mark.parametrize(
    "name, pretrained, arch, match",
    [
        ("ViT-Nope-99", None, None, "not an open_clip architecture"),
        ("ViT-B-32", "not-a-tag", None, "neither a file nor a pretrained tag"),
        ("tiny-test", "laion2b", TINY_ARCH, "must be a local file"),
        ("tiny-test", None, {"embed_dim": 8, "bogus": 1}, "not a valid open_clip config"),
        ("tiny-conv", None, {**CONV_ARCH, "vision_cfg": TINY_ARCH["vision_cfg"]}, "not both"),
        ("tiny-conv", None, {**CONV_ARCH, "conv_tower": {"channels": [8], "strides": [2]}}, "image_size"),
        (
            "tiny-conv",
            None,
            {**CONV_ARCH, "conv_tower": {"image_size": 32, "channels": [8], "strides": [3]}},
            "stride",
        ),
    ],
)
def test_bad_model_choices_are_config_errors(name, pretrained, arch, match):
    with pytest.raises(ConfigError, match=match):
        ClipEncoder(name, pretrained, arch)


def test_save_load_round_trip_and_refusals(tiny, tmp_path):
    fingerprint = tiny.save(tmp_path / "clip")
    loaded = ClipEncoder.load(tmp_path / "clip")
    assert loaded.fingerprint() == fingerprint
    ids = tiny.tokenize(["a green square"])
    assert torch.equal(loaded.encode_text(ids).pooled, tiny.encode_text(ids).pooled)

    other = dict(TINY_ARCH, embed_dim=16)
    (tmp_path / "clip" / "config.yaml").write_text(
        (tmp_path / "clip" / "config.yaml").read_text().replace("embed_dim: 32", "embed_dim: 16")
    )
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ClipEncoder.load(tmp_path / "clip")
    assert other["embed_dim"] == 16
    with pytest.raises(CheckpointError, match="missing file"):
        ClipEncoder.load(tmp_path / "nowhere")


def test_embedding_cache_computes_once_per_clip(tiny, tmp_path, monkeypatch):
    from PIL import Image

    split = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (32, 32), (i * 20, 0, 0)) for i in range(6)],
            "caption": [f"a red circle number {i}" for i in range(6)],
        }
    ).cast_column("image", datasets.Image())
    first = embed_split(tiny, split, tmp_path, batch_size=4)
    assert first.num_rows == 6
    row = first.with_format("torch")[0]
    assert row["image_embedding"].shape == (32,) and row["text_tokens"].shape == (7, 32)  # 5 words
    assert "float16" in str(first.features["text_tokens"])  # per-token encodings stored at half size
    expected = tiny.encode_image(torch.full((1, 3, 32, 32), 0.0))
    assert torch.allclose(row["image_embedding"], expected[0], atol=1e-5)

    def no_encoding(*_args, **_kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tiny, "encode_image", no_encoding)
    again = embed_split(tiny, split, tmp_path, batch_size=4)
    assert again["caption"] == first["caption"]
    monkeypatch.undo()
    torch.manual_seed(5)
    other = ClipEncoder("tiny-test", None, TINY_ARCH)
    embed_split(other, split, tmp_path, batch_size=4)
    assert len(list((tmp_path / "embeddings").iterdir())) == 2  # one folder per CLIP fingerprint


def test_conv_tower_is_the_image_encoder_and_round_trips(tmp_path):
    torch.manual_seed(0)
    encoder = ClipEncoder("tiny-conv", None, CONV_ARCH)
    assert isinstance(encoder.model.visual, ConvTower) and encoder.image_size == 32
    assert encoder.encode_image(torch.rand(2, 3, 64, 64)).shape == (2, 32)
    encoder.save(tmp_path / "clip")
    assert ClipEncoder.load(tmp_path / "clip").fingerprint() == encoder.fingerprint()


def test_median_centred_input_sees_the_object_whatever_its_colours():
    """The silhouette channel depends on the object, not on which colours draw it (conv_tower's premise)."""
    red_on_blue = torch.zeros(1, 3, 8, 8)
    red_on_blue[:, 2] = 1.0
    red_on_blue[:, :, 2:4, 2:4] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    white_on_black = torch.zeros(1, 3, 8, 8)
    white_on_black[:, :, 2:4, 2:4] = 1.0
    features = [MedianCentredInput()(x) for x in (red_on_blue, white_on_black)]
    assert features[0].shape == (1, MedianCentredInput.out_channels, 8, 8)
    silhouettes = [f[0, 6] > 0 for f in features]
    assert torch.equal(silhouettes[0], silhouettes[1]) and int(silhouettes[0].sum()) == 4
    assert torch.equal(features[0][:, 7:], features[1][:, 7:])  # the coordinate channels
