"""The stream layout: the same global micro-batches for any number of processes and workers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from unclip.data.streaming import StreamChunks, concat_batches, micro_batches, stream_layout
from unclip.errors import ConfigError

EXAMPLES = 96  # 4 streams of 24


def _open_stream(num_streams: int, corrupt_every: int = 0):
    """Stream ``index`` holds examples index, index + num_streams, ...; in epoch e their order is reversed
    when e is odd. Every ``corrupt_every``-th example of a stream is 'corrupt': skipped and counted."""

    def open_stream(index: int, epoch: int):
        values = list(range(index, EXAMPLES, num_streams))
        if epoch % 2:
            values.reverse()
        skipped = 0
        for position, value in enumerate(values):
            if corrupt_every and position % corrupt_every == corrupt_every - 1:
                skipped += 1
                continue
            yield {"x": torch.tensor([value])}, skipped
            skipped = 0

    return open_stream


def _process_batches(rank: int, world: int, streams: int, micro_batch: int, workers: int, epoch: int = 0):
    chunk = stream_layout(streams, world, workers, micro_batch)
    dataset = StreamChunks(_open_stream(streams), list(range(rank, streams, world)), chunk, default_collate)
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [batch["x"].flatten().tolist() for batch, _ in micro_batches(iter(loader), streams // world)]


def _global_batches(world: int, workers: int, epoch: int = 0, streams: int = 4, micro_batch: int = 8):
    per_rank = [_process_batches(r, world, streams, micro_batch, workers, epoch) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    return [sorted(sum(parts, [])) for parts in zip(*per_rank)]


def test_every_example_once_per_epoch_and_the_same_batches_for_any_world_size():
    one = _global_batches(world=1, workers=0)
    assert sorted(sum(one, [])) == list(range(EXAMPLES))
    assert _global_batches(world=2, workers=0) == one
    assert _global_batches(world=4, workers=0) == one
    assert _global_batches(world=2, workers=2) == one  # DataLoader workers split a process's streams again
    assert _global_batches(world=1, workers=2) == one


def test_epochs_differ_and_replay_identically():
    assert _global_batches(world=1, workers=0, epoch=1) != _global_batches(world=1, workers=0, epoch=0)
    assert _global_batches(world=2, workers=0, epoch=1) == _global_batches(world=1, workers=0, epoch=1)


def test_skipped_samples_travel_with_the_batches():
    dataset = StreamChunks(_open_stream(2, corrupt_every=5), [0, 1], 4, default_collate)
    pairs = list(micro_batches(iter(DataLoader(dataset, batch_size=None)), 2))
    # each stream of 48 keeps 4 of every 5: 38 examples, 9 chunks of 4; a chunk after the first starts just
    # after a corrupt example, so 8 skips per stream arrive with the chunks read
    assert len(pairs) == 9
    assert sum(skipped for _, skipped in pairs) == 2 * 8


def test_a_stream_that_runs_out_ends_the_epoch():
    def open_stream(index: int, epoch: int):
        for value in range(10 if index == 0 else 30):
            yield {"x": torch.tensor([value])}, 0

    dataset = StreamChunks(open_stream, [0, 1], 4, default_collate)
    assert len(list(micro_batches(iter(DataLoader(dataset, batch_size=None)), 2))) == 2


@pytest.mark.parametrize(
    "streams, world, workers, micro, match",
    [
        (3, 2, 0, 12, "multiple of the 2 processes"),
        (4, 2, 4, 16, "workers"),
        (4, 1, 0, 6, "micro-batch of 6"),
    ],
)
def test_layouts_that_do_not_divide_are_named(streams, world, workers, micro, match):
    with pytest.raises(ConfigError, match=match):
        stream_layout(streams, world, workers, micro)


def test_concat_batches_joins_dicts_and_tensors():
    a, b = {"x": torch.zeros(2, 3), "y": torch.ones(2)}, {"x": torch.ones(1, 3), "y": torch.zeros(1)}
    joined = concat_batches([a, b])
    assert joined["x"].shape == (3, 3) and joined["y"].tolist() == [1, 1, 0]
    assert concat_batches([torch.zeros(2), torch.ones(3)]).shape == (5,)
