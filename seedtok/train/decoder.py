"""Training the tiny preset's image decoder (``TinyDecoder``) as a Task on the shared loop.

The decoder learns p(image | generation embedding). With ``condition="teacher"`` (the paper's way) its training
pairs are (scene, the *teacher* embedding of that scene): the embedding space stage 2 teaches the de-tokenizer
to produce (``teacher="vision_pooled"``: the frozen backbone's pooled feature(s) at the tokenizer's input size,
`VisionEncoder.pooled_teacher`), so the decoder does not depend on a trained tokenizer. With
``condition="generation"`` (the tiny preset) they are (scene, a trained tokenizer's generation embedding of
the scene's codes): what decoding will actually feed it.

Loss: optional embedding noise (``embed_noise``, a share of each dimension's batch std), then condition
dropout: each embedding is replaced by the null (all-zeros) embedding with probability ``cond_dropout``, which
is what the decoder's classifier-free guidance contrasts with. With a coarse head (``coarse_size``): MSE
between its image and the area-downsampled target, over the whole batch; with prototypes, optionally a
cross-entropy towards each target's nearest prototype (``coarse_prototype_ce``, on kept embeddings only), an
MSE on its background colour (``coarse_background_weight``) and a cross-entropy towards the target's nearest
background colour (``coarse_background_ce``, with ``coarse_background_colours``). Diffusion: diffusers'
``DDPMScheduler`` noises the target pixels ([-1, 1]) at a uniform timestep; the UNet, given the noisy pixels
and the (detached, upsampled) coarse image (or, with ``unet_condition="target"``, the target's own
downsampled, noise-augmented drawing), predicts the scheduler's ``prediction_type`` target (x0 by
default) for the first ``unet_batch`` samples; plain MSE. The two losses are summed. Noise, timesteps and
dropout draw from torch's global RNG, which the loop checkpoints, so a resumed run continues exactly. No
augmentation: a mirrored emoji is another emoji. With ``coarse_prototype_refit`` the prototypes are then refit in
closed form to their classes' targets (`CoarseHead.fit_prototypes`); `refit_prototypes` does that alone for a
trained decoder (``seedtok train decoder --refit-prototypes``).

Data (``DecoderData``): targets (the scene, or its centred view: ``target``) are rendered once to uint8
pixels at the decoder's size, and the teacher embeddings computed once; both are kept in ``cache_dir``
(safetensors). When the tokenizer's own feature cache for the same data exists there (``train tokenizer``
with ``cache_features``), the teacher is read from it instead of running the backbone again. With
``condition="generation"`` the decoder instead learns from a trained tokenizer's generation embeddings of each
image's codes (encode, then `decode_embeddings`), cached per tokenizer weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import PRESETS, TokenizerConfig, preset
from ..data.sources import Sample
from ..data.transforms import preprocess
from ..errors import CheckpointError, ConfigError
# the centred training target is the scorer's view of a scene (one definition of "centred", shared)
from ..evaluate.emoji_scorer import normalize_scene
from ..models.image_decoder import (DECODE_SETTINGS, TINY_DECODERS, UNET_CONDITIONS, TinyDecoder, TinyDecoderConfig,
                                    border_colour, tiny_decoder_config)
from .loop import TrainConfig, TrainResult, read_run_file, with_overrides

#: what ``TrainConfig.train_parts`` may train of a decoder: everything; the coarse head alone (the UNet of an
#: ``--init`` decoder kept as it is); or the UNet alone (fine-tuned from an ``--init`` decoder under its frozen
#: coarse head, which then draws the UNet's input as it does when decoding: at its decode temperature)
DECODER_PARTS = ("all", "coarse", "unet")

__all__ = ["DecoderData", "DecoderModel", "DecoderTask", "load_decoder_run_config", "new_decoder", "refit_prototypes",
           "train_decoder"]


# ------------------------------------------------------------------------------------------------ data
def build_teacher(config: TokenizerConfig) -> nn.Module:
    """The frozen vision encoder of a tokenizer config, with the weights ``SeedTokenizer(config)`` gives it
    (pretrained, or random from ``config.seed``: the vision encoder is built first there, so the same seed
    gives the same weights)."""
    from ..models.vision import build_vision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vision = build_vision(config.vision)
    return vision.requires_grad_(False).eval()


def _key(config: TokenizerConfig, data_spec: str, size: int, target: str = "scene") -> str:
    payload = json.dumps({"vision": dataclasses.asdict(config.vision), "size": config.image_size,
                          "mean": config.image_mean, "std": config.image_std, "resample": config.resample,
                          "seed": config.seed if not config.vision.pretrained else None,
                          "data": data_spec, "pixels": size, "what": "decoder",
                          "backbone_mode": "eval", **({"target": target} if target != "scene" else {})},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class DecoderData:
    """``len`` + ``batch(indices, step)`` -> {"pixels": [B, 3, S, S] in [-1, 1], "embeds": [B, D]}.
    ``target="centred"``: the pixels are the scene's centred view (`TinyDecoderConfig.target`)."""

    def __init__(self, config: TokenizerConfig, samples: Sequence[Sample], data_spec: str, size: int,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True, batch_size: int = 64,
                 target: str = "scene", tokenizer=None, embeddings: bool = True):
        from .data import _cache_key, _load_or_compute, _weights_digest

        self.config, self.samples, self.size, self.target = config, samples, int(size), target
        self.progress, self.chunk = progress, batch_size
        cache_dir = Path(cache_dir or ".")
        self._labels_cache = cache_dir / f"labels-{_key(config, data_spec, 0, 'labels')}.safetensors"
        #: [N] long, or None: each target's nearest starting prototype (`new_decoder` sets it when the
        #: decoder config has ``coarse_prototype_ce``)
        self.prototype_targets: torch.Tensor | None = None
        #: [N] long, or None: each target's nearest starting background colour (``coarse_background_ce``)
        self.background_targets: torch.Tensor | None = None
        pixels_cache = cache_dir / f"decoder-{_key(config, data_spec, self.size, target)}.safetensors"
        if not embeddings:  # the targets alone (`refit_prototypes`): no backbone pass
            if pixels_cache.is_file():  # a decoder run's cache: read its pixels, not its embeddings
                from safetensors import safe_open

                with safe_open(str(pixels_cache), "pt") as f:
                    self.pixels = f.get_tensor("pixels")
            else:
                self.pixels = torch.cat([self._target_pixels(start)
                                         for start in self._starts("render decoder targets")])
            self.teacher = self.embeds = None
            return
        # the tokenizer's feature cache for the same data, when there is one (same key as TokenizerData's)
        self._features_cache = cache_dir / f"features-{_cache_key(_ConfigHolder(config), data_spec, 'features')}" \
                                           f".safetensors"
        generation_cache = None
        if tokenizer is not None:
            key = _key(config, data_spec, 0, "generation") + "-" + _weights_digest(tokenizer)
            generation_cache = cache_dir / f"generation-{key}.safetensors"
        # when both caches are to be made, one pass runs the backbone once for the teacher and the codes
        one_pass = tokenizer if generation_cache is not None and not generation_cache.is_file() else None
        generation = {}  # {"embeds": ...} when that pass made them

        def compute():
            tensors = self._compute(one_pass)
            if "generation" in tensors:
                generation["embeds"] = tensors.pop("generation")
            return tensors

        tensors = _load_or_compute(pixels_cache, compute)
        self.pixels, self.teacher = tensors["pixels"], tensors["teacher"]
        if len(self.pixels) != len(samples):
            raise ConfigError(f"decoder cache holds {len(self.pixels)} samples, the data {len(samples)}")
        #: the conditioning embeddings the decoder learns from: the teacher's, or ``tokenizer``'s generation
        #: embeddings of the images' codes
        self.embeds = self.teacher
        if tokenizer is not None:
            self.embeds = _load_or_compute(generation_cache, lambda: generation or
                                           {"embeds": self._compute_generation(tokenizer)})["embeds"]

    def __len__(self) -> int:
        return len(self.samples)

    def emoji_labels(self) -> torch.Tensor:
        """[N] long: each scene's emoji (the emoji world's ``meta["emoji_index"]``, which its caption names),
        read once (it renders every scene) and cached beside the pixels."""
        from .data import _load_or_compute

        def compute():
            labels = []
            for i in range(len(self.samples)):
                index = self.samples[i].meta.get("emoji_index")
                if index is None:
                    raise ConfigError(f"sample {i} does not say its emoji (meta emoji_index): the emoji prototype "
                                      f"init needs emoji-world data")
                labels.append(int(index))
            return {"labels": torch.tensor(labels, dtype=torch.long)}

        return _load_or_compute(self._labels_cache, compute)["labels"]

    @property
    def embed_dim(self) -> int:
        return int(self.embeds.shape[1])

    def _starts(self, desc: str):
        starts = range(0, len(self.samples), self.chunk)
        if self.progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc=desc, unit="batch")
        return starts

    @torch.inference_mode()
    def _compute(self, tokenizer=None) -> dict[str, torch.Tensor]:
        """Pixels and teacher embeddings; with ``tokenizer`` (and no feature cache to read) also the codes'
        generation embeddings from the same backbone features (key "generation")."""
        cfg = self.config
        reuse = self._features_cache.is_file()
        teacher = build_teacher(cfg)  # also when reusing: its pooled_teacher picks the rows
        tok = tokenizer if not reuse else None
        pixels, embeds, generation = [], [], []
        for start in self._starts("cache decoder pixels + teacher embeddings" + (" + codes" if tok else "")):
            images = [self.samples[i].image for i in range(start, min(start + self.chunk, len(self.samples)))]
            pixels.append(self._target_pixels(start, images))
            if not reuse:
                x = preprocess(images, cfg.image_size, cfg.image_mean, cfg.image_std, cfg.resample)
                feats = teacher.features(x)  # the tokenizer's frozen backbone, with the same weights
                embeds.append(teacher.pooled_teacher(feats).to(torch.float16))
                if tok is not None:
                    generation.append(_code_embeddings(tok, feats))
        if reuse:
            from safetensors import safe_open

            with safe_open(str(self._features_cache), "pt") as f:
                features = f.get_slice("features")
                embeds = [teacher.pooled_teacher(features[i:i + self.chunk]).to(torch.float16)
                          for i in range(0, len(self.samples), self.chunk)]
        tensors = {"pixels": torch.cat(pixels), "teacher": torch.cat(embeds).reshape(len(self.samples), -1)}
        if generation:
            tensors["generation"] = torch.cat(generation)
        return tensors

    def _target_pixels(self, start: int, images: Sequence[Image.Image] | None = None) -> torch.Tensor:
        """[n, 3, S, S] uint8: the training targets of the chunk of samples from ``start`` (its ``images``, if
        already loaded): each scene, or its centred view, at the decoder's size."""
        if images is None:
            images = [self.samples[i].image for i in range(start, min(start + self.chunk, len(self.samples)))]
        targets = images if self.target == "scene" else [normalize_scene(im) for im in images]
        return torch.from_numpy(np.stack([np.asarray(_resize(im, self.size), dtype=np.uint8)
                                          for im in targets])).permute(0, 3, 1, 2).contiguous()

    @torch.inference_mode()
    def _compute_generation(self, tokenizer) -> torch.Tensor:
        """Each image -> ids -> the de-tokenizer's generation embedding (backbone features from the
        tokenizer's cache when there is one)."""
        cfg, tok = self.config, tokenizer.eval()
        out = []
        with contextlib.ExitStack() as stack:
            features = None
            if self._features_cache.is_file():
                from safetensors import safe_open

                features = stack.enter_context(safe_open(str(self._features_cache), "pt")).get_slice("features")
            for start in self._starts("cache generation embeddings of the codes"):
                stop = min(start + self.chunk, len(self.samples))
                if features is not None:
                    feats = features[start:stop].to(tok.dtype)
                else:
                    images = [self.samples[i].image for i in range(start, stop)]
                    feats = tok.vision.features(preprocess(images, cfg.image_size, cfg.image_mean, cfg.image_std,
                                                           cfg.resample).to(tok.dtype))
                out.append(_code_embeddings(tok, feats))
        return torch.cat(out)

    def batch(self, indices: list[int], step: int = 0) -> dict[str, torch.Tensor]:
        pixels = self.pixels[indices].float().div_(127.5).sub_(1.0)
        batch = {"pixels": pixels, "embeds": self.embeds[indices].float()}
        if self.prototype_targets is not None:
            batch["prototype"] = self.prototype_targets[indices]
        if self.background_targets is not None:
            batch["background"] = self.background_targets[indices]
        return batch


