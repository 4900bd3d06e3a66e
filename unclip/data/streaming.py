"""Streamed training data whose global batches do not depend on how many processes or workers read them.

A streaming source (WebDataset shards, embedding shards) is read as ``G`` independent *streams*
(``trainer.streams``): stream ``g`` is the part of the data that ``split_dataset_by_node(rank=g,
world_size=G)`` gives, shuffled from (seed, epoch). Micro-batch ``k`` of the whole run is the ``k``-th chunk
of ``b / G`` examples of every stream, in stream order (``b`` the global micro-batch). Process ``r`` of ``W``
reads the streams ``g = r, r + W, ...`` and its DataLoader workers split those again, so:

- every process sees a different part of the data (nothing is read twice), and
- the global micro-batch, and so the gradient that DDP averages, is the same for 1, 2 or N processes and any
  number of workers, as long as ``G`` stays the same: a 2-process run ends with the weights of a 1-process
  run.

An epoch ends for everyone as soon as one stream runs out (processes agree on it every micro-step, so no
process waits forever in a collective): with shards of equal size that is after every example was seen once;
otherwise the longer streams' last few examples wait for the next epoch's reshuffle.

Each chunk carries how many corrupt samples its stream skipped while filling it, so the count shown in the
progress bar is exact across workers and processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import count, islice
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from unclip.errors import ConfigError

# stream_index, epoch -> iterator of (example, skipped) pairs; ``skipped`` counts the corrupt samples dropped
# just before ``example``
OpenStream = Callable[[int, int], Iterator[tuple[Any, int]]]


def stream_layout(streams: int, num_processes: int, num_workers: int, micro_batch: int) -> int:
    """Check that ``streams`` divide evenly over processes, workers and the global micro-batch; return the
    number of examples each stream contributes to one micro-batch. ``streams=0`` picks processes x workers."""
    workers = max(1, num_workers)
    streams = streams or num_processes * workers
    per_process, leftover = divmod(streams, num_processes)
    if leftover or per_process % workers:
        raise ConfigError(
            f"trainer.streams={streams} must be a multiple of the {num_processes} processes x "
            f"{workers} data-loader workers (trainer.num_workers)"
        )
    if micro_batch % streams:
        raise ConfigError(
            f"the global micro-batch of {micro_batch} (trainer.batch_size / trainer.grad_accum) must be a "
            f"multiple of trainer.streams={streams}"
        )
    return micro_batch // streams


class StreamChunks(IterableDataset):
    """The chunks of one process's streams, for a DataLoader with ``batch_size=None``.

    Each worker reads its share of the streams in lockstep and yields, for chunk index 0, 1, ...: one chunk
    per stream, ``{"stream", "index", "skipped", "batch"}`` with ``batch = collate(examples)``. The DataLoader
    takes one item from each worker in turn, so chunks of the same index arrive together.
    """

    def __init__(self, open_stream: OpenStream, streams: list[int], chunk: int, collate: Callable) -> None:
        self.open_stream = open_stream
        self.streams = streams
        self.chunk = chunk
        self.collate = collate
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        mine = self.streams if worker is None else self.streams[worker.id :: worker.num_workers]
        readers = [(index, self.open_stream(index, self.epoch)) for index in mine]
        for position in count():
            for stream, reader in readers:
                pairs = list(islice(reader, self.chunk))
                if len(pairs) < self.chunk:
                    return
                yield {
                    "stream": stream,
                    "index": position,
                    "skipped": sum(skipped for _, skipped in pairs),
                    "batch": self.collate([example for example, _ in pairs]),
                }


def concat_batches(batches: list[Any]) -> Any:
    """Join collated batches (tensors, or dicts of tensors) along the batch dimension."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {key: concat_batches([b[key] for b in batches]) for key in first}
    raise TypeError(f"cannot join batches of type {type(first).__name__}")


def micro_batches(chunks: Iterator[dict[str, Any]], streams_per_process: int) -> Iterator[tuple[Any, int]]:
    """This process's micro-batches, ``(batch, skipped)``, from the chunks of its streams: the chunks of one
    index joined in stream order. A chunk index some stream never delivered (its data ran out) ends the
    epoch."""
    pending: dict[int, dict[int, dict[str, Any]]] = {}
    expected = 0
    for chunk in chunks:
        group = pending.setdefault(chunk["index"], {})
        group[chunk["stream"]] = chunk
        while len(pending.get(expected, ())) == streams_per_process:
            ready = pending.pop(expected)
            ordered = [ready[s] for s in sorted(ready)]
            yield concat_batches([c["batch"] for c in ordered]), sum(c["skipped"] for c in ordered)
            expected += 1
