"""Training data for the tokenizer stages: samples -> batches of tensors.

With ``cache_features`` the frozen image backbone runs once per image and its output is kept (in memory and
in a safetensors file beside the run, reused by later stages and resumed runs); stage 2 also caches the
frozen Q-Former's causal embeddings. Without it, batches carry preprocessed pixels (and, with ``augment``,
SPEC §3's RandomResizedCrop(scale 0.5-1, bicubic) + horizontal flip, seeded by (seed, sample index, step) so
resuming replays the same crops).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.sources import Sample
from ..data.transforms import preprocess
from ..errors import ConfigError
from ..models.tokenizer import SeedTokenizer


def _cache_key(model: SeedTokenizer, data_spec: str, what: str, extra: str = "") -> str:
    payload = json.dumps({"vision": model.config.vision.__dict__, "size": model.config.image_size,
                          "mean": model.config.image_mean, "std": model.config.image_std,
                          "data": data_spec, "what": what, "extra": extra,
                          "backbone_mode": "eval"},  # caches from a training-mode backbone are stale
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _weights_digest(*modules: torch.nn.Module) -> str:
    """A digest of the modules' weights, fed tensor by tensor (no copy of the whole model in memory)."""
    digest = hashlib.sha256()
    for module in modules:
        for value in module.state_dict().values():
            digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _load_or_compute(path: Path, compute) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    if path.is_file():
        return load_file(str(path))
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return tensors