def _code_embeddings(tokenizer, features: torch.Tensor) -> torch.Tensor:
    """Backbone features -> ids -> the de-tokenizer's generation embeddings (= ``decode_embeddings(encode(...))``
    from features), fp16."""
    tok = tokenizer.eval()
    ids = tok.quantizer(tok.qformer(tok.vision.normalize(features.to(tok.dtype)))).ids
    return tok.decode_embeddings(ids).to(torch.float16)


class _ConfigHolder:
    """What ``train.data._cache_key`` reads of a tokenizer: its config."""

    def __init__(self, config: TokenizerConfig):
        self.config = config


def _resize(image: Image.Image, size: int) -> Image.Image:
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------------------------------ model
class DecoderModel(nn.Module):
    """The decoder as the shared loop sees it: an ``nn.Module`` (its UNet) that saves and reloads itself as the
    decoder's diffusers folder."""

    def __init__(self, decoder: TinyDecoder):
        super().__init__()
        self.decoder = decoder
        self.unet = decoder.pipeline.unet
        self.coarse = decoder.pipeline.coarse  # None without a coarse head

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
        return self.decoder.save_pretrained(folder, dtype=dtype)

    def load_checkpoint(self, folder: str | os.PathLike, parts: Sequence[str] = ("unet", "coarse")) -> None:
        """Load the UNet (and coarse head) weights of a folder ``save_pretrained`` wrote (the loop's resume;
        ``parts=("unet",)``: a trained UNet under a new coarse head)."""
        from safetensors.torch import load_file

        for name, module in (("unet", self.unet), ("coarse", self.coarse)):
            if module is None or name not in parts:
                continue
            path = Path(folder) / name / "diffusion_pytorch_model.safetensors"
            if not path.is_file():
                raise CheckpointError(f"missing decoder weights {path}")
            state = load_file(str(path))
            own = module.state_dict()
            if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
                raise CheckpointError(f"{path} does not fit the decoder config (keys or shapes differ)")
            module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


