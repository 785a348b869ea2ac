"""Image-text data sources. Every source yields `Sample(image, caption, meta)` with an RGB PIL image.

* `CaptionFolder(root)`: a folder with ``captions.jsonl`` (one ``{"image": "rel/path.png", "caption": ...}``
  per line; extra keys become ``meta``). Images load lazily.
* `WebDatasetShards(paths_or_glob)`: img2dataset-layout tar shards (``{key}.jpg|.jpeg|.png|.webp`` +
  ``{key}.txt`` [+ ``{key}.json``]), streamed with the stdlib ``tarfile`` module. Corrupt samples are skipped
  and counted, never fatal.
* `KarpathyCaptions(json_path, image_root, split)`: the Karpathy split files of Flickr30K / COCO, for
  retrieval evaluation.

`seedtok.data.writer.write_dataset` writes the first two layouts.
"""

from __future__ import annotations

import glob as _glob
import io
import json
import operator
import os
import re
import tarfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError, ImageTooLargeError, SeedtokError
from .transforms import check_pixels, load_image, to_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a key has more than one image


class DataError(SeedtokError, ValueError):
    """A dataset file is malformed (bad JSON line, missing field, path escaping the root, no shards...)."""


@dataclass
class Sample:
    """One image-text pair: an RGB PIL image, its caption and free-form metadata."""

    image: Image.Image
    caption: str
    meta: dict = field(default_factory=dict)


def safe_relative_path(path: str, where: str) -> str:
    """Check that a dataset-relative path stays inside its root; returns it with ``/`` separators.

    Rejects empty paths, absolute paths (POSIX ``/x``, Windows ``C:\\x`` or ``\\\\server``) and any ``..``
    component. The check is lexical: symlinks inside the root are followed as they are.
    """
    if not isinstance(path, str) or not path.strip():
        raise DataError(f"{where}: image path must be a non-empty string, got {path!r}")
    if "\x00" in path:
        raise DataError(f"{where}: image path contains a NUL byte: {path!r}")
    posix = path.replace("\\", "/")
    if PurePosixPath(posix).is_absolute() or PureWindowsPath(path).is_absolute() or PureWindowsPath(path).drive:
        raise DataError(f"{where}: image path must be relative to the dataset root, got absolute {path!r}")
    if ".." in PurePosixPath(posix).parts:
        raise DataError(f"{where}: image path {path!r} escapes the dataset root ('..')")
    return posix


# ------------------------------------------------------------------------------------------------ folder
class CaptionFolder:
    """A folder of images with ``captions.jsonl``; ``ds[i]`` loads image ``i`` lazily.

    ``meta`` holds the line's keys other than ``"image"`` and ``"caption"`` (`image_path` gives the file), so
    a folder can be re-written with `write_dataset` as it is. Every line is validated when the folder is
    opened: a line that is not a JSON object, or lacks a string ``"image"`` / ``"caption"``, or whose image
    path is absolute or contains ``..``, raises `DataError` naming the file and the line number. Blank
    lines are ignored. Unreadable images raise `seedtok.errors.ImageError` when indexed.
    """

    def __init__(self, root: str | os.PathLike, captions: str = "captions.jsonl"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"dataset folder not found: {self.root}")
        self.captions_path = self.root / captions
        if not self.captions_path.is_file():
            raise DataError(f"no {captions} in dataset folder {self.root}")
        self._entries: list[tuple[str, str, dict]] = []
        try:
            data = self.captions_path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {self.captions_path}: {exc.strerror or exc}") from None
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{self.captions_path} line {lineno}: not UTF-8 (byte {exc.start})") from None
            if line.strip():
                self._entries.append(self._parse(line, lineno))

    def _parse(self, line: str, lineno: int) -> tuple[str, str, dict]:
        where = f"{self.captions_path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key in ("image", "caption"):
            if key not in record:
                raise DataError(f"{where}: missing required key {key!r}")
        if not isinstance(record["caption"], str):
            raise DataError(f"{where}: 'caption' must be a string, got {type(record['caption']).__name__}")
        image = safe_relative_path(record["image"], where)
        meta = {k: v for k, v in record.items() if k not in ("image", "caption")}
        return image, record["caption"], meta

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> Sample:
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"CaptionFolder indices must be integers, got {type(index).__name__}") from None
        n = len(self._entries)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        rel, caption, meta = self._entries[index]
        return Sample(load_image(self.root / rel), caption, dict(meta))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def image_path(self, index: int) -> Path:
        """The file of sample ``index`` (its ``"image"`` entry resolved against the root)."""
        return self.root / self._entries[index][0]

    def __repr__(self) -> str:
        return f"CaptionFolder({str(self.root)!r}, {len(self)} samples)"


