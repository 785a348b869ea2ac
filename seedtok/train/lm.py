"""LM training (stage 3, SPEC §3) as a Task on the shared loop.

Data: image ids extracted once (`seedtok.data.ids`, ``seedtok extract-ids``), never pixels. Each drawn sample
becomes, by a draw seeded from (seed, index, step) so resumed runs replay it:
- with probability ``LMConfig.instruct_fraction`` and when the sample is an emoji-world scene, an instruction
  sample (a generated question about it, `seedtok.data.questions`): loss on the answer only;
- otherwise a pre-training sample, image -> caption with probability ``LMConfig.image_first_fraction`` (SPEC:
  50/50), else caption -> image: loss on every non-pad token (``label_leading_image=False``: not on the image
  tokens of image -> caption samples).

Trains the LoRA adapter and the new token rows (`SeedLM.trainable_named_parameters`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..config import LM_PRESETS, LMConfig, lm_preset
from ..data.ids import IdsDataset, load_ids
from ..data.questions import KINDS, emoji_question
from ..errors import ConfigError
from .loop import TrainConfig, TrainResult, Trainer, latest_checkpoint, read_run_file, with_overrides

# Recipes. SEED-LLaMA's optimiser (SPEC §3): AdamW (0.9, 0.95), lr 1.5e-4 cosine, weight decay 0.05. The tiny
# preset's step count fits the 2-core CPU budget (README: measured step time).
LM_RECIPES = {
    "seed-llama": TrainConfig(steps=20_000, batch_size=32, lr=1.5e-4, min_lr=1.5e-5, warmup_steps=500,
                              weight_decay=0.05, betas=(0.9, 0.95), grad_clip=1.0, data="lm-ids/train",
                              checkpoint_every=1000, log_every=50),
    # 600 steps of 16 (~45 tokens each; 9,600 samples from the 10,000 extracted scenes): ~8-10 s/step on this
    # 2-core CPU. Steps 361-600 moved little (200 test scenes: caption colour 62.5% -> 63.0%, VQA 38.3% ->
    # 39.2%, text perplexity 69.5 -> 71.5). The LoRA weights learn at 0.2x the lr of the new rows
    # (``lr_scales``): at step 180 that kept the held-out text perplexity at 54.2 against 77.7 at 1x, with
    # reading about the same (forced-choice background colour 52.3% vs 56.8%; runs/exp8, not shipped).
    # fp32: bf16 autocast was only ~15% faster per forward+backward here (runs/exp/lmspeed.py)
    "tiny": TrainConfig(steps=600, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=30,
                        weight_decay=0.0, betas=(0.9, 0.95), grad_clip=1.0, data="runs/lm-ids/emoji-train-10000",
                        checkpoint_every=60, log_every=10, lr_scales={"lora_": 0.2}),
    "micro": TrainConfig(steps=6, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.0,
                         betas=(0.9, 0.95), data="", checkpoint_every=3, keep_checkpoints=2, log_every=1,
                         mixed_precision="no"),
}
_QUICK = {"tiny": dict(steps=40, checkpoint_every=20)}


def lm_recipe(name: str, quick: bool = False) -> TrainConfig:
    if name not in LM_RECIPES:
        raise ConfigError(f"no LM training recipe {name!r}; choose one of {', '.join(LM_RECIPES)}")
    cfg = dataclasses.replace(LM_RECIPES[name])
    if quick:
        cfg = dataclasses.replace(cfg, **_QUICK.get(name, {}))
    return cfg


class LMData:
    """``len`` + ``batch(indices, step)`` over extracted ids, for the shared Trainer."""

    def __init__(self, lm, data: IdsDataset, seed: int = 0, max_length: int | None = None):
        if data.codebook_size and data.codebook_size != lm.config.codebook_size:
            raise ConfigError(f"the ids were extracted with a codebook of {data.codebook_size}, the LM expects "
                              f"{lm.config.codebook_size} (tokenizer {lm.config.tokenizer!r})")
        if data.ids.shape[1] != lm.num_image_tokens:
            raise ConfigError(f"the ids have {data.ids.shape[1]} tokens per image, the LM expects "
                              f"{lm.num_image_tokens}")
        self.lm, self.data, self.seed = lm, data, seed
        self.max_length = max_length
        cfg = lm.config
        for name in ("image_first_fraction", "instruct_fraction"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(cfg, name)}")

    def __len__(self) -> int:
        return len(self.data)

    def sequence(self, index: int, step: int) -> tuple[list[int], list[int]]:
        rng = np.random.default_rng([self.seed, index, step])
        ids, caption = self.data.ids[index], self.data.captions[index]
        meta = self.data.meta[index] if index < len(self.data.meta) else {}
        cfg = self.lm.config
        if rng.random() < cfg.instruct_fraction:
            qa = emoji_question(meta, KINDS[int(rng.integers(len(KINDS)))], rng)
            if qa is not None:
                return self.lm.instruction_sequence(ids, *qa)
        image_first = bool(rng.random() < cfg.image_first_fraction)
        return self.lm.caption_sequence(ids, caption, image_first,
                                        label_image=cfg.label_leading_image or not image_first)

    def batch(self, indices: list[int], step: int = 0) -> dict[str, torch.Tensor]:
        return self.lm.collate([self.sequence(i, step) for i in indices], self.max_length)


class LMTask:
    """Next-token loss (mean over labelled tokens) through the adapter. Its whole forward is ``model(...)``, so
    FSDP / DeepSpeed may wrap the model (``wraps_model``; configs/accelerate/)."""

    wraps_model = True

    def train_mode(self, model):
        model.train()

    def trainable_parameters(self, model):
        return model.trainable_named_parameters()

    def loss(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        tokens = int((batch["labels"] != -100).sum())
        return out.loss, {"tokens": tokens}


def load_lm_run_config(spec: str, quick: bool = False) -> tuple[LMConfig, TrainConfig]:
    """A preset name, or a JSON/YAML file with ``model`` (preset name or LMConfig dict) and ``train``."""
    if spec in LM_PRESETS:
        return lm_preset(spec), lm_recipe(spec, quick)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{spec!r} is neither an LM preset ({', '.join(LM_PRESETS)}) nor a config file")
    data = read_run_file(path, "LM preset name or config")
    model = data["model"]
    model_cfg = lm_preset(model) if isinstance(model, str) else LMConfig.from_dict(model)
    train = data.get("train", {})
    base = lm_recipe(model, quick) if isinstance(model, str) and model in LM_RECIPES else TrainConfig()
    return model_cfg, with_overrides(base, train)


def _row_init(config: LMConfig, ids: IdsDataset) -> dict:
    """`SeedLM.build`'s start for the code tokens' rows, as ``image_row_init`` asks: "mean" (transformers'
    resize), "codebook" (the image tokenizer's codebook), "captions" (the training captions of the images
    that use each code, the codebook for codes none uses)."""
    if config.image_row_init not in ("mean", "codebook", "captions"):
        raise ConfigError(f"unknown image_row_init {config.image_row_init!r}; choose mean, codebook or captions")
    if config.image_row_init == "mean":
        return {}
    from ..models.tokenizer import SeedTokenizer

    codebook = SeedTokenizer.from_pretrained(config.tokenizer).quantizer.embedding.weight.detach().float()
    if config.image_row_init == "codebook":
        return {"codebook": codebook}
    return {"codebook": codebook, "captioned_ids": (ids.ids, ids.captions)}


def train_lm(config: str | tuple[LMConfig, TrainConfig], data: str | Path | None = None, out: str | Path | None = None,
             quick: bool = False, resume: bool = False, steps: int | None = None, progress: bool = True,
             lm=None) -> TrainResult:
    """Train the adapter on extracted ids (``data``: an ids folder; default: the recipe's); the model is
    saved to ``OUT/final``. ``lm``: an already built SeedLM (tests)."""
    from ..models.lm import SeedLM

    model_cfg, train_cfg = config if isinstance(config, tuple) else load_lm_run_config(config, quick)
    if steps:
        train_cfg.steps = steps
    if data:
        train_cfg.data = str(data)
    if not train_cfg.data:
        raise ConfigError("no training data: give --data (a folder from `seedtok extract-ids`)")
    out = Path(out) if out else Path("runs") / f"lm-{model_cfg.name}{'-quick' if quick else ''}"
    if not resume and latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    ids = load_ids(train_cfg.data)  # fails early, before the LM is loaded
    model = lm if lm is not None else SeedLM.build(model_cfg, seed=train_cfg.seed, **_row_init(model_cfg, ids))
    if train_cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    dataset = LMData(model, ids, seed=train_cfg.seed, max_length=model_cfg.max_length)
    trainer = Trainer(train_cfg, model, LMTask(), dataset, out, progress=progress)
    if resume:
        trainer.resume()
    result = trainer.fit()
    model.eval()
    trainer.save_model(out / "final")
    return result