def random_resized_crop(image: Image.Image, rng: np.random.Generator, size: int,
                        scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """RandomResizedCrop as torchvision defines it (10 tries, then a centre crop), bicubic, plus a 50% flip."""
    width, height = image.size
    area = width * height
    box = None
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            box = (x, y, x + w, y + h)
            break
    if box is None:
        side = min(width, height)
        box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


class TokenizerData:
    """``len`` + ``batch(indices, step)`` over a list of Samples, for stage 1 (text) or 2 (teacher).

    ``captions`` (stage 2): also the frozen Q-Former's text features of every distinct caption
    (``caption_bank`` [captions, D], cached beside the features) and, per batch, each sample's row in it
    (``caption``), for stage 2's caption loss."""

    def __init__(self, model: SeedTokenizer, samples: Sequence[Sample], stage: int, data_spec: str,
                 cache_dir: str | os.PathLike | None = None, cache_features: bool = False, augment: bool = False,
                 seed: int = 0, progress: bool = True, captions: bool = False):
        self.model, self.samples, self.stage = model, samples, stage
        self.augment, self.seed, self.progress = augment and not cache_features, seed, progress
        cfg = model.config
        self.features: torch.Tensor | None = None
        self.causal: torch.Tensor | None = None
        if stage == 1:
            tokenizer = model.text_tokenizer()
            encoded = tokenizer([s.caption for s in samples], truncation=True,
                                max_length=cfg.qformer.max_text_length)
            self.token_ids = [torch.tensor(ids) for ids in encoded["input_ids"]]
        if cache_features:
            cache_dir = Path(cache_dir or ".")
            key = _cache_key(model, data_spec, "features")
            self.features = _load_or_compute(cache_dir / f"features-{key}.safetensors",
                                              lambda: {"features": self._compute_features()})["features"]
            if stage == 2:  # the Q-Former is frozen in stage 2: its outputs are fixed per image
                key2 = _cache_key(model, data_spec, "causal", _weights_digest(model.vision.ln_vision, model.qformer))
                self.causal = _load_or_compute(cache_dir / f"causal-{key2}.safetensors",
                                               lambda: {"causal": self._compute_causal()})["causal"]
        self.caption_bank: torch.Tensor | None = None
        self.caption_index: torch.Tensor | None = None
        if captions and stage == 2:
            unique = {c: i for i, c in enumerate(dict.fromkeys(s.caption for s in samples))}
            self.caption_index = torch.tensor([unique[s.caption] for s in samples])
            if cache_features:
                key3 = _cache_key(model, data_spec, "captions", _weights_digest(model.qformer))
                self.caption_bank = _load_or_compute(cache_dir / f"captions-{key3}.safetensors",
                                                     lambda: {"text": self._compute_text(list(unique))})["text"]
            else:
                self.caption_bank = self._compute_text(list(unique))

    def __len__(self) -> int:
        return len(self.samples)

    # ------------------------------------------------------------------------------------------ caches
    def _chunks(self, desc: str, size: int = 64):
        starts = range(0, len(self.samples), size)
        if self.progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc=desc, unit="batch")
        for start in starts:
            yield start, range(start, min(start + size, len(self.samples)))

    @torch.inference_mode()
    def _compute_features(self) -> torch.Tensor:
        out = []
        for _, idx in self._chunks("cache image features"):
            out.append(self.model.vision.features(self._pixels(idx, step=0)).to(torch.float16))
        return torch.cat(out)

    @torch.inference_mode()
    def _compute_causal(self) -> torch.Tensor:
        out = []
        for start, idx in self._chunks("cache causal embeddings"):
            feats = self.features[start:start + len(idx)].to(self.model.dtype)
            out.append(self.model.qformer(self.model.vision.normalize(feats)).to(torch.float16))
        return torch.cat(out)

    def _compute_text(self, captions: list[str]) -> torch.Tensor:
        qformer = self.model.qformer
        was_training = qformer.training
        qformer.eval()  # the frozen stage-2 Q-Former's features, without dropout
        try:
            return self.model.caption_features(captions, progress=self.progress).cpu()
        finally:
            qformer.train(was_training)

    # ------------------------------------------------------------------------------------------ batches
    def _pixels(self, indices, step: int) -> torch.Tensor:
        cfg = self.model.config
        images = [self.samples[i].image for i in indices]
        if self.augment:
            images = [random_resized_crop(im, np.random.default_rng([self.seed, i, step]), cfg.image_size)
                      for im, i in zip(images, indices)]
        return preprocess(images, cfg.image_size, cfg.image_mean, cfg.image_std, cfg.resample)

    def batch(self, indices: list[int], step: int = 0) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        if self.causal is not None:
            batch["causal"] = self.causal[indices].float()
        if self.features is not None:
            batch["features"] = self.features[indices].float()
        if self.features is None and self.causal is None:
            batch["pixels"] = self._pixels(indices, step)
        if self.stage == 1:
            ids = [self.token_ids[i] for i in indices]
            length = max(len(t) for t in ids)
            batch["input_ids"] = torch.zeros(len(ids), length, dtype=torch.long)
            batch["attention_mask"] = torch.zeros(len(ids), length, dtype=torch.long)
            for row, t in enumerate(ids):
                batch["input_ids"][row, :len(t)] = t
                batch["attention_mask"][row, :len(t)] = 1
        else:
            batch["teacher"] = self.teacher(batch)
            if self.caption_index is not None:
                batch["caption"] = self.caption_index[indices]
        return batch

    @torch.no_grad()  # not inference_mode: the statistics enter the autograd graph of the loss
    def teacher_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std (floored at 1e-3) of the generation teacher over the whole training set,
        from the feature cache (stage 2's ``generation_loss="standardized"``)."""
        if self.features is None:
            raise ConfigError("standardising the generation teacher needs cached data (cache_features), not a "
                              "stream")
        teachers = torch.cat([self.teacher({"features": self.features[start:start + len(idx)].float()})
                              for start, idx in self._chunks("teacher statistics", 2048)])
        return teachers.mean(0), teachers.std(0).clamp(min=1e-3)

    def teacher(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The generation-embedding target. ``vision_pooled`` (tiny): the frozen backbone's pooled feature(s)
        (`VisionEncoder.pooled_teacher`, before ln_vision) -- our stand-in for the unCLIP image embedding."""
        kind = self.model.config.detokenizer.teacher
        if kind != "vision_pooled":
            raise NotImplementedError(f"generation teacher {kind!r} needs its own model; not available offline")
        if "features" in batch:
            return self.model.vision.pooled_teacher(batch["features"])
        with torch.no_grad():
            vision = self.model.vision
            return vision.pooled_teacher(vision.features(batch["pixels"]))


class StreamingTokenizerData:
    """Tokenizer-stage batches streamed from tar shards (`seedtok.data.stream.ShardStream`), for data that does
    not fit in memory. The Trainer calls ``stream(batch_size, rank, world_size, seed, start)`` instead of
    ``batch(indices, step)``; resume is approximate (see `seedtok.data.stream`). Pixels only: caching features
    would need the whole set first."""

    def __init__(self, model: SeedTokenizer, urls: str, stage: int, augment: bool = False, shuffle_buffer: int = 1000,
                 resampled: bool = True, num_workers: int = 0):
        self.model, self.urls, self.stage, self.augment = model, urls, stage, augment
        self.shuffle_buffer, self.resampled, self.num_workers = shuffle_buffer, resampled, num_workers
        self.text_tokenizer = model.text_tokenizer() if stage == 1 else None
        kind = model.config.detokenizer.teacher
        if stage == 2 and kind != "vision_pooled":
            raise NotImplementedError(f"generation teacher {kind!r} needs its own model; not available offline")

    def collate(self, samples: list[Sample], seed: int = 0) -> dict[str, torch.Tensor]:
        """Samples -> pixels (+ text ids for stage 1). Runs in the DataLoader workers. Augmentation draws are
        seeded by (seed, the sample's key): reproducible per sample, independent of worker and rank."""
        cfg = self.model.config
        images = [s.image for s in samples]
        if self.augment:
            images = [random_resized_crop(im, np.random.default_rng(
                [seed, int(hashlib.sha256(str(s.meta.get("key", "")).encode()).hexdigest()[:12], 16)]),
                cfg.image_size) for im, s in zip(images, samples)]
        batch = {"pixels": preprocess(images, cfg.image_size, cfg.image_mean, cfg.image_std, cfg.resample)}
        if self.stage == 1:
            encoded = self.text_tokenizer([s.caption for s in samples], truncation=True, padding=True,
                                          max_length=cfg.qformer.max_text_length, return_tensors="pt")
            batch["input_ids"], batch["attention_mask"] = encoded["input_ids"], encoded["attention_mask"]
        return batch

    def stream(self, batch_size: int, rank: int, world_size: int, seed: int, start: int = 0):
        from functools import partial

        from ..data.stream import ShardStream, loader

        shards = ShardStream(self.urls, partial(self.collate, seed=seed), batch_size, rank=rank,
                             world_size=world_size, seed=seed, shuffle_buffer=self.shuffle_buffer,
                             resampled=self.resampled, start=start)
        # stage 2's teacher is computed by the task on the training device (Stage2.loss), not in the workers
        yield from loader(shards, self.num_workers)