# ------------------------------------------------------------------------------------------------ shards
def expand_shards(paths_or_glob: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Shard paths from a path, a directory (its ``*.tar``), a glob (``data/shard-*.tar``), a brace range
    (``shard-{000000..000009}.tar``) or a list of any of these. Globs and directories are sorted by name;
    explicit lists keep their order. Raises `DataError` when nothing matches or a named file is missing."""
    if isinstance(paths_or_glob, (str, os.PathLike)):
        items = [paths_or_glob]
    else:
        items = list(paths_or_glob)
    out: list[Path] = []
    for item in items:
        text = os.fspath(item)
        for pattern in _expand_braces(text):
            path = Path(pattern)
            if path.is_dir():
                found = sorted(path.glob("*.tar"))
                if not found:
                    raise DataError(f"no .tar shards in directory {path}")
                out.extend(found)
            elif any(ch in pattern for ch in "*?["):
                found = sorted(Path(p) for p in _glob.glob(pattern))
                if not found:
                    raise DataError(f"no shards match {pattern!r}")
                out.extend(found)
            elif path.is_file():
                out.append(path)
            else:
                raise DataError(f"shard not found: {path}")
    if not out:
        raise DataError("no shards given")
    return out


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_braces(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    head, tail = pattern[:match.start()], pattern[match.end():]
    step = 1 if int(hi) >= int(lo) else -1
    out = []
    for n in range(int(lo), int(hi) + step, step):
        out.extend(_expand_braces(f"{head}{n:0{width}d}{tail}"))
    return out


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Encoded image bytes -> RGB PIL image; `ImageError` when they cannot be decoded."""
    try:
        with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS: check_pixels raises instead of PIL warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            check_pixels(im, name)
            im.seek(0)
            im.load()
            image = im.copy()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large (decompression bomb guard): {name}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or undecodable image: {name}: {exc}") from None
    return to_rgb(image)


def sample_from_members(where: str, key: str, group: dict[str, bytes]) -> Sample | str:
    """One webdataset group (``{extension: bytes}``) -> a `Sample`, or the reason it is skipped (a string
    starting with ``where``). Shared by `WebDatasetShards` and the streaming path (`seedtok.data.stream`)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
    if ext is None:
        return f"{where}: no image member"
    if "txt" not in group:
        return f"{where}: no caption (.txt) member"
    try:
        caption = group["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return f"{where}: caption is not UTF-8"
    if not caption:
        return f"{where}: empty caption"
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{where}: invalid .json member"
        if not isinstance(meta, dict):
            return f"{where}: .json member is not an object"
        meta.pop("caption", None)
    meta.setdefault("key", key)
    try:
        image = decode_image_bytes(group[ext], f"{where}.{ext}")
    except ImageError as exc:
        return str(exc)
    return Sample(image, caption, meta)


class WebDatasetShards:
    """Stream img2dataset-layout tar shards as `Sample`s, in a fixed order (shards as given / sorted, members
    in tar order).

    Members are grouped by key (consecutive members sharing the name up to the first dot). A group becomes
    a sample when it has an image (``.jpg``/``.jpeg``/``.png``/``.webp``) that decodes and a non-empty UTF-8
    ``.txt`` caption; a ``.json`` member, if any, must be a JSON object and becomes ``meta`` (its
    ``"caption"`` entry dropped, the text file wins). Anything else is skipped and counted in ``skipped``
    (reset at the start of every pass), with the reason kept in ``skip_reasons``. A shard that is
    unreadable or truncated ends with a warning, is counted in ``bad_shards`` and the stream goes on with
    the next shard.
    """

    def __init__(self, paths_or_glob: str | os.PathLike | Iterable[str | os.PathLike]):
        self.paths = expand_shards(paths_or_glob)
        self.skipped = 0
        self.skip_reasons: list[str] = []
        self.bad_shards = 0

    def __iter__(self) -> Iterator[Sample]:
        self.skipped = 0
        self.skip_reasons = []
        self.bad_shards = 0
        for path in self.paths:
            yield from self._iter_shard(path)

    def _skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons.append(reason)

    def _iter_shard(self, path: Path) -> Iterator[Sample]:
        key: str | None = None
        group: dict[str, bytes] = {}
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, ext = _split_key(member.name)
                    if member_key != key:
                        if key is not None:
                            sample = self._make_sample(path, key, group)
                            if sample is not None:
                                yield sample
                        key, group = member_key, {}
                    handle = tar.extractfile(member)
                    group[ext] = handle.read() if handle is not None else b""
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            self.bad_shards += 1
            warnings.warn(f"skipping the rest of shard {path}: {exc}", RuntimeWarning, stacklevel=3)
            if key is not None:
                self._skip(f"{path}:{key}: shard ended while reading this sample")
            return
        if key is not None:
            sample = self._make_sample(path, key, group)
            if sample is not None:
                yield sample

    def _make_sample(self, path: Path, key: str, group: dict[str, bytes]) -> Sample | None:
        result = sample_from_members(f"{path}:{key}", key, group)
        if isinstance(result, str):
            self._skip(result)
            return None
        return result

    def __repr__(self) -> str:
        return f"WebDatasetShards({len(self.paths)} shards)"


# ------------------------------------------------------------------------------------------------ Karpathy
class KarpathyCaptions:
    """A Karpathy-format split file (``dataset_flickr30k.json`` / ``dataset_coco.json``) for retrieval.

    ``{"images": [{"filename": ..., "filepath": optional, "split": ..., "sentences": [{"raw": ...}]}]}``.
    Image ``i`` lives at ``image_root / filepath / filename`` (``filepath`` is e.g. ``val2014`` for COCO and
    absent for Flickr30K). ``split`` is one split name or several (e.g. ``("train", "restval")``); the
    standard retrieval test sets are ``split="test"`` (1,000 Flickr30K images, 5,000 COCO images, 5
    captions each).

    * ``images()``: the image paths of the split, in file order;
    * ``captions()``: every caption as ``(image_index, caption)``, image_index indexing ``images()``;
    * ``ds[i]`` / iteration: `Sample` with image ``i`` (loaded lazily) and its first caption; ``meta`` holds
      all its captions, the file name and the ids the file gives (``imgid``, ``cocoid``).
    """

    def __init__(self, json_path: str | os.PathLike, image_root: str | os.PathLike,
                 split: str | Sequence[str] = "test"):
        self.json_path = Path(json_path)
        self.image_root = Path(image_root)
        splits = (split,) if isinstance(split, str) else tuple(split)
        self.split = splits
        try:
            with open(self.json_path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DataError(f"Karpathy split file not found: {self.json_path}") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.json_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise DataError(f"{self.json_path}: expected an object with an 'images' list")
        self._paths: list[Path] = []
        self._captions: list[list[str]] = []
        self._meta: list[dict] = []
        seen_splits = set()
        for n, entry in enumerate(images):
            where = f"{self.json_path} images[{n}]"
            if not isinstance(entry, dict) or "filename" not in entry or "split" not in entry:
                raise DataError(f"{where}: expected an object with 'filename' and 'split'")
            seen_splits.add(entry["split"])
            if entry["split"] not in splits:
                continue
            sentences = entry.get("sentences")
            if not isinstance(sentences, list) or not sentences:
                raise DataError(f"{where}: missing or empty 'sentences'")
            raws = []
            for s in sentences:
                raw = s.get("raw") if isinstance(s, dict) else None
                if not isinstance(raw, str):
                    raise DataError(f"{where}: every sentence needs a string 'raw'")
                raws.append(raw.strip())
            rel = entry["filename"]
            if entry.get("filepath"):
                rel = f"{entry['filepath']}/{rel}"
            rel = safe_relative_path(rel, where)
            meta = {"filename": rel, "split": entry["split"], "captions": raws}
            for k in ("imgid", "cocoid", "id"):
                if k in entry:
                    meta[k] = entry[k]
            self._paths.append(self.image_root / rel)
            self._captions.append(raws)
            self._meta.append(meta)
        if not self._paths:
            raise DataError(f"{self.json_path}: no images in split {'/'.join(splits)} "
                            f"(the file has: {', '.join(sorted(map(str, seen_splits))) or 'none'})")

    def images(self) -> list[Path]:
        return list(self._paths)

    def captions(self) -> list[tuple[int, str]]:
        return [(i, c) for i, caps in enumerate(self._captions) for c in caps]

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> Sample:
        n = len(self._paths)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a split of {n} images")
        meta = dict(self._meta[index], image_index=index, captions=list(self._captions[index]))
        return Sample(load_image(self._paths[index]), self._captions[index][0], meta)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (f"KarpathyCaptions({str(self.json_path)!r}, split={'/'.join(self.split)!r}, "
                f"{len(self)} images, {sum(map(len, self._captions))} captions)")


class Slice:
    """The first ``n`` items of an indexable source, as a sized sequence (lazy)."""

    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index]


def open_source(spec: str | os.PathLike) -> Sequence[Sample]:
    """A data spec -> a sized, indexable sequence of Samples.

    ``emoji:SPLIT:N[:SEED]`` (the emoji world), a folder with ``captions.jsonl``, or tar shards (a path, glob
    or brace pattern ending in ``.tar``; read once into memory)."""
    text = str(spec)
    if text.startswith("emoji:"):
        from .emoji import EmojiWorld

        parts = text.split(":")
        if len(parts) not in (3, 4) or not parts[2].isdigit() or (len(parts) == 4 and not parts[3].isdigit()):
            raise DataError(f"bad emoji data spec {text!r}; expected emoji:SPLIT:N[:SEED]")
        return Slice(EmojiWorld(parts[1], int(parts[3]) if len(parts) == 4 else 0), int(parts[2]))
    if text.endswith(".tar") or "*" in text or "{" in text:
        samples = list(WebDatasetShards(text))
        if not samples:
            raise DataError(f"no readable samples in {text}")
        return samples
    path = Path(text)
    if path.is_dir():
        folder = CaptionFolder(path)
        if len(folder) == 0:
            raise DataError(f"{path} holds no samples")
        return folder
    raise DataError(f"no dataset at {text!r} (expected emoji:SPLIT:N[:SEED], a folder with captions.jsonl, "
                    f"or .tar shards)")
