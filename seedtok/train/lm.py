"""LM training (stage 3, SPEC §3) as a Task on the shared loop.

Data: image ids extracted once (`seedtok.data.ids`, ``seedtok extract-ids``), never pixels. Each drawn sample
becomes, by a draw seeded from (seed, index, step) so resumed runs replay it:
- with probability ``LMConfig.instruct_fraction`` and when the sample is an emoji-world scene, an instruction
  sample (a generated question about it, `seedtok.data.questions`): loss on the answer only;
- otherwise a pre-training sample, image -> caption with probability ``LMConfig.image_first_fraction`` (SPEC:
  50/50), else caption -> image: loss on every non-pad token (``label_leading_image=False``: not on the image
  tokens of image -> caption samples);
- drawn first, with probability ``LMConfig.text_replay_fraction`` (tiny: 0.2; SPEC: 0), a plain-English text
  that the base LM wrote itself (`replay_texts`, made once per run folder's cache): loss on every token.

Trains the LoRA adapter and the new token rows (`SeedLM.trainable_named_parameters`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..config import LM_PRESETS, LMConfig, lm_preset
from ..data.ids import IdsDataset, load_ids
from ..data.questions import KINDS, emoji_question
from ..errors import ConfigError
from ..fileio import atomic_write_text
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
    # reading about the same (forced-choice background colour 52.3% vs 56.8%; runs/exp8, not shipped). Those
    # runs had no text replay; 480 more steps with it (configs/tiny-lm-continue.yaml) took the perplexity
    # from 71.5 to 30.5 (base 34.9).
    # fp32: bf16 autocast was only ~15% faster per forward+backward here (runs/exp/lmspeed.py)
    "tiny": TrainConfig(steps=600, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=30,
                        weight_decay=0.0, betas=(0.9, 0.95), grad_clip=1.0, data="runs/lm-ids/emoji-train-10000",
                        checkpoint_every=60, log_every=10, lr_scales={"lora_": 0.2}),
    "micro": TrainConfig(steps=6, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.0,
                         betas=(0.9, 0.95), data="", checkpoint_every=3, keep_checkpoints=2, log_every=1,
                         mixed_precision="no"),
}
_QUICK = {"tiny": dict(steps=40, checkpoint_every=20)}
QUICK_REPLAY = 64  # replay texts of a --quick run


def lm_recipe(name: str, quick: bool = False) -> TrainConfig:
    if name not in LM_RECIPES:
        raise ConfigError(f"no LM training recipe {name!r}; choose one of {', '.join(LM_RECIPES)}")
    cfg = dataclasses.replace(LM_RECIPES[name])
    if quick:
        cfg = dataclasses.replace(cfg, **_QUICK.get(name, {}))
    return cfg


# Openings that the base LM continues into the text replay (written for this project; everyday subjects). The
# replay is these few words and the base LM's own continuation, so nothing of the held-out text
# (`seedtok.evaluate.lm`) enters it.
REPLAY_OPENINGS = (
    "The old bridge", "In the spring,", "My neighbour", "Every morning", "The museum", "When it started to rain,",
    "Scientists", "The recipe", "Our teacher", "On the island", "The small shop", "During the war,",
    "A healthy diet", "The football match", "Last summer", "The city council", "Most birds", "The storm",
    "In the kitchen,", "The company", "Learning a language", "The mountain village", "Her first job",
    "The farmer", "At night,", "The history of", "Many people believe", "The orchestra", "When I was young,",
    "The hospital", "A map of the town", "The desert", "Our holiday", "The election", "Good sleep",
    "The painter", "In the forest,", "The new road", "The price of coffee", "The school bus", "An old letter",
    "The harbour", "Winter in the north", "The young doctor", "The internet", "A quiet street", "The river",
    "The bakery", "Two friends", "The experiment", "The lighthouse", "Electric cars", "The library",
    "After dinner,", "The market", "The team", "A long journey", "The garden", "The weather today",
    "The castle", "The factory", "Children often", "The moon", "The village festival", "The science of",
)


def replay_texts(lm, count: int, seed: int = 0, max_new_tokens: int = 32, batch_size: int = 32,
                 progress: bool = True) -> list[str]:
    """``count`` plain-English texts that the base LM writes itself (adapter and new rows off): each of
    `REPLAY_OPENINGS` in turn, continued by sampling (temperature 1, top-p 0.95; row i of batch b with seed
    ``seed + b * batch_size + i``). Training on them beside the images keeps the LM's own distribution over
    plain text (``LMConfig.text_replay_fraction``). Short (~35 tokens) so that, under the token-mean loss, a
    replay sample weighs about as much as a caption sample."""
    from tqdm.auto import tqdm

    openings = [REPLAY_OPENINGS[i % len(REPLAY_OPENINGS)] for i in range(count)]
    texts: list[str] = []
    starts = range(0, count, batch_size)
    with torch.no_grad(), lm.adapter_disabled():
        for start in (tqdm(starts, desc="replay text", unit="batch") if progress else starts):
            batch = openings[start:start + batch_size]
            prompts = [lm.encode([(o, False)])[0] for o in batch]
            out = lm.generate_ids(prompts, max_new_tokens, "text", temperature=1.0, top_p=0.95, seed=seed + start)
            texts += [o + lm.tokenizer.decode([t for t in ids if t != lm.eos_id]) for o, ids in zip(batch, out)]
    return texts


def cached_replay_texts(lm, cache: Path, seed: int = 0, progress: bool = True) -> list[str]:
    """`replay_texts` for ``lm.config`` (``text_replay_size`` texts), made once and kept in ``cache`` as JSON
    (written atomically), keyed by the base LM, the count, the seed and the openings."""
    count = lm.config.text_replay_size
    key = hashlib.sha256(json.dumps([lm.config.base, count, seed, REPLAY_OPENINGS]).encode()).hexdigest()[:16]
    path = Path(cache) / f"replay-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    texts = replay_texts(lm, count, seed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(texts, indent=1))
    return texts


class LMData:
    """``len`` + ``batch(indices, step)`` over extracted ids, for the shared Trainer. ``replay``: the plain
    texts of the text replay (needed when ``text_replay_fraction`` > 0)."""

    def __init__(self, lm, data: IdsDataset, seed: int = 0, max_length: int | None = None,
                 replay: list[str] | None = None):
        if data.codebook_size and data.codebook_size != lm.config.codebook_size:
            raise ConfigError(f"the ids were extracted with a codebook of {data.codebook_size}, the LM expects "
                              f"{lm.config.codebook_size} (tokenizer {lm.config.tokenizer!r})")
        if data.ids.shape[1] != lm.num_image_tokens:
            raise ConfigError(f"the ids have {data.ids.shape[1]} tokens per image, the LM expects "
                              f"{lm.num_image_tokens}")
        self.lm, self.data, self.seed = lm, data, seed
        self.max_length = max_length
        cfg = lm.config
        for name in ("image_first_fraction", "instruct_fraction", "text_replay_fraction"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(cfg, name)}")
        self.replay = list(replay or [])
        if cfg.text_replay_fraction > 0 and not self.replay:
            raise ConfigError("text_replay_fraction > 0 needs replay texts (seedtok.train.lm.replay_texts)")

    def __len__(self) -> int:
        return len(self.data)

    def sequence(self, index: int, step: int) -> tuple[list[int], list[int]]:
        rng = np.random.default_rng([self.seed, index, step])
        ids, caption = self.data.ids[index], self.data.captions[index]
        meta = self.data.meta[index] if index < len(self.data.meta) else {}
        cfg = self.lm.config
        # drawn only when replay is on, so runs without it see exactly the samples they always did
        if cfg.text_replay_fraction > 0 and rng.random() < cfg.text_replay_fraction:
            return self.lm.encode([(self.replay[int(rng.integers(len(self.replay)))], True)])
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
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    labelled_logits_only=True)
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


# What fixes the shapes and meaning of an LM checkpoint's tensors: a warm start (``--init``) must agree on them.
_LAYOUT_FIELDS = ("base", "tokenizer", "num_image_tokens", "codebook_size", "image_id_shift", "prompt_format",
                  "add_bos", "lora_r", "lora_alpha", "lora_targets", "train_new_rows", "full_embeddings")


def warm_start(init: str | Path, config: LMConfig):
    """The trained LM ``init`` (a checkpoint folder or a preset with bundled weights) to continue training
    under ``config``, whose layout (`_LAYOUT_FIELDS`) must match; its mix and sampling options are taken."""
    from ..models.lm import SeedLM

    lm = SeedLM.from_pretrained(init, dtype=config.dtype)
    differ = [f"{f} {getattr(lm.config, f)!r} != {getattr(config, f)!r}" for f in _LAYOUT_FIELDS
              if getattr(lm.config, f) != getattr(config, f)]
    if differ:
        raise ConfigError(f"--init {init} does not match the run's LM config: {'; '.join(differ)}")
    lm.config = dataclasses.replace(config)
    return lm


def average_lms(first: str | Path, second: str | Path, weight: float = 0.5):
    """The LM whose trained weights are ``(1 - weight) * first + weight * second``, a weight-space average of two
    runs from the same start (a "model soup", Wortsman et al. 2022), e.g. to trade a run's gains against the
    language a previous one kept. The two must share the layout (`_LAYOUT_FIELDS`); the result takes the first's
    config. Averaged in fp32, stored in the first's dtype."""
    from ..models.lm import SeedLM

    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"--weight must be in [0, 1], got {weight}")
    lm, other = SeedLM.from_pretrained(first), SeedLM.from_pretrained(second)
    differ = [f"{f} {getattr(lm.config, f)!r} != {getattr(other.config, f)!r}" for f in _LAYOUT_FIELDS
              if getattr(lm.config, f) != getattr(other.config, f)]
    if differ:
        raise ConfigError(f"{second} does not match {first}: {'; '.join(differ)}")
    theirs = other.stored_state_dict()
    lm.load_state_dict_checked({k: torch.lerp(v.float(), theirs[k].float(), weight)
                                for k, v in lm.stored_state_dict().items()})
    return lm


