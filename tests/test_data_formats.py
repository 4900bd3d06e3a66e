"""The user's own data: folder, parquet and WebDataset sources, the safe decode, hold-out, cache, streams.

Every fixture is written here, in tmp folders: a couple of dozen small images of which some are awkward but
usable (CMYK, 16-bit, RGBA, EXIF-rotated) and some unusable (random bytes, a truncated JPEG, one over the
pixel limit, one under the minimum side). The unusable ones must be skipped and counted, never fatal.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from unclip.data import sources
from unclip.data.sources import (
    check_source,
    expand_braces,
    is_streaming,
    load_split,
    open_stream,
    skipped_samples,
    split_names,
)
from unclip.errors import ConfigError, DataError
from unclip.images import ImageDecodeError, decode_square

RES = 16
RED, BLUE = (255, 0, 0), (0, 0, 255)
# keys of the awkward-but-usable and of the unusable images in every fixture
AWKWARD = ("cmyk", "grey16", "rgba", "exif")
BAD = ("corrupt", "truncated", "huge", "tiny")
SMALL_LIMIT = ["data.max_image_pixels=2000"]  # 48x48 "huge" is over it, the 40x32 images are not


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _top_red() -> Image.Image:
    """Upright 32 wide x 40 tall: top half red, bottom half blue."""
    image = Image.new("RGB", (32, 40), BLUE)
    image.paste(RED, (0, 0, 32, 20))
    return image


def _catalogue() -> dict[str, tuple[str, bytes]]:
    """key -> (suffix, encoded bytes)."""
    rng = np.random.default_rng(0)
    items = {
        f"plain{i:02d}": (".jpg", _encode(Image.new("RGB", (40, 32), (8 * i, 100, 50)), "JPEG"))
        for i in range(20)
    }
    items["cmyk"] = (".jpg", _encode(Image.new("CMYK", (40, 32), (0, 255, 255, 0)), "JPEG"))
    items["grey16"] = (".png", _encode(Image.fromarray(np.full((32, 40), 30000, np.uint16)), "PNG"))
    rgba = np.zeros((32, 40, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 0  # invisible red: white once composited
    items["rgba"] = (".png", _encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate the stored picture 90 degrees clockwise
    items["exif"] = (".jpg", _encode(_top_red().rotate(90, expand=True), "JPEG", exif=exif, quality=95))
    items["corrupt"] = (".jpg", rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    noise = _encode(Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)), "JPEG")
    items["truncated"] = (".jpg", noise[: len(noise) // 2])
    items["huge"] = (".png", _encode(Image.new("RGB", (48, 48), RED), "PNG"))
    items["tiny"] = (".png", _encode(Image.new("RGB", (8, 8), RED), "PNG"))
    return items


GOOD = {k for k in _catalogue() if k not in BAD}


def _caption(key: str) -> str:
    return f"a picture called {key}"


def _write_folder(root: Path, layout: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for key, (suffix, data) in _catalogue().items():
        name = f"sub/{key}{suffix}" if key.startswith("plain1") else f"{key}{suffix}"  # recursion
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        rows.append({"file_name": name, "text" if layout == "jsonl" else "caption": _caption(key)})
        if layout == "txt":
            (root / name).with_suffix(".txt").write_text(_caption(key))
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif layout == "csv":
        with open(root / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "caption"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def _write_shards(root: Path, shards: int = 4) -> list[str]:
    """WebDataset tars: <key>.jpg|png + <key>.txt + <key>.json, the catalogue dealt over the shards."""
    root.mkdir(parents=True, exist_ok=True)
    items = sorted(_catalogue().items())
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for key, (suffix, data) in items[s::shards]:
                caption = _caption(key).encode()
                meta = json.dumps({"caption": _caption(key), "width": 40}).encode()
                for name, payload in (
                    (f"{key}{suffix}", data),
                    (f"{key}.txt", caption),
                    (f"{key}.json", meta),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return [str(p) for p in sorted(root.glob("*.tar"))]


def _both_splits(data) -> tuple[dict, dict]:
    train, held = load_split(data, "train", RES), load_split(data, "eval", RES)
    return {r["key"]: r for r in train}, {r["key"]: r for r in held}


def _assert_good_rows_present(rows: dict) -> None:
    assert {k.rsplit("/", 1)[-1] for k in rows} == GOOD
    for key, row in rows.items():
        assert row["image"].mode == "RGB" and row["image"].size == (RES, RES)
        assert row["caption"] == _caption(key.rsplit("/", 1)[-1])
    pixels = {k.rsplit("/", 1)[-1]: np.asarray(r["image"], dtype=float) for k, r in rows.items()}
    assert pixels["exif"][1, RES // 2] == pytest.approx(RED, abs=40)  # upright: red on top
    assert pixels["exif"][RES - 2, RES // 2] == pytest.approx(BLUE, abs=40)
    assert pixels["cmyk"][8, 8] == pytest.approx(RED, abs=40)
    assert pixels["rgba"][8, 8] == pytest.approx((255, 255, 255), abs=1)  # transparent -> white
    assert pixels["grey16"][8, 8] == pytest.approx([round(30000 / 65535 * 255)] * 3, abs=1)


@pytest.mark.parametrize("layout", ["jsonl", "csv", "txt"])
def test_folder_layouts_decode_awkward_images_and_skip_bad_ones(compose_cfg, tmp_path, capsys, layout):
    root = _write_folder(tmp_path / "photos", layout)
    data = compose_cfg(["data=folder", f"data.path={root}", "data.eval_fraction=0.25", *SMALL_LIMIT]).data
    assert split_names(data) == ("train", "eval") and not is_streaming(data)
    train, held = _both_splits(data)
    assert held and not set(train) & set(held)  # the hold-out never trains
    assert "sub/plain10" in {**train, **held}  # keyed by the path under the folder, found recursively
    _assert_good_rows_present({**train, **held})
    assert skipped_samples(data, "train", RES) + skipped_samples(data, "eval", RES) == len(BAD)
    assert "[unclip] data: skipped" in capsys.readouterr().out
    manifest = json.loads(
        next((sources.cache_root(data) / "folder").glob("train-16px-*/manifest.json")).read_text()
    )
    assert {e["key"] for e in manifest["examples"]} <= set(BAD)


@pytest.mark.parametrize("cell", ["bytes", "struct", "path"])
def test_parquet_image_cells_of_every_kind(compose_cfg, tmp_path, cell):
    images = tmp_path / "images"
    images.mkdir()
    keys, cells = [], []
    for key, (suffix, data) in _catalogue().items():
        keys.append(key)
        if cell == "path":
            (images / f"{key}{suffix}").write_bytes(data)
            cells.append(f"images/{key}{suffix}")  # relative to the parquet file
        else:
            cells.append(data if cell == "bytes" else {"bytes": data, "path": f"{key}{suffix}"})
    table = pa.table({"id": keys, "image": cells, "caption": [_caption(k) for k in keys]})
    pq.write_table(table.slice(0, 12), tmp_path / "part-0.parquet")
    pq.write_table(table.slice(12), tmp_path / "part-1.parquet")
    path = tmp_path / "part-*.parquet" if cell == "struct" else tmp_path  # a glob or a folder
    overrides = ["data=parquet", f"data.path='{path}'", "data.key_column=id", "data.eval_fraction=0.25"]
    data = compose_cfg([*overrides, *SMALL_LIMIT]).data
    train, held = _both_splits(data)
    assert not set(train) & set(held)
    _assert_good_rows_present({**train, **held})
    assert skipped_samples(data, "train", RES) + skipped_samples(data, "eval", RES) == len(BAD)
    unkeyed = compose_cfg(["data=parquet", f"data.path={tmp_path}", *SMALL_LIMIT]).data
    assert all(k.startswith("part-") for k in load_split(unkeyed, "train", RES)["key"])  # <stem>-<row>


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return _write_shards(tmp_path_factory.mktemp("shards"))


def _wds(compose_cfg, shards, *overrides):
    folder = Path(shards[0]).parent
    urls = f'data.urls=["{folder}/shard-{{000..003}}.tar"]'
    return compose_cfg(["data=webdataset", urls, "data.eval_fraction=0.25", *SMALL_LIMIT, *overrides]).data


def _epoch(data, epoch: int, num_streams: int = 2, seed: int = 0) -> list[list[dict]]:
    return [
        list(open_stream(data, "train", RES, seed=seed, epoch=epoch, stream_index=i, num_streams=num_streams))
        for i in range(num_streams)
    ]


@pytest.mark.parametrize("caption_key", ["txt", "json.caption"])
def test_webdataset_streams_cover_train_once_apart_from_eval(compose_cfg, shards, caption_key):
    data = _wds(compose_cfg, shards, f"data.caption_key={caption_key}", "data.shuffle_buffer=4")
    assert is_streaming(data)
    with pytest.raises(ConfigError, match="open_stream"):
        load_split(data, "train", RES)
    held = {r["key"]: r for r in load_split(data, "eval", RES)}
    first = _epoch(data, 0)
    keys = [row["key"] for stream in first for row in stream]
    assert len(keys) == len(set(keys)) and set(keys) | set(held) == GOOD and not set(keys) & set(held)
    streamed = {row["key"]: row for stream in first for row in stream}
    _assert_good_rows_present({**streamed, **held})
    skipped = sum(row["skipped"] for stream in first for row in stream)
    assert skipped + skipped_samples(data, "eval", RES) == len(BAD)
    replay = _epoch(data, 0)
    assert [[r["key"] for r in s] for s in replay] == [[r["key"] for r in s] for s in first]
    assert all(
        np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(first[0], replay[0])
    )
    second = _epoch(data, 1)
    assert sorted(r["key"] for s in second for r in s) == sorted(keys)
    assert [r["key"] for s in second for r in s] != keys  # shuffled anew each epoch


def test_streams_split_examples_when_shards_do_not_divide_and_can_stay_in_order(compose_cfg, shards):
    data = _wds(compose_cfg, shards, "data.shuffle_buffer=0", "data.crop=random")
    streams = _epoch(data, 0, num_streams=3)  # 4 shards over 3 streams: every 3rd example each
    keys = [r["key"] for s in streams for r in s]
    assert (
        len(keys) == len(set(keys)) and set(keys) | {r["key"] for r in load_split(data, "eval", RES)} == GOOD
    )
    whole = _epoch(data, 5, num_streams=1)[0]
    assert [r["key"] for r in whole] == [r["key"] for r in _epoch(data, 6, num_streams=1)[0]]  # no shuffling
    replay = _epoch(data, 5, num_streams=1)[0]
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(whole, replay))


class _Streams(torch.utils.data.IterableDataset):
    """What a trainer does: one stream per DataLoader worker, built inside the worker."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rows = open_stream(
            self.data, "train", RES, seed=1, epoch=0, stream_index=info.id, num_streams=info.num_workers
        )
        return ({"key": r["key"], "skipped": r["skipped"]} for r in rows)


