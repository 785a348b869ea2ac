"""Score images as emoji-world scenes: which emoji, on which background colour.

Used to score reconstructions (and text-to-image output) of the emoji world (`seedtok.data.emoji`). The
scorer is training-free: the frozen ImageNet EfficientNet-Lite0 of the tiny preset compares a normalised crop
of the image with templates of every emoji in the pool, rendered the same way on the detected colour.

Steps, per image (any size; RGB):

1. **Background**: every border pixel votes for its nearest `PALETTE` colour (RGB distance); the most common
   one is the background (`detect_background`).
2. **Crop** (`normalize_scene`): the bounding box of the pixels that differ from the background by more than
   48 (`CHANNEL_DIFF`) in some channel. The background reference is the median of the border pixels that
   voted for the winner (the palette colour itself on a clean scene); when the border is noisy the threshold
   rises above the border's own spread, isolated pixels are ignored, and a degenerate box (nothing, or a
   sliver) falls back to the whole image. The box is recentred, its long side scaled (bicubic) to `FILL`
   (0.8) of a `INPUT_SIZE` (128) px square, and the rest is padded with the background reference.
3. **Features**: EfficientNet-Lite0 at 128 px (the tiny preset's frozen backbone), EfficientNet-Lite input
   normalisation (x*255 - 127.5) / 128, spatially mean-pooled. ``feature="block15"`` (default) pools the
   320-d output of the last MBConv block; ``feature="head"`` pools the 1280-d head feature map. block15 was
   kept: same ceiling on clean and blurred scenes, +2 points top-1 under JPEG (see below).
4. **Templates**: every emoji of the pool rendered by `seedtok.data.emoji.render` on the detected colour at
   `TEMPLATE_SCALE` (0.7), centred, once sharp and once Gaussian-blurred (sigma 1, on the 64 px scene), both
   through the same crop path; a template is the normalised mean of the two normalised features. An emoji's
   score is the cosine (no mean-centring) between the image's feature and its template. Banks are built per
   colour, only for the colours met, batched, kept in memory and optionally in ``cache_dir`` (safetensors;
   both features stored, so switching feature never rebuilds). One bank is 2 x 1,142 forwards: ~30 s on one
   CPU thread.

Measured on EmojiWorld("test", seed=0)[0:500], all 11 colours (identity top-1 / top-5, background accuracy):

    =================  ==================  ==================
    input              block15 (default)   head
    =================  ==================  ==================
    clean              99.8 / 100, 100     100.0 / 100, 100
    Gaussian blur r=1  99.4 / 100, 100      99.4 / 100, 100
    JPEG quality 50    95.8 / 99.6, 100     93.8 / 98.8, 100
    =================  ==================  ==================

Most remaining errors are near-mirror or near-identical pairs (waxing / waning moon, leftwards / rightwards
pushing hand, file folder / open file folder, woman / person): mean pooling is almost mirror-invariant.
Scoring costs ~10-13 ms per image on one CPU thread once the colour's bank exists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..data.emoji import CANVAS, CHANNEL_DIFF, PALETTE, pool, render
from ..data.transforms import load_image

__all__ = ["DENOISE_NOISE", "FEATURES", "FILL", "INPUT_SIZE", "TEMPLATE_BLUR", "TEMPLATE_SCALE", "EmojiScorer",
           "ScoreResult", "detect_background", "normalize_scene", "template_scene"]

FEATURES = ("block15", "head")
INPUT_SIZE = 128  # EfficientNet-Lite0 input, as in the tiny preset
FILL = 0.8  # the crop's long side, as a fraction of the input
TEMPLATE_SCALE = 0.7  # templates: emoji size / canvas (the world draws 0.5-0.9)
TEMPLATE_BLUR = 1.0  # sigma of the blurred template render, in 64 px scene pixels
BATCH = 64
DENOISE_NOISE = 4.0  # border noise (channel deviation, 90th percentile) above which inputs are median-filtered
_CACHE_VERSION = "1"
_NAMES = tuple(PALETTE)
_COLOURS = np.asarray(list(PALETTE.values()), dtype=np.int32)  # [11, 3]
_MEAN = 0.5
_STD = 128 / 255


# ------------------------------------------------------------------------------------------------ image side
def _rgb_array(image) -> np.ndarray:
    return np.asarray(load_image(image), dtype=np.uint8)


def _border(array: np.ndarray) -> np.ndarray:
    """The outer ring of pixels ([K, 3]), one pixel wide (two for images of 128 px and more)."""
    h, w = array.shape[:2]
    width = 2 if min(h, w) >= 128 else 1
    if min(h, w) <= 2 * width:
        return array.reshape(-1, 3)
    inner = array[width:-width]
    return np.concatenate([array[:width].reshape(-1, 3), array[-width:].reshape(-1, 3),
                           inner[:, :width].reshape(-1, 3), inner[:, -width:].reshape(-1, 3)])


def _background(array: np.ndarray) -> tuple[str, np.ndarray, float]:
    """(palette name, reference colour [3] int, border noise): the border's majority palette colour, the
    median of the border pixels that voted for it, and the 90th percentile of their channel deviation."""
    border = _border(array).astype(np.int32)
    dist = ((border[:, None, :] - _COLOURS[None]) ** 2).sum(-1)  # [K, 11]
    votes = dist.argmin(1)
    winner = int(np.bincount(votes, minlength=len(_NAMES)).argmax())
    members = border[votes == winner]
    reference = np.median(members, axis=0).round().astype(np.int32)
    noise = float(np.percentile(np.abs(members - reference).max(-1), 90))
    return _NAMES[winner], reference, noise


def detect_background(image) -> str:
    """The `PALETTE` name of an image's background: the most common nearest-palette colour of its border."""
    return _background(_rgb_array(image))[0]