class DecoderTask:
    """Denoising loss with condition dropout (see the module docstring)."""

    def __init__(self, decoder: TinyDecoder, embed_noise: float = 0.0, unet_batch: int = 0,
                 prototype_ce: float = 0.0, background_weight: float = 0.0, train_parts: str = "all",
                 background_ce: float = 0.0, unet_condition: str = "head", coarse_augment: float = 0.0):
        from diffusers import DDPMScheduler

        config = decoder.pipeline.scheduler.config
        self.scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps,
                                       beta_schedule=config.beta_schedule, prediction_type=config.prediction_type)
        self.cond_dropout = float(decoder.pipeline.config.cond_dropout)
        self.embed_noise, self.unet_batch = embed_noise, unet_batch
        self.prototype_ce, self.background_weight = prototype_ce, background_weight
        self.background_ce = background_ce
        if train_parts not in DECODER_PARTS:
            raise ConfigError(f"unknown decoder train_parts {train_parts!r}; choose {' or '.join(DECODER_PARTS)}")
        if train_parts != "all" and decoder.pipeline.coarse is None:
            raise ConfigError(f"train_parts=\"{train_parts}\" needs a decoder config with a coarse head (coarse_size)")
        self.coarse_only = train_parts == "coarse"  # the UNet stays as it is and is not run
        self.unet_only = train_parts == "unet"  # the head stays as it is and draws at its decode temperature
        if unet_condition not in UNET_CONDITIONS:
            raise ConfigError(f"unknown unet_condition {unet_condition!r}; choose {' or '.join(UNET_CONDITIONS)}")
        if unet_condition == "target" and decoder.pipeline.coarse is None:
            raise ConfigError('unet_condition="target" needs a decoder config with a coarse head (coarse_size)')
        self.unet_condition, self.coarse_augment = unet_condition, coarse_augment
        self.pipeline = decoder.pipeline

    @classmethod
    def for_config(cls, decoder: TinyDecoder, config: TinyDecoderConfig, train_parts: str = "all") -> "DecoderTask":
        """The task with a decoder config's training options."""
        return cls(decoder, config.embed_noise, config.unet_batch, config.coarse_prototype_ce,
                   config.coarse_background_weight, train_parts, config.coarse_background_ce,
                   config.unet_condition, config.coarse_augment)

    def target_drawing(self, pixels: torch.Tensor, size: int) -> torch.Tensor:
        """``unet_condition="target"``: the targets at the head's size (as its MSE target), each plus Gaussian
        noise of a std drawn from [0, ``coarse_augment``], clipped to the pixel range."""
        small = F.interpolate(pixels, size=(size, size), mode="area")
        if self.coarse_augment > 0:
            std = self.coarse_augment * torch.rand(len(small), 1, 1, 1, device=small.device, dtype=small.dtype)
            small = (small + std * torch.randn_like(small)).clamp(-1.0, 1.0)
        return small

    def train_mode(self, model):
        model.train()

    def trainable_parameters(self, model):
        params = [] if self.coarse_only else [(f"unet.{n}", p) for n, p in model.unet.named_parameters()]
        if model.coarse is not None and not self.unet_only:
            params += [(f"coarse.{n}", p) for n, p in model.coarse.named_parameters()]
        return params

    def loss(self, model, batch):
        sched, pipe = self.scheduler, self.pipeline
        pixels, emb = batch["pixels"], batch["embeds"]
        if self.embed_noise > 0 and len(emb) > 1:
            emb = emb + self.embed_noise * emb.std(dim=0, keepdim=True) * torch.randn_like(emb)
        keep = (torch.rand(len(emb), device=emb.device) >= self.cond_dropout).to(emb.dtype)[:, None]
        emb = emb * keep
        logs = {"cond_kept": keep.mean().item()}
        coarse, coarse_loss = None, 0.0
        if self.unet_only:
            if self.unet_batch and len(emb) > self.unet_batch:
                pixels, emb = pixels[:self.unet_batch], emb[:self.unet_batch]
            if self.unet_condition == "head":  # ("target": the head is not needed)
                with torch.no_grad(), torch.autocast(emb.device.type, enabled=False):
                    coarse = model.coarse(emb.float(), temperature=pipe.config.coarse_temperature)
        elif model.coarse is not None:
            # the head runs in fp32 under mixed precision: it is small (its step costs little next to the
            # UNet's), and in bf16 its softmax over K prototypes and their mix keep 8 mantissa bits
            parts = model.coarse.config.prototypes and (self.prototype_ce or self.background_weight
                                                        or self.background_ce)
            with torch.autocast(emb.device.type, enabled=False):
                coarse = model.coarse(emb.float(), return_parts=bool(parts))
            if parts:
                coarse, logits, background, background_logits = coarse
            # dropped (null) embeddings say nothing of the scene: no class to learn from them
            kept = keep[:, 0] > 0
            small = F.interpolate(pixels, size=coarse.shape[-2:], mode="area")
            coarse_loss = F.mse_loss(coarse, small)
            logs["coarse_mse"] = coarse_loss.item()
            if parts and self.prototype_ce:
                if "prototype" not in batch:
                    raise ConfigError("coarse_prototype_ce needs the data's prototype targets (new_decoder sets them)")
                if kept.any():
                    ce = F.cross_entropy(logits[kept], batch["prototype"][kept])
                    coarse_loss = coarse_loss + self.prototype_ce * ce
                    logs["prototype_ce"] = ce.item()
            if parts and self.background_weight:
                bg = F.mse_loss(background, border_colour(small))
                coarse_loss = coarse_loss + self.background_weight * bg
                logs["background_mse"] = bg.item()
            if parts and self.background_ce:
                if background_logits is None or "background" not in batch:
                    raise ConfigError("coarse_background_ce needs coarse_background_colours and the data's "
                                      "background targets (new_decoder sets them)")
                if kept.any():
                    ce = F.cross_entropy(background_logits[kept], batch["background"][kept])
                    coarse_loss = coarse_loss + self.background_ce * ce
                    logs["background_ce"] = ce.item()
        if self.coarse_only:
            return coarse_loss, logs
        if self.unet_batch and len(emb) > self.unet_batch:
            pixels, emb = pixels[:self.unet_batch], emb[:self.unet_batch]
            coarse = coarse[:self.unet_batch] if coarse is not None else None
        if self.unet_condition == "target":
            coarse = self.target_drawing(pixels, model.coarse.config.size)
        # the UNet refines the coarse image; it does not train the head (which has its own loss)
        coarse_latents = pipe.upsample_coarse(coarse.detach(), *pixels.shape[-2:]) if coarse is not None else None
        x0 = pipe.to_latents(pixels)
        n = x0.shape[0]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), device=x0.device)
        noisy = sched.add_noise(x0, noise, t)
        kind = sched.config.prediction_type
        target = noise if kind == "epsilon" else x0 if kind == "sample" else sched.get_velocity(x0, noise, t)
        pred = pipe.predict(noisy, t, emb, coarse_latents)  # pipe.unet is model.unet
        diffusion_loss = F.mse_loss(pred.float(), target.float())
        logs["diffusion_mse"] = diffusion_loss.item()
        return diffusion_loss + coarse_loss, logs


