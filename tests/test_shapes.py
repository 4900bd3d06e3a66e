"""The embedded ``shapes`` generator: determinism, geometry, captions and the holdout split (DESIGN §4)."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from PIL import Image

from unclip.data import shapes
from unclip.errors import ConfigError

N = 400
SIZE_WORDS = {"small": {"small", "little"}, "large": {"large", "big"}}
POSITION_WORDS = {"top", "bottom", "left", "right", "center", "middle", "upper", "lower"}


@pytest.fixture(scope="module")
def train_records() -> list[dict]:
    return [shapes.make_record(0, "train", i) for i in range(N)]


def _words(caption: str) -> set[str]:
    return set(re.findall(r"[a-z]+", caption))


def test_record_and_pixels_are_deterministic_per_index() -> None:
    first, again, other = (shapes.make_record(3, "train", i) for i in (5, 5, 6))
    assert first == again
    assert first != other
    spec = shapes.sample_spec(3, "train", 5)
    assert shapes.render(spec, 64).tobytes() == shapes.render(shapes.sample_spec(3, "train", 5), 64).tobytes()
    assert shapes.render(spec, 64).tobytes() != shapes.render(shapes.sample_spec(3, "train", 6), 64).tobytes()
    assert shapes.make_record(4, "train", 5) != first


def test_splits_draw_from_independent_streams() -> None:
    train = [shapes.sample_spec(0, "train", i) for i in range(50)]
    seen = [shapes.sample_spec(0, "eval_seen", i) for i in range(50)]
    assert all(a.cx != b.cx for a, b in zip(train, seen))
    assert sum(a.colour == b.colour and a.shape == b.shape for a, b in zip(train, seen)) < 10


def test_record_fields_match_the_spec() -> None:
    record = shapes.make_record(0, "eval_seen", 11)
    spec = shapes.sample_spec(0, "eval_seen", 11)
    assert set(record) == {
        "caption", "colour", "shape", "size", "position", "background",
        "names_size", "names_position", "names_background", "cx", "cy", "extent", "rotation",
    }  # fmt: skip
    assert {k: record[k] for k in dataclasses.asdict(spec)} == dataclasses.asdict(spec)


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_rasteriser_area_and_centroid_are_exact(shape: str) -> None:
    spec = shapes.ShapeSpec("red", shape, "large", "center", "black", 0.47, 0.55, 0.5, 17.0)
    alpha = shapes.coverage(spec, 128).astype(np.float64)
    if shape == "circle":
        area = math.pi * 0.25**2
    else:
        x, y = shapes.outline(spec).T
        area = abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2
    assert alpha.sum() / 128**2 == pytest.approx(area, rel=1e-3)
    ys, xs = (np.mgrid[0:128, 0:128] + 0.5) / 128
    assert (alpha * xs).sum() / alpha.sum() == pytest.approx(0.47, abs=1e-3)
    assert (alpha * ys).sum() / alpha.sum() == pytest.approx(0.55, abs=1e-3)
    assert alpha.min() >= 0.0 and alpha.max() == pytest.approx(1.0)


def test_same_spec_agrees_across_resolutions() -> None:
    for index in range(12):
        spec = shapes.sample_spec(1, "train", index)
        small = np.asarray(shapes.render(spec, 64), np.float64)
        shrunk = np.asarray(shapes.render(spec, 256).resize((64, 64), Image.Resampling.BOX), np.float64)
        assert np.abs(small - shrunk).mean() < 0.3
        assert np.abs(small - shrunk).max() < 40


def test_render_draws_object_and_background_colours() -> None:
    spec = shapes.ShapeSpec("orange", "square", "large", "center", "blue", 0.5, 0.5, 0.5, 0.0)
    image = shapes.render(spec, 64)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert image.getpixel((32, 32)) == shapes.COLOURS["orange"]
    assert image.getpixel((0, 0)) == shapes.COLOURS["blue"]


def test_objects_lie_inside_the_image_and_their_cell() -> None:
    specs = [shapes.sample_spec(0, "train", i) for i in range(N)]
    for spec in specs:
        radius = spec.extent / 2
        assert radius + shapes.EDGE_MARGIN <= min(spec.cx, spec.cy, 1 - spec.cx, 1 - spec.cy) + 1e-9
        if spec.shape != "circle":
            assert shapes.outline(spec).min() > 0 and shapes.outline(spec).max() < 1
        row, col = divmod(shapes.POSITIONS.index(spec.position), 3)
        assert (int(3 * spec.cx), int(3 * spec.cy)) == (col, row)
        assert shapes.EXTENT_RANGE[spec.size][0] <= spec.extent <= shapes.EXTENT_RANGE[spec.size][1]
    # Nothing is clipped: even large objects in a corner leave the border pixels empty at 128 px.
    corners = [s for s in specs if s.size == "large" and " " in s.position]
    assert corners
    for spec in corners[:10]:
        alpha = shapes.coverage(spec, 128)
        assert max(alpha[0].max(), alpha[-1].max(), alpha[:, 0].max(), alpha[:, -1].max()) == 0.0


def test_attributes_cover_the_design_and_background_differs(train_records: list[dict]) -> None:
    assert all(r["background"] != r["colour"] for r in train_records)
    assert {r["colour"] for r in train_records} == set(shapes.COLOURS)
    assert {r["background"] for r in train_records} == set(shapes.COLOURS)
    assert {r["shape"] for r in train_records} == set(shapes.SHAPES)
    assert {r["size"] for r in train_records} == set(shapes.SIZES)
    assert {r["position"] for r in train_records} == set(shapes.POSITIONS)
    assert all(r["rotation"] == 0.0 for r in train_records if r["shape"] == "circle")
    assert len({round(r["rotation"], 6) for r in train_records if r["shape"] == "star"}) > 20


def test_caption_names_colour_shape_and_exactly_the_flagged_attributes(train_records: list[dict]) -> None:
    for r in train_records:
        caption, words = r["caption"], _words(r["caption"])
        assert f"{r['colour']} {r['shape']}" in caption
        assert bool(words & (SIZE_WORDS["small"] | SIZE_WORDS["large"])) == r["names_size"]
        if r["names_size"]:
            assert words & SIZE_WORDS[r["size"]]
        assert bool(words & POSITION_WORDS) == r["names_position"]
        if r["names_position"]:
            expected = {"top": {"top", "upper"}, "bottom": {"bottom", "lower"}, "left": {"left"}}
            expected |= {"right": {"right"}, "center": {"center", "middle"}}
            assert all(words & expected[part] for part in r["position"].split())
            assert not words & (POSITION_WORDS - set().union(*(expected[p] for p in r["position"].split())))
        assert ("background" in words) == r["names_background"]
        if r["names_background"]:
            assert f"{r['background']} background" in caption
        else:
            assert r["background"] not in words
    for flag in ("names_size", "names_position", "names_background"):
        assert 0.35 < np.mean([r[flag] for r in train_records]) < 0.65
    assert len({r["caption"] for r in train_records}) > N / 2


def test_holdout_pairs_split_train_from_eval_holdout() -> None:
    held = set(shapes.DEFAULT_HOLDOUT)
    assert (
        len(held) >= 3 and len({c for c, _ in held}) == len(held) and len({s for _, s in held}) == len(held)
    )
    for split in ("train", "eval_seen"):
        pairs = {(r.colour, r.shape) for r in (shapes.sample_spec(2, split, i) for i in range(300))}
        assert not pairs & held
    holdout_pairs = [
        (r.colour, r.shape) for r in (shapes.sample_spec(2, "eval_holdout", i) for i in range(60))
    ]
    assert set(holdout_pairs) == held
    custom = [["green", "circle"]]  # lists, as a Hydra config gives them
    assert {shapes.sample_spec(2, "eval_holdout", i, custom).colour for i in range(5)} == {"green"}
    assert all(
        (s.colour, s.shape) != ("green", "circle")
        for s in (shapes.sample_spec(2, "train", i, custom) for i in range(200))
    )


def test_bad_arguments_raise_config_errors_that_name_the_value() -> None:
    with pytest.raises(ConfigError, match="validation"):
        shapes.sample_spec(0, "validation", 0)
    with pytest.raises(ConfigError, match="magenta"):
        shapes.make_record(0, "train", 0, holdout=(("magenta", "circle"),))
    every_pair = tuple((c, s) for c in shapes.COLOURS for s in shapes.SHAPES)
    with pytest.raises(ConfigError, match="no \\(colour, shape\\) pair"):
        shapes.sample_spec(0, "train", 0, holdout=every_pair)
    with pytest.raises(ConfigError, match="no \\(colour, shape\\) pair"):
        shapes.sample_spec(0, "eval_holdout", 0, holdout=())
    with pytest.raises(ConfigError, match="-1"):
        shapes.sample_spec(0, "train", -1)
    with pytest.raises(ConfigError, match="resolution=0"):
        shapes.render(shapes.sample_spec(0, "train", 0), 0)
