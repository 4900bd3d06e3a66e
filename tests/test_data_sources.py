"""The data= layer: shapes splits through `datasets`, cached on disk, with clear errors for bad settings."""

from __future__ import annotations

import numpy as np
import pytest

from unclip.data.sources import (
    cache_root,
    check_source,
    is_streaming,
    load_split,
    skipped_samples,
    split_names,
)
from unclip.errors import ConfigError


def _cfg(compose_cfg, *overrides):
    return compose_cfg(["data.train_size=40", "data.eval_size=12", *overrides]).data


def test_splits_are_cached_deterministic_and_carry_attributes(compose_cfg):
    data = _cfg(compose_cfg)
    train = load_split(data, "train", 32)
    again = load_split(data, "train", 32)
    assert train._fingerprint == again._fingerprint  # loaded from the cache, not rebuilt
    assert train.num_rows == 40 and train[0]["image"].size == (32, 32)
    assert np.array_equal(np.asarray(train[3]["image"]), np.asarray(again[3]["image"]))
    for column in ("caption", "colour", "shape", "size", "position", "background", "names_size"):
        assert column in train.column_names
    row = train[0]
    assert row["colour"] in row["caption"] and row["shape"] in row["caption"]
    assert any(p.name.startswith("train-32px-40") for p in (cache_root(data) / "shapes").iterdir())


def test_holdout_pairs_only_in_holdout_split(compose_cfg):
    data = _cfg(compose_cfg)
    holdout = {tuple(p) for p in data.holdout}
    train = load_split(data, "train", 16)
    seen = load_split(data, "eval_seen", 16)
    held = load_split(data, "eval_holdout", 16)
    assert not holdout & set(zip(train["colour"], train["shape"]))
    assert not holdout & set(zip(seen["colour"], seen["shape"]))
    assert set(zip(held["colour"], held["shape"])) <= holdout


def test_same_spec_at_two_resolutions(compose_cfg):
    data = _cfg(compose_cfg)
    small, large = load_split(data, "eval_seen", 32), load_split(data, "eval_seen", 128)
    assert small["caption"] == large["caption"]
    down = np.asarray(large[0]["image"].resize((32, 32), resample=4), dtype=float)
    assert np.abs(down - np.asarray(small[0]["image"], dtype=float)).mean() < 8


def test_corrupt_cache_is_rebuilt(compose_cfg):
    data = _cfg(compose_cfg, "data.seed=7")
    load_split(data, "eval_seen", 16)
    folders = (cache_root(data) / "shapes").iterdir()
    folder = next(p for p in folders if p.name.startswith("eval_seen-16px-12"))
    for f in folder.iterdir():
        f.write_bytes(b"garbage")
    assert load_split(data, "eval_seen", 16).num_rows == 12


@pytest.mark.parametrize(
    "override, match",
    [("data.holdout=[[red,hexagon]]", "data.holdout"), ("data.train_size=0", "data.train_size")],
)
def test_bad_data_settings_are_named(compose_cfg, override, match):
    with pytest.raises(ConfigError, match=match):
        load_split(_cfg(compose_cfg, override), "train", 16)


def test_unknown_split_is_named(compose_cfg):
    with pytest.raises(ConfigError, match="validation"):
        load_split(_cfg(compose_cfg), "validation", 16)


def test_shapes_answers_the_common_source_interface(compose_cfg):
    data = _cfg(compose_cfg)
    assert split_names(data) == ("train", "eval_seen", "eval_holdout") and not is_streaming(data)
    check_source(data)
    assert skipped_samples(data, "eval_seen", 16) == 0
    with pytest.raises(ConfigError, match="data.eval_size"):
        check_source(_cfg(compose_cfg, "data.eval_size=0"))