def new_decoder(config: TinyDecoderConfig, data: DecoderData) -> TinyDecoder:
    """A randomly initialised decoder for training on ``data``: its coarse head standardises inputs by the
    data's embedding statistics, and its prototypes (if any) start as training targets
    (``config.coarse_prototype_init``), and so do its background colours; with ``config.coarse_prototype_ce``
    / ``coarse_background_ce`` it also sets ``data.prototype_targets`` (the nearest starting prototypes, or the
    scenes' emoji with ``coarse_prototype_init="emoji"``) / ``background_targets``
    (deterministic: a resumed run recomputes the same)."""
    if (config.coarse_prototype_ce or config.coarse_background_weight or config.coarse_background_ce) \
            and not config.coarse_prototypes:
        raise ConfigError("coarse_prototype_ce, coarse_background_weight and coarse_background_ce need "
                          "coarse_prototypes")
    if config.coarse_background_ce and not config.coarse_background_colours:
        raise ConfigError("coarse_background_ce needs coarse_background_colours")
    if config.coarse_prototype_refit and not config.coarse_prototype_ce:
        raise ConfigError("coarse_prototype_refit needs each target's class: set coarse_prototype_ce")
    decoder = TinyDecoder.random(config)
    coarse = decoder.pipeline.coarse
    if coarse is not None:
        coarse.set_input_stats(data.embeds)
        if config.coarse_prototypes:
            labels = data.emoji_labels() if config.coarse_prototype_init == "emoji" else None
            pick = coarse.init_prototypes(data.pixels, seed=config.seed, method=config.coarse_prototype_init,
                                          labels=labels)
            if config.coarse_prototype_ce:
                data.prototype_targets = labels if labels is not None else coarse.nearest_prototypes(data.pixels,
                                                                                                      pick)
        if config.coarse_background_colours:
            pick = coarse.init_background_colours(data.pixels, seed=config.seed)
            if config.coarse_background_ce:
                data.background_targets = coarse.nearest_background_colours(data.pixels, pick)
    return decoder


