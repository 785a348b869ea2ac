"""Write image-caption samples to disk, atomically, in the two layouts `seedtok.data.sources` reads.

* ``format="folder"``: ``out_dir/images/000000.png ...`` and ``out_dir/captions.jsonl`` with one line per
  image, ``{"image": "images/000000.png", "caption": "...", **meta}`` (read back by `CaptionFolder`).
* ``format="wds"``: ``out_dir/shard-000000.tar ...``, webdataset shards in the img2dataset layout: per
  sample ``{key}.png``, ``{key}.txt`` (the caption) and ``{key}.json`` (``{**meta, "key", "caption"}``),
  ``shard_size`` samples per shard (read back by `WebDatasetShards`). Only the stdlib ``tarfile`` is used.

Keys are the running sample number, zero-padded to 6 digits. Atomicity: everything is written into a
hidden temporary sibling directory (``.NAME.tmp-...``), each shard first as ``*.tar.partial``, and the
directory is renamed to ``out_dir`` only once complete, so an interrupted write never leaves a dataset or
shard that looks complete. On an exception the temporary directory is removed; after a hard kill a
``.NAME.tmp-*`` directory may be left behind and can be deleted.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import Any, Iterable

from .sources import DataError

FORMATS = ("folder", "wds")
KEY_DIGITS = 6
_RESERVED_FOLDER_KEYS = ("image", "caption")


def write_dataset(samples: Iterable, out_dir: str | os.PathLike, format: str = "folder",
                  shard_size: int = 1000, progress: bool = False, total: int | None = None,
                  overwrite: bool = False) -> int:
    """Write ``samples`` (objects with ``.image`` PIL image, ``.caption`` str, ``.meta`` dict) to ``out_dir``.

    Images are stored as PNG. ``out_dir`` must not exist unless ``overwrite=True`` (then the old folder is
    replaced only after the new one is complete). ``progress=True`` shows a tqdm bar (``total`` defaults to
    ``len(samples)`` when it has one). Returns the number of samples written.
    """
    if format not in FORMATS:
        raise DataError(f"unknown dataset format {format!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"shard_size must be a positive integer, got {shard_size!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DataError(f"output already exists: {out_dir} (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()

    if total is None and hasattr(samples, "__len__"):
        try:
            total = len(samples)  # type: ignore[arg-type]
        except TypeError:
            total = None
    iterator: Iterable = samples
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(samples, total=total, desc=f"writing {out_dir.name}", unit="img")
        iterator = bar
    try:
        count = (_write_folder if format == "folder" else _write_wds)(iterator, tmp, shard_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    _publish(tmp, out_dir, overwrite)
    return count


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    old = None
    if out_dir.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"output appeared while writing: {out_dir}")
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def _png_bytes(image: Any, key: str) -> bytes:
    if not hasattr(image, "save"):
        raise DataError(f"sample {key}: image must be a PIL image, got {type(image).__name__}")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _check(sample: Any, key: str) -> tuple[Any, str, dict]:
    try:
        image, caption, meta = sample.image, sample.caption, sample.meta
    except AttributeError:
        raise DataError(f"sample {key}: expected an object with .image, .caption and .meta, "
                        f"got {type(sample).__name__}") from None
    if not isinstance(caption, str):
        raise DataError(f"sample {key}: caption must be a string, got {type(caption).__name__}")
    return image, caption, dict(meta or {})


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(record: dict, key: str) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise DataError(f"sample {key}: metadata is not JSON serialisable: {exc}") from None


def _write_folder(samples: Iterable, tmp: Path, shard_size: int) -> int:
    images = tmp / "images"
    images.mkdir()
    count = 0
    with open(tmp / "captions.jsonl", "w", encoding="utf-8") as f:
        for count, sample in enumerate(samples, start=1):
            key = _key(count - 1)
            image, caption, meta = _check(sample, key)
            clash = [k for k in _RESERVED_FOLDER_KEYS if k in meta]
            if clash:
                raise DataError(f"sample {key}: meta may not use the reserved key(s) {', '.join(clash)}")
            rel = f"images/{key}.png"
            (tmp / rel).write_bytes(_png_bytes(image, key))
            f.write(_dumps({"image": rel, "caption": caption, **meta}, key) + "\n")
    return count


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # reproducible bytes: same samples -> same shards
    tar.addfile(info, io.BytesIO(data))


def _write_wds(samples: Iterable, tmp: Path, shard_size: int) -> int:
    count = 0
    tar: tarfile.TarFile | None = None
    partial = final = None

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            os.rename(partial, final)
            tar = None

    try:
        for count, sample in enumerate(samples, start=1):
            index = count - 1
            key = _key(index)
            if index % shard_size == 0:
                close()
                final = tmp / f"shard-{index // shard_size:06d}.tar"
                partial = final.with_name(final.name + ".partial")
                tar = tarfile.open(partial, "w", format=tarfile.PAX_FORMAT)
            image, caption, meta = _check(sample, key)
            _add(tar, f"{key}.png", _png_bytes(image, key))
            _add(tar, f"{key}.txt", caption.encode("utf-8"))
            _add(tar, f"{key}.json", _dumps({**meta, "key": key, "caption": caption}, key).encode("utf-8"))
        close()
    finally:
        if tar is not None:  # interrupted: leave no open handle (the temporary dir is removed by the caller)
            tar.close()
    return count
