"""Training recipes: the hyper-parameters of each stage for each preset.

Paper presets follow SPEC §3. The tiny preset's numbers were chosen to fit the 2-core CPU budget (full
training of both stages in at most 90 minutes; ``quick`` in at most 10), see the README for measurements.
"""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .loop import TrainConfig

_PAPER = {
    # stage 1: lr 3e-5 cosine to 3e-6, 2000 warm-up steps from 3e-7, 10 epochs of CC3M+Unsplash+COCO (5M pairs)
    # at 64 per GPU x 64 GPUs; augmentation RandomResizedCrop(0.5-1) + flip. `steps` is for the full 5M set.
    1: TrainConfig(steps=12_200, batch_size=64, lr=3e-5, min_lr=3e-6, warmup_steps=2000, warmup_start_lr=3e-7,
                   weight_decay=0.05, betas=(0.9, 0.999), grad_clip=None, augment=True, data="shards/{00000..00499}.tar",
                   checkpoint_every=1000, log_every=50),
    # stage 2: lr 1e-4 cosine to 1e-5, 2000 warm-up steps, weight decay 0.05, batch 256 per GPU
    2: TrainConfig(steps=20_000, batch_size=256, lr=1e-4, min_lr=1e-5, warmup_steps=2000, weight_decay=0.05,
                   grad_clip=None, data="shards/{00000..00499}.tar", checkpoint_every=1000, log_every=50),
}

_TINY = {
    # lr 5e-4: at 300 steps it matched what 1e-4 reached at 1000 steps (same data)
    1: TrainConfig(steps=300, batch_size=128, lr=5e-4, min_lr=5e-5, warmup_steps=30, weight_decay=0.05,
                   grad_clip=1.0, data="emoji:train:24000", cache_features=True, checkpoint_every=100,
                   log_every=10),
    # stage 2: 1200 steps, with the three named loss additions (seedtok.train.tokenizer). On cached embeddings
    # with position rotation, code retrieval R@1 I->T / T->I: 51.0 / 62.3 without them after 200 steps; with
    # all three 74.8 / 78.0 after 200 steps and 80.9 / 83.7 after 600 (runs/exp/s2.py, not shipped)
    2: TrainConfig(steps=1200, batch_size=128, lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.05,
                   grad_clip=1.0, data="emoji:train:24000", cache_features=True, checkpoint_every=200,
                   log_every=20, retrieval_weight=1.0, last_query_weight=2.0, caption_weight=1.0),
}
# `--generation-only`: the generation branch alone, on a finished stage-2 model (codes frozen, ids unchanged),
# with the standardised MSE + contrastive objective (seedtok.train.tokenizer). From the cached codes of the
# 24,000 training scenes, test-scene retrieval of the teacher by the generation embedding (R@1 of 1,000) went
# from 41.7 (the paper's MSE, trained with the codebook) to 75.6 after 800 steps, 79.0 after 1,200 and 79.6
# after 2,000 (runs/exp7/gen_exp.py, not shipped)
_TINY_GENERATION = TrainConfig(steps=1200, batch_size=256, lr=1e-3, min_lr=1e-4, warmup_steps=50, weight_decay=0.01,
                               grad_clip=1.0, data="emoji:train:24000", cache_features=True, checkpoint_every=200,
                               log_every=20, generation_loss="standardized", generation_contrastive_weight=1.0,
                               train_parts="generation")
_TINY_QUICK = {
    1: dict(steps=150, data="emoji:train:4000"),
    2: dict(steps=150, data="emoji:train:4000"),
}

_MICRO = {
    1: TrainConfig(steps=8, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=2, data="emoji:train:64",
                   checkpoint_every=4, log_every=1),
    # with tiny's loss additions, so the micro tests (resume, CLI) run them too
    2: TrainConfig(steps=8, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=2, data="emoji:train:64",
                   checkpoint_every=4, log_every=1, retrieval_weight=1.0, last_query_weight=2.0, caption_weight=1.0),
}


# The tiny image decoder (seedtok.train.decoder). Mixed precision "auto": bf16 autocast on a CPU with AMX is ~3x
# faster than fp32 (a UNet step at batch 32, one thread: 3.0 s vs 10 s), on one without bf16 units ~20x slower
# (a step at 2 threads: 66 s vs 3 s). Batches of 256 train the coarse head; their first 48
# (TinyDecoderConfig.unet_batch) train the UNet, the cost of a step. The data is the tokenizer's (its feature
# cache is reused for the teacher embeddings). The coarse head (MLP and prototypes) learns at 1.6x the UNet's lr
# (~1e-3, the rate the prototype head was screened at).
_DECODER = {
    "tiny": TrainConfig(steps=1500, batch_size=256, lr=6e-4, min_lr=1e-5, warmup_steps=100, weight_decay=0.01,
                        grad_clip=1.0, data="emoji:train:24000", mixed_precision="auto", checkpoint_every=100,
                        log_every=10, lr_scales={"coarse.": 1.6}),
    "micro": TrainConfig(steps=4, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.0,
                         data="emoji:train:16", checkpoint_every=2, log_every=1),
}
_DECODER_QUICK = {"tiny": dict(steps=200, warmup_steps=20, data="emoji:train:4000")}


def decoder_recipe(preset_name: str, quick: bool = False) -> TrainConfig:
    """The image decoder's training recipe for a preset that has one (tiny, micro)."""
    if preset_name not in _DECODER:
        raise ConfigError(f"no image decoder recipe for preset {preset_name!r} (only {', '.join(_DECODER)}); "
                          f"seed1/seed2 decode with Stable Diffusion")
    cfg = _DECODER[preset_name]
    if quick:
        cfg = dataclasses.replace(cfg, **_DECODER_QUICK.get(preset_name, {}))
    return dataclasses.replace(cfg)


def recipe(preset_name: str, stage: int, quick: bool = False, generation_only: bool = False) -> TrainConfig:
    """A preset's recipe for tokenizer stage 1 or 2; ``generation_only``: stage 2's generation branch alone
    (tiny: its own recipe; other presets: their stage-2 recipe restricted to that branch)."""
    if stage not in (1, 2):
        raise ConfigError(f"tokenizer stage must be 1 or 2, got {stage}")
    if generation_only and stage != 2:
        raise ConfigError("--generation-only retrains stage 2's generation branch: use it with --stage 2")
    if generation_only and preset_name == "tiny":
        cfg = _TINY_GENERATION
        if quick:
            cfg = dataclasses.replace(cfg, **_TINY_QUICK[2])
        return dataclasses.replace(cfg)
    if generation_only:
        return dataclasses.replace(recipe(preset_name, stage, quick), train_parts="generation")
    if preset_name in ("seed1", "seed2"):
        cfg = _PAPER[stage]
    elif preset_name == "tiny":
        cfg = _TINY[stage]
        if quick:
            cfg = dataclasses.replace(cfg, **_TINY_QUICK[stage])
    elif preset_name.startswith("micro"):
        cfg = _MICRO[stage]
    else:
        raise ConfigError(f"no training recipe for preset {preset_name!r}; give a config file with a 'train' section")
    return dataclasses.replace(cfg)