# ------------------------------------------------------------------------------------------------ runs
def load_decoder_run_config(spec: str, quick: bool = False
                            ) -> tuple[TokenizerConfig, TinyDecoderConfig, TrainConfig]:
    """A preset name with a decoder config and recipe (tiny, micro), or a JSON/YAML file with ``model`` (a
    preset name or tokenizer config dict: whose teacher embeddings to decode), ``decoder``
    (``TinyDecoderConfig`` fields over the preset's, or over tiny's) and ``train`` (TrainConfig fields)."""
    from .recipes import decoder_recipe

    if spec in PRESETS:
        train_cfg = decoder_recipe(spec, quick)  # first: its error says which presets have a decoder
        return preset(spec), tiny_decoder_config(spec), train_cfg
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{spec!r} is neither a preset with a decoder ({', '.join(TINY_DECODERS)}) nor a "
                          f"config file")
    data = read_run_file(path)
    model = data["model"]
    model_cfg = preset(model) if isinstance(model, str) else TokenizerConfig.from_dict(model)
    base_name = model if isinstance(model, str) and model in TINY_DECODERS else "tiny"
    decoder = data.get("decoder", {})
    known = {f.name for f in dataclasses.fields(TinyDecoderConfig)}
    if set(decoder) - known:
        raise ConfigError(f"unknown decoder config keys: {sorted(set(decoder) - known)}")
    dec_cfg = dataclasses.replace(tiny_decoder_config(base_name),
                                  **{k: tuple(v) if isinstance(v, list) else v for k, v in decoder.items()})
    train = data.get("train", {})
    train_cfg = with_overrides(decoder_recipe(base_name, quick), train)
    return model_cfg, dec_cfg, train_cfg


