"""Streaming img2dataset-layout shards with webdataset, for training at scale (no pass over the data first).

`ShardStream` is an ``IterableDataset`` for one rank. Per epoch, the shard list is shuffled by (seed, epoch)
the same way on every rank, then split by node (``urls[rank::world_size]``) and by DataLoader worker
(``webdataset.split_by_worker``), so within an epoch every shard, hence every sample, is read by exactly one
(rank, worker). With ``resampled=True`` (the default for paper runs) each (rank, worker) instead draws shards
with replacement, forever, from a generator seeded by (seed, rank, worker, start): no epoch boundary, no rank
waiting for another to finish its share. Samples pass through a shuffle buffer (``shuffle_buffer``) seeded the
same way, and are cut into batches of exactly ``batch_size`` -- the stream runs across epoch boundaries, so no
rank ever gets a short batch or runs dry before the others (both would stall or break the collective calls
of the contrastive loss).

Corrupt data never stops a run: an unreadable or truncated shard is reported through webdataset's handler and
the stream goes on with the next shard; a sample whose image does not decode, or that lacks a caption, is
skipped (`seedtok.data.sources.sample_from_members` decides, as for the in-memory reader). Every batch carries
``"corrupt"``: how many samples (and shards) its worker skipped since its previous batch; the Trainer sums it
over ranks and writes the running total to the JSONL log (``corrupt_skipped``).

Resume is approximate, by design: shuffle buffers, DataLoader worker interleaving and partly read shards hold
state no checkpoint keeps, and replaying a stream to its position would mean decoding everything again. A
resumed run therefore starts a fresh draw seeded by (seed, samples seen so far): with ``resampled=True`` it is
statistically the same stream (shards drawn with replacement); in epoch mode it starts a new pass. For an
exactly resumable run use an in-memory / map-style source (``open_source``), whose order is a pure function of
(seed, samples seen).
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Callable, Iterator, Sequence

import torch

from .sources import Sample, expand_shards, sample_from_members


class ShardStream(torch.utils.data.IterableDataset):
    """Batches ``collate(list[Sample]) -> dict`` of one rank's share of tar shards (see the module docstring).

    ``epochs``: None streams forever (training); an int stops after that many passes (epoch mode) and yields
    the last, partial batch -- for tests and one-pass jobs.
    """

    def __init__(self, urls: str | os.PathLike | Sequence, collate: Callable[[list[Sample]], dict], batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 resampled: bool = False, start: int = 0, epochs: int | None = None):
        super().__init__()
        self.urls = [str(p) for p in expand_shards(urls)]
        if not resampled and len(self.urls) < world_size:
            from .sources import DataError

            raise DataError(f"{len(self.urls)} shards cannot be split over {world_size} ranks without "
                            f"duplicates; make more shards or use resampled=True")
        self.collate, self.batch_size = collate, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.resampled, self.start, self.epochs = shuffle_buffer, resampled, start, epochs
        self.skipped = 0  # in this process (each DataLoader worker counts its own; batches carry the counts)

    # ------------------------------------------------------------------------------------------ shards
    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def shard_urls(self) -> Iterator[str]:
        """This (rank, worker)'s shards, epoch after epoch (or drawn with replacement)."""
        worker, num_workers = self._worker()
        if self.resampled:
            rng = random.Random(f"{self.seed}-{self.rank}-{worker}-{self.start}")
            while True:
                yield rng.choice(self.urls)
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = list(self.urls)
            random.Random(f"{self.seed}-{self.start}-{epoch}").shuffle(order)  # same on every rank
            mine = order[self.rank::self.world_size]
            if num_workers > 1 and len(mine) < num_workers:
                warnings.warn(f"rank {self.rank} has {len(mine)} shards for {num_workers} workers: some idle",
                              RuntimeWarning, stacklevel=2)
            yield from mine[worker::num_workers]  # webdataset.split_by_worker, with the worker id known here
            epoch += 1

    def _shard_error(self, exc: Exception) -> bool:
        """webdataset handler: count, warn and go on with the next shard."""
        self.skipped += 1
        warnings.warn(f"skipping unreadable shard data: {exc}", RuntimeWarning, stacklevel=2)
        return True

    # ------------------------------------------------------------------------------------------ samples
    def samples(self) -> Iterator[Sample]:
        """This (rank, worker)'s decoded samples, shuffled through the buffer; corrupt ones skipped."""
        import webdataset as wds

        worker, _ = self._worker()
        raw = wds.tarfile_to_samples(handler=self._shard_error)({"url": url} for url in self.shard_urls())
        decoded = self._decode(raw)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"shuffle-{self.seed}-{self.rank}-{worker}-{self.start}")
            decoded = wds.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(decoded)
        yield from decoded

    def _decode(self, raw) -> Iterator[Sample]:
        for item in raw:
            key = item.get("__key__", "?")
            group = {k: v for k, v in item.items() if not k.startswith("__") and isinstance(v, bytes)}
            result = sample_from_members(f"{item.get('__url__', '?')}:{key}", key, group)
            if isinstance(result, str):
                self.skipped += 1
                continue
            yield result

    def __iter__(self) -> Iterator[dict]:
        reported = self.skipped
        batch: list[Sample] = []
        for sample in self.samples():
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._finish(batch, reported)
                reported, batch = self.skipped, []
        if batch:  # only in epoch mode (a finite stream)
            yield self._finish(batch, reported)

    def _finish(self, batch: list[Sample], reported: int) -> dict:
        out = self.collate(batch)
        out["corrupt"] = torch.tensor(self.skipped - reported)
        return out


def loader(stream: ShardStream, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over a ShardStream's ready-made batches (``batch_size=None``: no re-batching)."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0,
                                       prefetch_factor=2 if num_workers > 0 else None)
