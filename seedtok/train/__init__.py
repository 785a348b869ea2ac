"""Training: one shared loop (``loop``) and one module per stage (``tokenizer``: stages 1-2; ``lm``: stage 3)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import PRESETS, TokenizerConfig, preset
from ..errors import ConfigError
from .loop import TrainConfig, Trainer, TrainResult, latest_checkpoint, process_state, read_run_file, with_overrides
from .recipes import recipe

__all__ = ["TrainConfig", "Trainer", "TrainResult", "load_run_config", "train_lm", "train_tokenizer"]


def train_lm(*args, **kwargs):
    """Stage 3: see `seedtok.train.lm.train_lm`."""
    from .lm import train_lm as run

    return run(*args, **kwargs)


def load_run_config(spec: str, stage: int, quick: bool = False, generation_only: bool = False
                    ) -> tuple[TokenizerConfig, TrainConfig]:
    """A preset name (its recipe for the stage) or a JSON/YAML file with ``model`` (a preset name or a config
    dict) and ``train`` (TrainConfig fields, optionally per stage: ``{"1": {...}, "2": {...}}``)."""
    if spec in PRESETS:
        return preset(spec), recipe(spec, stage, quick, generation_only)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
    data = read_run_file(path)
    model = data["model"]
    model_cfg = preset(model) if isinstance(model, str) else TokenizerConfig.from_dict(model)
    train = data.get("train", {})
    if str(stage) in train:
        train = train[str(stage)]
    base = recipe(model, stage, quick, generation_only) if isinstance(model, str) else TrainConfig()
    cfg = with_overrides(base, train)
    if generation_only:
        cfg.train_parts = "generation"
    return model_cfg, cfg


def _stage2_model(run_config: TokenizerConfig, stage1) -> "SeedTokenizer":
    """Stage 2 starts from stage 1's vision encoder and Q-Former; its codebook and de-tokenizer follow the
    run's config (stage 1 does not train them, so their options belong to this stage)."""
    from ..models.tokenizer import SeedTokenizer

    config = dataclasses.replace(stage1.config, quantizer=run_config.quantizer, detokenizer=run_config.detokenizer)
    model = SeedTokenizer(config)
    keep = {k: v for k, v in stage1.state_dict().items() if k.startswith(("vision.", "qformer."))}
    model.load_state_dict(keep, strict=False)
    return model


def train_tokenizer(config: str, stage: int, out: str | Path | None = None, quick: bool = False,
                    resume: bool = False, init: str | Path | None = None, steps: int | None = None,
                    causal: bool = True, progress: bool = True, generation_only: bool = False) -> TrainResult:
    """Train tokenizer stage 1 (causal Q-Former, contrastive) or 2 (codebook + de-tokenizer); the trained model
    is saved to ``OUT/final``. ``causal=False`` trains the bidirectional (BLIP-2) baseline. ``generation_only``
    (stage 2): retrain only the generation branch of the stage-2 model ``init`` (default
    runs/NAME-stage2/final), so its ids stay the same; output default runs/NAME-stage2-generation."""
    from ..assets import ASSETS, resolve
    from ..data.sources import open_source
    from ..models.tokenizer import SeedTokenizer
    from .data import TokenizerData
    from .tokenizer import Stage1, Stage2

    model_cfg, train_cfg = load_run_config(config, stage, quick, generation_only)
    if steps:
        train_cfg.steps = steps
    suffix = "" if causal else "-bidirectional"
    name = f"{model_cfg.name}{suffix}{'-quick' if quick else ''}"
    generation_only = stage == 2 and train_cfg.train_parts == "generation"
    out = Path(out) if out else Path("runs") / f"{name}-stage{stage}{'-generation' if generation_only else ''}"
    if not resume and latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    if stage == 1:
        if not causal:
            model_cfg.qformer.causal = False
        model = SeedTokenizer(model_cfg)
        source = model_cfg.qformer.init_from
        if source:
            model.qformer.init_from_bert(resolve(source) if source in ASSETS else Path(source))
    elif generation_only:  # every weight from a finished stage-2 model; only its generation branch will train
        init = Path(init) if init else out.parent / f"{name}-stage2" / "final"
        trained = SeedTokenizer.from_pretrained(init)
        model = SeedTokenizer(trained.config)
        model.load_state_dict(trained.state_dict())
    else:
        init = Path(init) if init else out.parent / f"{name}-stage1" / "final"
        model = _stage2_model(model_cfg, SeedTokenizer.from_pretrained(init))
    state = process_state()  # under torchrun / accelerate launch: this process's rank
    if train_cfg.streaming:
        if train_cfg.cache_features:
            raise ConfigError("streaming and cache_features exclude each other (a cache needs the whole data first)")
        from .data import StreamingTokenizerData

        data = StreamingTokenizerData(model, train_cfg.data, stage, augment=train_cfg.augment,
                                      shuffle_buffer=train_cfg.shuffle_buffer, resampled=train_cfg.resampled,
                                      num_workers=train_cfg.num_workers)
    else:
        with state.main_process_first():  # rank 0 fills the feature cache; the others then read it
            data = TokenizerData(model, open_source(train_cfg.data), stage, train_cfg.data,
                                 cache_dir=out.parent / "cache", cache_features=train_cfg.cache_features,
                                 augment=train_cfg.augment, seed=train_cfg.seed,
                                 progress=progress and state.is_main_process,
                                 captions=stage == 2 and train_cfg.caption_weight > 0 and not generation_only)
    if stage == 1:
        task = Stage1()
    else:
        standardize = train_cfg.generation_loss == "standardized" or train_cfg.generation_contrastive_weight
        if standardize and train_cfg.streaming:
            raise ConfigError("the standardised generation loss needs cached data (cache_features), not a stream")
        task = Stage2(train_cfg.retrieval_weight, train_cfg.last_query_weight, train_cfg.caption_weight,
                      getattr(data, "caption_bank", None), train_cfg.generation_loss,
                      train_cfg.generation_contrastive_weight, data.teacher_stats() if standardize else None,
                      train_cfg.train_parts)
    trainer = Trainer(train_cfg, model, task, data, out,
                      progress=progress and state.is_main_process)
    if resume:
        trainer.resume()
    result = trainer.fit()
    model.eval()
    if trainer.accelerator.is_main_process:  # one writer when several processes train
        model.save_pretrained(out / "final")
    trainer.accelerator.wait_for_everyone()
    return result