def train_decoder(config: str = "tiny", out: str | Path | None = None, quick: bool = False, resume: bool = False,
                  steps: int | None = None, export: str | Path | None = None, progress: bool = True,
                  tokenizer: str | Path | None = None, init: str | Path | None = None,
                  coarse_only: bool = False, unet_only: bool = False) -> TrainResult:
    """Train the tiny image decoder; the trained decoder is saved to ``OUT/final`` (fp32) and, with ``export``,
    also there in fp16 (the bundled form: ``seedtok/weights/tiny/decoder``). ``tokenizer`` (a preset or model
    folder; default the run's preset): whose generation embeddings ``condition="generation"`` learns from.
    ``coarse_only`` (``train_parts="coarse"``): a new coarse head, as the config says, on the UNet of the
    trained decoder folder ``init``, which stays frozen (minutes instead of an hour: the UNet is not run).
    ``unet_only`` (``train_parts="unet"``): the UNet of ``init`` fine-tuned under its coarse head, which stays
    frozen (after a new head, so the UNet learns to refine that head's drawings; with
    ``unet_condition="target"`` it learns to render the targets' own drawings, and the head is not run)."""
    from ..data.sources import open_source
    from .loop import Trainer, latest_checkpoint

    model_cfg, dec_cfg, train_cfg = load_decoder_run_config(config, quick)
    if steps:
        train_cfg.steps = steps
    if coarse_only and unet_only:
        raise ConfigError("--coarse-only and --unet-only exclude each other (a full run trains both)")
    if coarse_only or unet_only:
        train_cfg.train_parts = "coarse" if coarse_only else "unet"
    if train_cfg.train_parts != "all" and init is None:
        raise ConfigError(f"training the {'coarse head' if train_cfg.train_parts == 'coarse' else 'UNet'} alone "
                          f"keeps a trained decoder's other part: pass --init DECODER_DIR")
    if init is not None and train_cfg.train_parts == "all":
        raise ConfigError("--init is for --coarse-only or --unet-only (a full decoder run starts from random "
                          "weights)")
    name = f"{model_cfg.name}-decoder{'-quick' if quick else ''}"
    out = Path(out) if out else Path("runs") / name
    if not resume and latest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    from .loop import process_state

    generator = None
    if dec_cfg.condition == "generation":
        from ..models.tokenizer import SeedTokenizer

        if tokenizer is None and model_cfg.name not in PRESETS:
            raise ConfigError("condition=\"generation\" needs the trained tokenizer: pass --tokenizer")
        generator = SeedTokenizer.from_pretrained(tokenizer or model_cfg.name).float()
    elif dec_cfg.condition != "teacher":
        raise ConfigError(f"unknown decoder condition {dec_cfg.condition!r}; choose teacher or generation")
    state = process_state()
    with state.main_process_first():  # rank 0 fills the cache; the others then read it
        data = DecoderData(model_cfg, open_source(train_cfg.data), train_cfg.data, dec_cfg.image_size,
                           cache_dir=out.parent / "cache", progress=progress and state.is_main_process,
                           target=dec_cfg.target, tokenizer=generator)
    if data.embed_dim != dec_cfg.embed_dim:
        raise ConfigError(f"the {dec_cfg.condition} embeddings of {model_cfg.name} are {data.embed_dim}-d, the "
                          f"decoder config expects {dec_cfg.embed_dim}")
    # --unet-only takes every weight and statistic from --init: picking starting prototypes would be wasted work
    decoder = TinyDecoder.random(dec_cfg) if train_cfg.train_parts == "unet" else new_decoder(dec_cfg, data)
    model = DecoderModel(decoder)
    if init is not None:
        model.load_checkpoint(init, parts=("unet",) if train_cfg.train_parts == "coarse" else ("unet", "coarse"))
    task = DecoderTask.for_config(decoder, dec_cfg, train_cfg.train_parts)
    trainer = Trainer(train_cfg, model, task, data, out, progress=progress and state.is_main_process)
    if resume:
        trainer.resume()
    result = trainer.fit()
    model.eval()
    if dec_cfg.coarse_prototype_refit and train_cfg.train_parts != "unet":
        decoder.pipeline.coarse.fit_prototypes(data.pixels, data.prototype_targets)
    if trainer.accelerator.is_main_process:
        decoder.save_pretrained(out / "final")
        if export:
            decoder.save_pretrained(export, dtype="fp16")
    trainer.accelerator.wait_for_everyone()
    return result