def _box(array: np.ndarray, reference: np.ndarray, noise: float) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the pixels that differ from ``reference`` by more than the threshold in
    some channel, ignoring pixels with no such 4-neighbour; None when degenerate."""
    h, w = array.shape[:2]
    threshold = max(float(CHANNEL_DIFF), noise + CHANNEL_DIFF / 2)
    mask = np.abs(array.astype(np.int32) - reference).max(-1) > threshold
    neighbour = np.zeros_like(mask)
    neighbour[1:] |= mask[:-1]
    neighbour[:-1] |= mask[1:]
    neighbour[:, 1:] |= mask[:, :-1]
    neighbour[:, :-1] |= mask[:, 1:]
    mask &= neighbour
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return None
    left, top, right, bottom = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    if max(right - left, bottom - top) < max(3, min(h, w) // 16):  # a speck: not an emoji
        return None
    return left, top, right, bottom


def _normalize(image: Image.Image, array: np.ndarray, reference: np.ndarray, noise: float) -> Image.Image:
    box = _box(array, reference, noise)
    if box is None:
        box = (0, 0, array.shape[1], array.shape[0])
    crop = image.crop(box)
    w, h = crop.size
    size = INPUT_SIZE
    side = FILL * size
    scale = side / max(w, h)
    new = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    crop = crop.resize(new, Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), tuple(int(c) for c in reference))
    canvas.paste(crop, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def _prepare(image: Image.Image, denoise: bool = True) -> tuple[str, Image.Image]:
    """(detected background, the scorer's 128 px view of the image)."""
    array = np.asarray(image, dtype=np.uint8)
    name, reference, noise = _background(array)
    if denoise and noise > DENOISE_NOISE:  # JPEG-like noise: a 3x3 median removes ringing and blocking
        image = image.filter(ImageFilter.MedianFilter(3))
        array = np.asarray(image, dtype=np.uint8)
        _, reference, noise = _background(array)
    return name, _normalize(image, array, reference, noise)


def normalize_scene(image, background: str | None = None, denoise: bool = True) -> Image.Image:
    """The scorer's view of a scene (128 px): the emoji cropped, recentred, its long side scaled to `FILL`
    of the square, padded with the background. ``background`` (a palette name) skips detection and uses the
    exact palette colour (templates); otherwise the border decides (`detect_background`), and a noisy border
    (90th-percentile deviation over `DENOISE_NOISE`) first gets a 3x3 median filter."""
    image = load_image(image)
    if background is None:
        return _prepare(image, denoise)[1]
    return _normalize(image, np.asarray(image, dtype=np.uint8), np.asarray(PALETTE[background], dtype=np.int32),
                      0.0)


def template_scene(emoji_index: int, background: str, blur: bool = False, scale: float | None = None
                   ) -> Image.Image:
    """A template's 64 px scene: `render` of the emoji on ``background`` at ``scale``, centred (optionally
    Gaussian-blurred with sigma `TEMPLATE_BLUR`). The template image is ``normalize_scene`` of it."""
    scale = TEMPLATE_SCALE if scale is None else scale
    size = int(round(scale * CANVAS))
    offset = (CANVAS - size) // 2
    scene = render(emoji_index, background, scale, offset, offset)
    if blur:
        scene = scene.filter(ImageFilter.GaussianBlur(TEMPLATE_BLUR))
    return scene


def _pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """128 px RGB PIL images -> EfficientNet-Lite input [B, 3, 128, 128]: (x*255 - 127.5) / 128."""
    arrays = []
    for im in images:
        if im.size != (INPUT_SIZE, INPUT_SIZE):
            im = im.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    return x.sub_(_MEAN).div_(_STD)


# ------------------------------------------------------------------------------------------------ result
@dataclass
class ScoreResult:
    """Per image: ``backgrounds`` (detected palette name), ``top5`` ([N, 5] emoji indices, best first) and
    ``top5_cosine`` ([N, 5]). With truth: ``identity_top1``, ``identity_top5``, ``background_acc`` in percent
    (``background_acc`` is None when the truth has no "background"), and per-image ``correct`` (top-1)."""

    backgrounds: list[str]
    top5: torch.Tensor
    top5_cosine: torch.Tensor
    identity_top1: float | None = None
    identity_top5: float | None = None
    background_acc: float | None = None
    correct: list[bool] | None = None
    seconds: float = 0.0  # wall time of `score`, template building included
    template_seconds: float = 0.0  # the part spent building template banks

    @property
    def predictions(self) -> list[int]:
        return self.top5[:, 0].tolist()

    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in (("identity_top1", self.identity_top1), ("identity_top5", self.identity_top5),
                                  ("background_acc", self.background_acc)) if v is not None}