def train_lm(config: str | tuple[LMConfig, TrainConfig], data: str | Path | None = None, out: str | Path | None = None,
             quick: bool = False, resume: bool = False, steps: int | None = None, progress: bool = True,
             lm=None, init: str | Path | None = None) -> TrainResult:
    """Train the adapter on extracted ids (``data``: an ids folder; default: the recipe's); the model is
    saved to ``OUT/final``. ``init``: start from a trained LM (`warm_start`) instead of a fresh adapter, with
    a fresh optimiser and schedule. ``lm``: an already built SeedLM (tests)."""
    from ..models.lm import SeedLM

    model_cfg, train_cfg = config if isinstance(config, tuple) else load_lm_run_config(config, quick)
    if quick:  # a short run to see every part work: a few batches of replay text, not minutes of them
        model_cfg = dataclasses.replace(model_cfg, text_replay_size=min(model_cfg.text_replay_size, QUICK_REPLAY))
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
    if lm is not None:
        model = lm
    elif init is not None:
        model = warm_start(init, model_cfg)
    else:
        model = SeedLM.build(model_cfg, seed=train_cfg.seed, **_row_init(model_cfg, ids))
    replay = (cached_replay_texts(model, out.parent / "cache", train_cfg.seed, progress)
              if model.config.text_replay_fraction > 0 else None)
    if train_cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    dataset = LMData(model, ids, seed=train_cfg.seed, max_length=model_cfg.max_length, replay=replay)
    trainer = Trainer(train_cfg, model, LMTask(), dataset, out, progress=progress)
    if resume:
        trainer.resume()
    result = trainer.fit()
    model.eval()
    trainer.save_model(out / "final")
    return result