def refit_prototypes(config: str, init: str | Path, out: str | Path, export: str | Path | None = None,
                     progress: bool = True) -> int:
    """Refit the prototypes of the trained decoder folder ``init`` on the training targets of ``config``'s data
    (`CoarseHead.fit_prototypes`; its head needs one prototype per emoji: ``coarse_prototype_init="emoji"``)
    and save the decoder to ``OUT/final`` (fp32) and, with ``export``, in fp16; the weights but the prototypes
    are the init's, the decode settings (``DECODE_SETTINGS``) the config's. Renders the targets only (no
    backbone pass; a decoder run's pixel cache is read when there is one). Returns how many were refit."""
    from ..data.sources import open_source

    model_cfg, dec_cfg, train_cfg = load_decoder_run_config(config)
    if not dec_cfg.coarse_prototypes or dec_cfg.coarse_prototype_init != "emoji":
        raise ConfigError("--refit-prototypes needs a coarse head with one prototype per emoji "
                          "(coarse_prototype_init: emoji)")
    out = Path(out)
    if (out / "final").exists():
        raise ConfigError(f"{out / 'final'} already exists: pass another --out")
    decoder = TinyDecoder.from_pretrained(init, torch_dtype=torch.float32)
    coarse = decoder.pipeline.coarse
    if coarse is None or coarse.config.prototypes != dec_cfg.coarse_prototypes:
        raise CheckpointError(f"{init} does not fit the config: its coarse head has "
                              f"{coarse.config.prototypes if coarse is not None else 'no'} prototypes, the config "
                              f"{dec_cfg.coarse_prototypes}")
    data = DecoderData(model_cfg, open_source(train_cfg.data), train_cfg.data, dec_cfg.image_size,
                       cache_dir=out.parent / "cache", progress=progress, target=dec_cfg.target, embeddings=False)
    fitted = coarse.fit_prototypes(data.pixels, data.emoji_labels())
    # the decode settings stored with it (model_index.json) are the config's, as a trained decoder's are
    decoder.pipeline.register_to_config(**{name: getattr(dec_cfg, name) for name in DECODE_SETTINGS})
    decoder.save_pretrained(out / "final")
    if export:
        decoder.save_pretrained(export, dtype="fp16")
    return fitted