# ------------------------------------------------------------------------------------------------ scorer
class EmojiScorer:
    """Identity and background of emoji-world scenes, by template matching on frozen EfficientNet-Lite0.

    >>> scorer = EmojiScorer(cache_dir="~/.cache/seedtok/emoji-templates")
    >>> result = scorer.score([s.image for s in samples], [s.meta for s in samples])
    >>> result.identity_top1, result.background_acc, result.top5[0]
    >>> scorer.embed_cosine(originals, reconstructions)   # mean cosine of un-cropped pooled features

    ``encoder``: an existing `EfficientNetLite0` (or its ``.model``) to share instead of loading one; it is
    used as is (put in eval mode, frozen, moved to ``device``). Cached banks are keyed by the template settings
    and the pool size, not by the weights: use a fresh ``cache_dir`` for other weights.
    """

    def __init__(self, device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                 feature: str = "block15", encoder=None, batch_size: int = BATCH,
                 template_scale: float = TEMPLATE_SCALE, denoise: bool = True):
        if feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r}; choose one of {', '.join(FEATURES)}")
        if encoder is None:
            from ..config import preset
            from ..models.vision import EfficientNetLite0

            encoder = EfficientNetLite0(preset("tiny").vision)
        self.model = getattr(encoder, "model", encoder).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.feature = feature
        self.batch_size = int(batch_size)
        self.template_scale = float(template_scale)
        self.denoise = bool(denoise)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._banks: dict[str, dict[str, torch.Tensor]] = {}
        self.template_seconds = 0.0

    # -------------------------------------------------------------------------------------------- features
    @torch.inference_mode()
    def _forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 3, 128, 128] -> {"block15": [B, 320], "head": [B, 1280]} spatially mean-pooled, unnormalised."""
        m = self.model
        dtype = m._conv_stem.weight.dtype
        x = pixels.to(self.device, dtype).contiguous(memory_format=torch.channels_last)
        x = m._swish(m._bn0(m._conv_stem(x)))
        for block in m._blocks:  # eval mode: no drop-connect
            x = block(x)
        block15 = x.float().mean(dim=(2, 3))
        head = m._swish(m._bn1(m._conv_head(x))).float().mean(dim=(2, 3))
        return {"block15": block15.cpu(), "head": head.cpu()}

    def _features(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """128 px images -> both pooled features, L2-normalised, batched."""
        out: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURES}
        for start in range(0, len(images), self.batch_size):
            feats = self._forward(_pixels(images[start:start + self.batch_size]))
            for k in FEATURES:
                out[k].append(torch.nn.functional.normalize(feats[k], dim=-1))
        return {k: torch.cat(v) if v else torch.zeros(0, 320 if k == "block15" else 1280) for k, v in out.items()}

    def pooled_features(self, images: Iterable, feature: str | None = None) -> torch.Tensor:
        """[N, D] L2-normalised pooled features of whole images (no crop: resized to 128 px, bicubic)."""
        feature = feature or self.feature
        pil = [load_image(im).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC) for im in images]
        return self._features(pil)[feature]

    def embed_cosine(self, originals: Iterable, reconstructions: Iterable, feature: str | None = None) -> float:
        """Mean cosine between the pooled features of each original and its reconstruction (the paper's
        CLIP similarity, with EfficientNet-Lite0 standing in for CLIP)."""
        a = self.pooled_features(list(originals), feature)
        b = self.pooled_features(list(reconstructions), feature)
        if a.shape != b.shape:
            raise ValueError(f"{a.shape[0]} originals but {b.shape[0]} reconstructions")
        return float((a * b).sum(-1).mean()) if len(a) else float("nan")

    # -------------------------------------------------------------------------------------------- templates
    def _cache_path(self, background: str) -> Path | None:
        if self.cache_dir is None:
            return None
        tag = (f"s{self.template_scale:g}-b{TEMPLATE_BLUR:g}-f{FILL:g}-i{INPUT_SIZE}-n{len(pool())}"
               f"-v{_CACHE_VERSION}")
        return self.cache_dir / f"emoji-templates-{background}-{tag}.safetensors"

    def templates(self, background: str) -> torch.Tensor:
        """[len(pool), D] normalised templates of every emoji on ``background`` for this scorer's feature."""
        return self._bank(background)[self.feature]

    def _bank(self, background: str) -> dict[str, torch.Tensor]:
        if background not in PALETTE:
            raise ValueError(f"unknown background {background!r}; choose one of {', '.join(PALETTE)}")
        if background in self._banks:
            return self._banks[background]
        path = self._cache_path(background)
        bank = None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            try:
                loaded = load_file(str(path))
                if all(k in loaded and loaded[k].shape[0] == len(pool()) for k in FEATURES):
                    bank = {k: loaded[k] for k in FEATURES}
            except Exception:  # a corrupt or partial cache file is rebuilt
                bank = None
        if bank is None:
            bank = self._build(background)
            if path is not None:
                from safetensors.torch import save_file

                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({k: v.contiguous() for k, v in bank.items()}, str(tmp),
                          metadata={"background": background, "pool": str(len(pool()))})
                tmp.replace(path)
        self._banks[background] = bank
        return bank

    def _build(self, background: str) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        n = len(pool())
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURES}
        chunk = max(1, self.batch_size // 2)
        for lo in range(0, n, chunk):
            ids = range(lo, min(n, lo + chunk))
            images = [normalize_scene(template_scene(e, background, blur, self.template_scale), background)
                      for e in ids for blur in (False, True)]
            feats = self._features(images)
            for k in FEATURES:
                pair = feats[k].view(len(ids), 2, -1).mean(1)  # mean of the sharp and blurred normalised features
                parts[k].append(torch.nn.functional.normalize(pair, dim=-1))
        self.template_seconds += time.perf_counter() - start
        return {k: torch.cat(v) for k, v in parts.items()}

    # -------------------------------------------------------------------------------------------- scoring
    def score(self, images: Iterable, truth: Sequence[dict] | None = None) -> ScoreResult:
        """Score images as emoji-world scenes. ``truth``: one meta dict per image with "emoji_index" (and
        optionally "background"), as `EmojiWorld` gives; metrics are in percent."""
        start = time.perf_counter()
        built_before = self.template_seconds
        pil = [load_image(im) for im in images]
        if truth is not None and len(truth) != len(pil):
            raise ValueError(f"{len(pil)} images but {len(truth)} truth entries")
        backgrounds, crops = [], []
        for im in pil:
            name, crop = _prepare(im, self.denoise)
            backgrounds.append(name)
            crops.append(crop)
        feats = self._features(crops)[self.feature]
        top5 = torch.zeros(len(pil), 5, dtype=torch.long)
        top5_cos = torch.zeros(len(pil), 5)
        for name in sorted(set(backgrounds)):
            rows = [i for i, b in enumerate(backgrounds) if b == name]
            sims = feats[rows] @ self.templates(name).t()
            values, indices = sims.topk(5, dim=-1)
            top5[rows], top5_cos[rows] = indices, values
        result = ScoreResult(backgrounds=backgrounds, top5=top5, top5_cosine=top5_cos)
        if truth is not None and len(pil):
            target = torch.tensor([int(t["emoji_index"]) for t in truth])
            hit1 = top5[:, 0] == target
            result.correct = hit1.tolist()
            result.identity_top1 = 100.0 * hit1.float().mean().item()
            result.identity_top5 = 100.0 * (top5 == target[:, None]).any(1).float().mean().item()
            if all("background" in t for t in truth):
                result.background_acc = 100.0 * float(np.mean([b == t["background"]
                                                                for b, t in zip(backgrounds, truth)]))
        result.seconds = time.perf_counter() - start
        result.template_seconds = self.template_seconds - built_before
        return result
