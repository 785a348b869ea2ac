"""Image ids extracted once, kept as shards, so LM training never runs the vision encoder.

Layout of an ids folder (``seedtok extract-ids``)::

    ids-000000.safetensors   tensor "ids" int32 [n, num_tokens]; metadata "captions" and "meta" (JSON lists)
    ids-000001.safetensors   ...
    index.json               {"tokenizer", "num_tokens", "codebook_size", "source", "count", "shards": [...]}

Every shard is written atomically (temporary name, then rename), and ``index.json`` last, so a folder with an
index is complete. An interrupted extraction resumes: shards already on disk are kept. Under ``torchrun`` /
``accelerate launch`` (``rank``, ``world_size``, ``barrier``) rank r encodes shards r, r + W, r + 2W, ...;
rank 0 writes the index once every rank has finished, so the folder is the same as a one-process run's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..fileio import atomic_write, atomic_write_text
from .sources import DataError

INDEX_NAME = "index.json"


@dataclass
class IdsDataset:
    """Image ids with their captions and metadata, in memory."""

    ids: torch.Tensor  # [N, num_tokens] long
    captions: list[str]
    meta: list[dict] = field(default_factory=list)
    tokenizer: str = ""
    codebook_size: int = 0

    def __len__(self) -> int:
        return len(self.captions)


def _shard_name(index: int) -> str:
    return f"ids-{index:06d}.safetensors"


def _read_shard(path: Path) -> tuple[torch.Tensor, list[str], list[dict]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            ids = f.get_tensor("ids").long()
            metadata = f.metadata() or {}
        captions, meta = json.loads(metadata["captions"]), json.loads(metadata["meta"])
    except Exception as exc:  # noqa: BLE001 - any unreadable shard is one clear error
        raise DataError(f"cannot read ids shard {path}: {exc}") from None
    if len(captions) != len(ids) or len(meta) != len(ids):
        raise DataError(f"ids shard {path}: {len(ids)} ids but {len(captions)} captions")
    return ids, captions, meta


def extract_ids(tokenizer, samples: Sequence, out_dir: str | os.PathLike, source: str = "",
                tokenizer_name: str = "", shard_size: int = 1000, batch_size: int = 32, progress: bool = True,
                rank: int = 0, world_size: int = 1, barrier=None) -> Path:
    """Encode every sample's image once; write shards of ids + captions + metadata, then the index. With
    ``world_size`` > 1 this process encodes its share of the shards (``barrier``: waits for every rank)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_NAME).is_file():
        raise DataError(f"{out} already holds extracted ids (remove it to extract again)")
    total = len(samples)
    if total == 0:
        raise DataError("no samples to extract")
    shards = []
    bar = None
    mine = sum(min(total, s + shard_size) - s for n, s in enumerate(range(0, total, shard_size))
               if n % world_size == rank)
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=mine, desc=f"extract ids (rank {rank})" if world_size > 1 else "extract ids", unit="img")
    for number, start in enumerate(range(0, total, shard_size)):
        path = out / _shard_name(number)
        stop = min(total, start + shard_size)
        shards.append(path.name)
        if number % world_size != rank:  # another rank's shard
            continue
        if path.is_file():  # resumed: a finished shard is kept
            if bar is not None:
                bar.update(stop - start)
            continue
        ids, captions, metas = [], [], []
        for chunk in range(start, stop, batch_size):
            batch = [samples[i] for i in range(chunk, min(stop, chunk + batch_size))]
            ids.append(tokenizer.encode([s.image for s in batch], batch_size=batch_size).cpu().to(torch.int32))
            captions += [s.caption for s in batch]
            metas += [dict(s.meta) for s in batch]
            if bar is not None:
                bar.update(len(batch))
        tensors = {"ids": torch.cat(ids).contiguous()}
        metadata = {"captions": json.dumps(captions), "meta": json.dumps(metas, default=str)}
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))
    if bar is not None:
        bar.close()
    if world_size > 1:
        if barrier is None:
            raise DataError("extract_ids with world_size > 1 needs a barrier")
        barrier()  # every rank's shards are on disk
        if rank != 0:
            barrier()  # rank 0 writes the index
            return out
    index = {"tokenizer": tokenizer_name or tokenizer.config.name, "num_tokens": tokenizer.num_tokens,
             "codebook_size": tokenizer.codebook_size, "source": str(source), "count": total, "shards": shards}
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2))
    if world_size > 1:
        barrier()
    return out


def load_ids(folder: str | os.PathLike) -> IdsDataset:
    """An ids folder -> `IdsDataset` (all shards, in order)."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        raise DataError(f"{folder} holds no extracted image ids (no {INDEX_NAME}); run `seedtok extract-ids`")
    try:
        index = json.loads(index_path.read_text())
        shard_names = list(index["shards"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"malformed {index_path}: {exc}") from None
    ids, captions, meta = [], [], []
    for name in shard_names:
        if "/" in name or "\\" in name or name.startswith("."):
            raise DataError(f"{index_path}: bad shard name {name!r}")
        shard_ids, shard_captions, shard_meta = _read_shard(folder / name)
        ids.append(shard_ids)
        captions += shard_captions
        meta += shard_meta
    data = IdsDataset(torch.cat(ids), captions, meta, index.get("tokenizer", ""), int(index.get("codebook_size", 0)))
    if len(data) != index.get("count", len(data)):
        raise DataError(f"{folder}: index says {index['count']} samples, shards hold {len(data)}")
    return data