def test_streams_inside_dataloader_workers(compose_cfg, shards):
    data = _wds(compose_cfg, shards)
    loader = torch.utils.data.DataLoader(_Streams(data), batch_size=None, num_workers=2)
    keys = [row["key"] for row in loader]
    expected = [r["key"] for s in _epoch(data, 0, seed=1) for r in s]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(expected)


def test_explicit_eval_source_replaces_the_hold_out(compose_cfg, tmp_path, shards):
    root = _write_folder(tmp_path / "train", "txt")
    other = _write_folder(tmp_path / "held", "jsonl")
    data = compose_cfg(
        ["data=folder", f"data.path={root}", f"data.eval_path={other}", "data.eval_size=3"]
    ).data
    assert load_split(data, "eval", RES).num_rows == 3  # capped at data.eval_size
    assert load_split(data, "train", RES).num_rows == len(GOOD) + 1  # nothing held out; "huge" is allowed
    wds = _wds(compose_cfg, shards, f"data.eval_urls=[{shards[0]}]")
    first_shard = {k for k in sorted(_catalogue())[0::4] if k in GOOD}
    assert {r["key"] for r in load_split(wds, "eval", RES)} == first_shard
    assert {r["key"] for s in _epoch(wds, 0) for r in s} == GOOD


def test_materialised_split_is_cached_and_rebuilt_when_a_file_changes(compose_cfg, tmp_path, monkeypatch):
    root = _write_folder(tmp_path / "photos", "txt")
    data = compose_cfg(["data=folder", f"data.path={root}", "data.eval_fraction=0.25", *SMALL_LIMIT]).data
    calls = []
    real = sources.decode_square
    monkeypatch.setattr(sources, "decode_square", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_split(data, "train", RES)
    assert calls
    calls.clear()
    assert load_split(data, "train", RES)["caption"] == first["caption"] and not calls  # from the cache
    key = first[0]["key"]
    (root / f"{key}.txt").write_text("a new caption")
    again = {r["key"]: r["caption"] for r in load_split(data, "train", RES)}
    assert calls and again[key] == "a new caption"


def _jsonl(root: Path, rows: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), RED).save(root / "a.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bad_sources_are_named_before_training(compose_cfg, tmp_path, shards):
    def folder(path, *more):
        return compose_cfg(["data=folder", f"data.path={path}", *more]).data

    _jsonl(tmp_path / "label", [{"file_name": "a.png", "label": "x"}])
    with pytest.raises(DataError, match=r"no caption column.*\['file_name', 'label'\]"):
        check_source(folder(tmp_path / "label"))
    with pytest.raises(DataError, match=r"data.caption_column='desc'.*\['file_name', 'label'\]"):
        check_source(folder(tmp_path / "label", "data.caption_column=desc"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image"):
        check_source(folder(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="data.path=.*nowhere does not exist"):
        load_split(folder(tmp_path / "nowhere"), "train", RES)
    with pytest.raises(ConfigError, match="data.path is not set"):
        check_source(compose_cfg(["data=folder"]).data)
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        check_source(folder(tmp_path / "label", "data.eval_fraction=0"))
    with pytest.raises(ConfigError, match=r"'/no/such/shard-\*.tar' matches no shard"):
        check_source(_wds(compose_cfg, shards, 'data.urls=["/no/such/shard-*.tar"]'))
    with pytest.raises(ConfigError, match=r"from '/no/such/\{0..1\}.tar'"):
        check_source(_wds(compose_cfg, shards, 'data.urls=["/no/such/{0..1}.tar"]'))
    with pytest.raises(DataError, match=r"no field 'title' \(its fields: \['caption', 'width'\]\)"):
        check_source(_wds(compose_cfg, shards, "data.caption_key=json.title"))
    with pytest.raises(DataError, match=r"has no .caption \(its fields"):
        check_source(_wds(compose_cfg, shards, "data.caption_key=caption"))
    with pytest.raises(ConfigError, match="data.crop"):
        check_source(_wds(compose_cfg, shards, "data.crop=middle"))
    pq.write_table(pa.table({"image": [b"x"], "title": ["t"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"no caption column.*\['image', 'title'\]"):
        check_source(compose_cfg(["data=parquet", f"data.path={tmp_path / 't.parquet'}"]).data)


def test_brace_ranges_keep_their_padding():
    assert expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]


def test_decode_square_limits_and_precision(tmp_path):
    grey = np.zeros((20, 20), np.uint16)
    grey[:, 10:] = 257  # one 8-bit level: a 16-bit image keeps it through the resize
    square = decode_square(_encode(Image.fromarray(grey), "PNG"), 20)
    assert np.asarray(square)[5, 15].tolist() == [1, 1, 1] and np.asarray(square)[5, 2].tolist() == [0, 0, 0]
    with pytest.raises(ImageDecodeError, match="over the limit of 100"):
        decode_square(_encode(Image.new("RGB", (20, 20)), "PNG"), 8, max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # our limit never touches Pillow's global one
    wide = _encode(Image.fromarray(np.arange(64, dtype=np.uint8)[None].repeat(8, 0)), "PNG")
    crops = {
        np.asarray(decode_square(wide, 8, crop="random", rng=np.random.default_rng(s))).tobytes()
        for s in range(6)
    }
    assert len(crops) > 1


def test_a_split_with_no_usable_sample_says_why(compose_cfg, tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(b"not a picture")
        (root / f"{i}.txt").write_text("a caption")
    data = compose_cfg(["data=folder", f"data.path={root}", "data.eval_fraction=0.5"]).data
    with pytest.raises(
        DataError, match=r"train split has no usable sample .* skipped: \d: not a readable image"
    ):
        load_split(data, "train", RES)
