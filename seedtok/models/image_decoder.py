"""Image decoders: generation embeddings -> pixels, through diffusers (SPEC §2.7).

- ``Seed2UnCLIPDecoder``: Stable Diffusion 2.1 unCLIP (``StableUnCLIPImg2ImgPipeline``) given the [B, 1024]
  unCLIP image embeddings directly; empty prompt, ``noise_level`` 0, guidance 10, 20 steps, 768x768 (the native
  size of the SD 2.1 unCLIP UNet). Classifier-free guidance contrasts with a negative image embedding: zeros by
  default, or a given one (the embedding of user-given negative ids, computed by the caller).
- ``Seed1SDDecoder``: Stable Diffusion 1.4 (``StableDiffusionPipeline``) given the [B, 77, 768] states as
  ``prompt_embeds``; unconditional input = the text encoding of "" (or a given negative); guidance 7.5, 50 PLMS
  steps (PNDM without Runge-Kutta steps), 512x512.
- ``TinyDecoder``: the tiny preset's own decoder, [B, 1712] embeddings -> 64x64 images with a small
  pixel-space UNet refining a coarse MLP image (``TinyDecoderConfig``, ``TinyDecoderPipeline``); zeros as the unconditional embedding,
  guidance 2, 20 DDIM steps (defaults stored in its ``model_index.json``).

All decode batches (the reference decodes one image at a time) with one random stream per image: given a
list of seeds or generators, image i depends only on its embedding and its own seed, never on the batch it is
in or on how the batch is chunked (``batch_size``). Initial latents are drawn on the CPU (so a seed gives the
same start on any device), or given (``latents``: unit-variance noise, [B or 1, C, H/f, W/f]).

Negative embeddings in the unCLIP decoder follow the reference's patched pipeline: the default unconditional
input is ``zeros_like`` the whole conditioning vector (embedding and noise-level code both zero, as the stock
pipeline does); a given negative embedding goes through the same ``noise_image_embeddings`` as the positive
(normalise, noise at ``noise_level``, append the noise-level code), so an explicit all-zeros embedding is *not*
the same as the default. The pipeline subclass overrides only ``_encode_image`` (where the stock pipeline
builds its zeros) and adds a ``negative_image_embeds`` argument to ``__call__``; see ``_unclip_pipeline_class``.

diffusers is imported lazily (importing it takes seconds); the paper checkpoints are loaded from a local folder
or a hub id (``from_pretrained``), never downloaded implicitly by anything else in seedtok.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import resolve_dtype
from ..errors import CheckpointError, ConfigError, SeedtokError
from ..fileio import atomic_write_folder


class DecodeInputError(SeedtokError, ValueError):
    """Embeddings, negative embeddings, seeds or latents given to an image decoder do not fit it."""


# ------------------------------------------------------------------------------------- the unCLIP pipeline
@functools.cache
def _unclip_pipeline_class():
    """``StableUnCLIPImg2ImgPipeline`` with a negative image embedding for classifier-free guidance.

    Built on first use so that importing seedtok does not import diffusers. Only two things change:
    - ``__call__`` takes ``negative_image_embeds`` ([B or 1, D], or None for the stock zeros) and holds it for
      the duration of the call; everything else is the stock ``__call__``.
    - ``_encode_image`` is overridden: it is where the stock pipeline hard-codes the unconditional input as
      ``torch.zeros_like`` of the noised conditioning. With ``image_embeds`` given it also no longer reads the
      image encoder's dtype, so the pipeline runs without the CLIP ViT-H image encoder (1.3 GB fp16) loaded.
    """
    from diffusers import StableUnCLIPImg2ImgPipeline

    class SeedStableUnCLIPImg2ImgPipeline(StableUnCLIPImg2ImgPipeline):
        _seed_negative_image_embeds: torch.Tensor | None = None

        def __call__(self, *args, negative_image_embeds: torch.Tensor | None = None, **kwargs):
            self._seed_negative_image_embeds = negative_image_embeds
            try:
                return super().__call__(*args, **kwargs)
            finally:
                self._seed_negative_image_embeds = None

        def _encode_image(self, image, device, batch_size, num_images_per_prompt, do_classifier_free_guidance,
                          noise_level, generator, image_embeds):
            if image_embeds is None:  # an image to encode: the stock path (needs the image encoder)
                cond = super()._encode_image(image, device, batch_size, num_images_per_prompt, False,
                                             noise_level, generator, None)
                rows = cond.shape[0] // num_images_per_prompt
            else:  # the stock path minus the image encoder: noise, then repeat per image
                rows = image_embeds.shape[0]
                cond = self.noise_image_embeddings(image_embeds=image_embeds, noise_level=noise_level,
                                                   generator=generator)
                cond = cond.repeat_interleave(num_images_per_prompt, dim=0)
            if not do_classifier_free_guidance:
                return cond
            negative = self._seed_negative_image_embeds
            if negative is None:
                uncond = torch.zeros_like(cond)  # the stock (and reference) default
            else:
                negative = negative.to(device=cond.device, dtype=cond.dtype)
                if negative.ndim != 2 or negative.shape[0] not in (1, rows) or \
                        negative.shape[1] != cond.shape[1] // 2:
                    raise DecodeInputError(f"negative_image_embeds must be [{rows} or 1, {cond.shape[1] // 2}], "
                                           f"got {tuple(negative.shape)}")
                negative = negative.expand(rows, -1)
                # as the reference: the negative is normalised, noised and tagged with the noise level like
                # the positive (after the positive's noise is drawn, so that stays the same)
                uncond = self.noise_image_embeddings(image_embeds=negative, noise_level=noise_level,
                                                     generator=generator)
                uncond = uncond.repeat_interleave(num_images_per_prompt, dim=0)
            return torch.cat([uncond, cond])

    SeedStableUnCLIPImg2ImgPipeline.__qualname__ = SeedStableUnCLIPImg2ImgPipeline.__name__
    SeedStableUnCLIPImg2ImgPipeline.__module__ = __name__
    return SeedStableUnCLIPImg2ImgPipeline


def seed_unclip_pipeline_class():
    """The unCLIP pipeline class with ``negative_image_embeds`` (imports diffusers)."""
    return _unclip_pipeline_class()


# ------------------------------------------------------------------------------------------ common part
class ImageDecoder:
    """Generation embeddings -> list of PIL images, through a diffusers pipeline (``self.pipeline``).

    Subclasses set ``kind``, the defaults and ``embedding_shape`` (the per-image shape, without batch), and
    implement ``_run`` (one chunk through the pipeline) and ``_load``.
    """

    kind: str = ""
    default_guidance_scale: float
    default_num_inference_steps: int
    #: the keyword options of this kind's ``decode`` beyond the common ones (passed on to ``_run``)
    decode_options: tuple[str, ...] = ()
    #: those of them that hold one row per image (sliced with the batch when ``decode`` chunks it)
    per_image_options: tuple[str, ...] = ()

    def __init__(self, pipeline, *, guidance_scale: float | None = None, num_inference_steps: int | None = None,
                 size: int | tuple[int, int] | None = None, progress: bool = False):
        self.pipeline = pipeline
        self.guidance_scale = float(guidance_scale if guidance_scale is not None else self.default_guidance_scale)
        self.num_inference_steps = int(num_inference_steps or self.default_num_inference_steps)
        if size is None:
            size = self.native_size
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self._empty_text: dict = {}
        pipeline.set_progress_bar_config(disable=not progress)

    def prior_captions(self, text_prior_weight: float | None = None) -> Sequence[Sequence[str]] | None:
        """Per class, the captions a text prior matches the ids against (`SeedTokenizer.decode` then passes
        their scores as ``class_scores``); None: this decoder takes no text prior."""
        return None

    def prior_names_backgrounds(self, text_prior_weight: float | None = None) -> bool:
        """Whether the text prior's caption columns also pick the background (then ``background_scores``)."""
        return False

    # -------------------------------------------------------------------------------------- properties
    # (diffusers' ModelMixin.device/.dtype walk every submodule looking for offload hooks: ms per call)
    @property
    def device(self) -> torch.device:
        return next(self.pipeline.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.pipeline.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    @property
    def native_size(self) -> int:
        """The UNet's training resolution in pixels (768 for SD 2.1 unCLIP, 512 for SD 1.4)."""
        sample = self.pipeline.unet.config.sample_size
        sample = sample if isinstance(sample, int) else sample[0]
        return int(sample) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        # out_channels: a UNet may take extra conditioning channels in (the tiny decoder's coarse image)
        return int(self.pipeline.unet.config.out_channels)

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
        self.pipeline.to(device=device, dtype=resolve_dtype(dtype) if dtype is not None else None)
        self._empty_text.clear()
        return self

    # -------------------------------------------------------------------------------------- load/save
    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, torch_dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, guidance_scale: float | None = None,
                        num_inference_steps: int | None = None, size: int | tuple[int, int] | None = None,
                        progress: bool = False, dtype: str | torch.dtype | None = None,
                        **pipeline_kwargs) -> "ImageDecoder":
        """Load the pipeline from a local folder or a hub id (diffusers' ``from_pretrained``; extra keyword
        arguments, e.g. ``variant="fp16"``, ``local_files_only=True``, go to it). ``torch_dtype`` (or its alias
        ``dtype``, the name diffusers 0.42 and ``SeedTokenizer`` use): fp32 by default. ``size``: default output
        size (None: the UNet's native size). ``guidance_scale``, ``num_inference_steps``: the defaults of
        ``decode`` (None: the preset's)."""
        if torch_dtype is not None and dtype is not None:
            raise ConfigError("give torch_dtype or dtype, not both")
        dtype = resolve_dtype(torch_dtype if torch_dtype is not None else dtype)
        try:
            pipeline = cls._load(str(path_or_id), dtype, **pipeline_kwargs)
        except (OSError, ValueError) as e:
            if isinstance(e, SeedtokError):
                raise
            raise CheckpointError(f"cannot load the {cls.kind} image decoder from {str(path_or_id)!r}: {e}") from e
        if device is not None:
            pipeline.to(device)
        return cls(pipeline, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, size=size,
                   progress=progress)

    @classmethod
    def _load(cls, path: str, dtype: torch.dtype, **kwargs):
        raise NotImplementedError

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write the pipeline as a diffusers folder that both ``from_pretrained`` and stock diffusers read."""
        folder = Path(folder)
        self.pipeline.save_pretrained(folder)
        index = folder / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = self._stock_class_name  # not our subclass: stock diffusers can load it
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return folder

    _stock_class_name = ""

    # -------------------------------------------------------------------------------------------- decode
    def decode(self, embeddings: torch.Tensor, *, seed: int | Sequence[int] | None = None,
               generator: torch.Generator | Sequence[torch.Generator] | None = None,
               latents: torch.Tensor | None = None, guidance_scale: float | None = None,
               num_inference_steps: int | None = None, negative_embeddings: torch.Tensor | None = None,
               height: int | None = None, width: int | None = None, batch_size: int | None = None,
               output_type: str = "pil", **kwargs):
        """Generation embeddings [B, *embedding_shape] (or one, without the batch axis) -> B images.

        seed: an int (every image starts from that seed: image i depends only on embedding i, like the
            reference's one fixed latent) or one int per image. generator: one ``torch.Generator`` per image
            (same effect), or a single one shared by the batch (diffusers' way: then results depend on the
            batch). Neither: torch's global RNG.
        latents: unit-variance initial noise [B or 1, C, height/f, width/f] (scaled by the scheduler's
            ``init_noise_sigma`` here); when given, seeds only drive the remaining noise (unCLIP's embedding
            noise). negative_embeddings: [B or 1, *embedding_shape]; None = the preset's default
            unconditional input. Ignored without guidance (``guidance_scale`` <= 1).
        batch_size: the largest chunk sent through the UNet at once (None: all B). With per-image seeds the
            result does not depend on it.
        output_type: "pil" (a list of PIL images), "np" (float array [B, H, W, 3] in [0, 1]) or "pt" (tensor
            [B, 3, H, W] in [0, 1]).
        """
        unknown = sorted(set(kwargs) - set(self.decode_options))
        if unknown:
            raise DecodeInputError(f"the {self.kind} decoder has no option {', '.join(unknown)}"
                                   + (f" (its own: {', '.join(self.decode_options)})" if self.decode_options else ""))
        emb = self._check(embeddings, "embeddings")
        n = emb.shape[0]
        negative = None if negative_embeddings is None else self._check(negative_embeddings,
                                                                          "negative_embeddings", rows=n)
        height = int(height or self.size[0])
        width = int(width or self.size[1])
        f = self.vae_scale_factor
        if height % f or width % f or height % 8 or width % 8:
            raise DecodeInputError(f"height and width must be multiples of {max(f, 8)}, got {height}x{width}")
        if output_type not in ("pil", "np", "pt"):
            raise DecodeInputError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if n == 0:
            return [] if output_type == "pil" else (
                torch.zeros(0, height, width, 3).numpy() if output_type == "np" else torch.zeros(0, 3, height, width))
        generators = self._generators(n, seed, generator)
        latents = self._latents(n, height, width, generators, latents)
        guidance = float(self.guidance_scale if guidance_scale is None else guidance_scale)
        steps = int(num_inference_steps or self.num_inference_steps)
        chunk = int(batch_size or n)
        out = []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            gens = generators[start:stop] if isinstance(generators, list) else generators
            rows = {k: v[start:stop] if k in self.per_image_options and v is not None else v
                    for k, v in kwargs.items()}
            out.append(self._run(emb[start:stop], None if negative is None else negative[start:stop],
                                 latents[start:stop], gens, guidance, steps, height, width,
                                 "pil" if output_type == "pil" else "pt", **rows))
        if output_type == "pil":
            return [image for part in out for image in part]
        images = torch.cat(out).float()
        return images.permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else images

    __call__ = decode

    # --------------------------------------------------------------------------------------- internals
    def _check(self, x, name: str, rows: int | None = None) -> torch.Tensor:
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            raise DecodeInputError(f"{name} must be floating point, got dtype {x.dtype}")
        shape = self.embedding_shape
        if x.ndim == len(shape):
            x = x[None]
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise DecodeInputError(f"{name} must be [B, {', '.join(map(str, shape))}] for the {self.kind} decoder, "
                                   f"got {tuple(x.shape)}")
        if rows is not None:
            if x.shape[0] not in (1, rows):
                raise DecodeInputError(f"{name} must have 1 or {rows} rows, got {x.shape[0]}")
            x = x.expand(rows, *shape)
        if not torch.isfinite(x).all():
            raise DecodeInputError(f"{name} contain NaN or infinite values")
        return x.to(device=self.device, dtype=self.dtype)

    @staticmethod
    def _generators(n: int, seed, generator):
        if seed is not None and generator is not None:
            raise DecodeInputError("give seed or generator, not both")
        if seed is not None:
            seeds = [int(seed)] * n if isinstance(seed, int) else [int(s) for s in seed]
            if len(seeds) != n:
                raise DecodeInputError(f"got {len(seeds)} seeds for {n} embeddings")
            return [torch.Generator("cpu").manual_seed(s) for s in seeds]
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise DecodeInputError(f"got {len(generator)} generators for {n} embeddings")
            return list(generator)
        return generator

    def _latents(self, n: int, height: int, width: int, generators, latents) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        f = self.vae_scale_factor
        shape = (self.latent_channels, height // f, width // f)
        if latents is None:
            if isinstance(generators, list):  # one draw per image, each from its own generator, on the CPU
                latents = torch.cat([randn_tensor((1, *shape), generator=g, device=torch.device("cpu"),
                                                  dtype=self.dtype) for g in generators])
            else:
                latents = randn_tensor((n, *shape), generator=generators, device=torch.device("cpu"),
                                       dtype=self.dtype)
        else:
            latents = torch.as_tensor(latents)
            if latents.ndim == 3:
                latents = latents[None]
            if latents.ndim != 4 or tuple(latents.shape[1:]) != shape or latents.shape[0] not in (1, n):
                raise DecodeInputError(f"latents must be [{n} or 1, {', '.join(map(str, shape))}] for "
                                       f"{height}x{width} images, got {tuple(latents.shape)}")
            latents = latents.expand(n, *shape)
        return latents.to(device=self.device, dtype=self.dtype)

    def _empty_prompt_embeds(self) -> torch.Tensor:
        """The text encoding of "" [1, L, D], through the pipeline's own ``encode_prompt``; cached per
        device and dtype."""
        key = (str(self.device), self.dtype)
        if key not in self._empty_text:
            embeds, _ = self.pipeline.encode_prompt("", self.device, 1, False)
            self._empty_text[key] = embeds.to(self.dtype)
        return self._empty_text[key]

    def _run(self, embeddings, negative, latents, generators, guidance_scale, steps, height, width, output_type,
             **kwargs):
        raise NotImplementedError


# -------------------------------------------------------------------------------------------- SEED-2
class Seed2UnCLIPDecoder(ImageDecoder):
    """SEED-2: [B, 1024] unCLIP image embeddings -> images with Stable Diffusion 2.1 unCLIP."""

    kind = "seed2"
    decode_options = ("noise_level",)
    default_guidance_scale = 10.0
    default_num_inference_steps = 20
    _stock_class_name = "StableUnCLIPImg2ImgPipeline"

    def __init__(self, pipeline, *, noise_level: int = 0, **kwargs):
        super().__init__(pipeline, **kwargs)
        self.noise_level = int(noise_level)

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        return (int(self.pipeline.image_normalizer.mean.shape[-1]),)

    @classmethod
    def from_pretrained(cls, path_or_id, *, noise_level: int = 0, load_image_encoder: bool = False, **kwargs):
        """``load_image_encoder``: also load the CLIP image encoder and its feature extractor (only needed to
        call ``self.pipeline`` on images; decoding embeddings does not use them)."""
        if not load_image_encoder:
            kwargs.setdefault("image_encoder", None)
            kwargs.setdefault("feature_extractor", None)
        decoder = super().from_pretrained(path_or_id, **kwargs)
        decoder.noise_level = int(noise_level)
        return decoder

    @classmethod
    def _load(cls, path, dtype, **kwargs):
        return _unclip_pipeline_class().from_pretrained(path, dtype=dtype, **kwargs)

    def decode(self, embeddings, *, noise_level: int | None = None, **kwargs):
        """See ``ImageDecoder.decode``; ``noise_level`` (default ``self.noise_level``, 0) is unCLIP's noise on
        the image embedding (and on a given negative one)."""
        return super().decode(embeddings, noise_level=self.noise_level if noise_level is None else int(noise_level),
                              **kwargs)

    __call__ = decode

    def _run(self, embeddings, negative, latents, generators, guidance_scale, steps, height, width, output_type,
             noise_level=0):
        pipe = self.pipeline
        n = embeddings.shape[0]
        # the stock __call__ skips the init_noise_sigma scaling when latents are given; do it here (1 for DDIM)
        pipe.scheduler.set_timesteps(steps, device=self.device)
        latents = latents * pipe.scheduler.init_noise_sigma
        empty = self._empty_prompt_embeds().expand(n, -1, -1)  # empty prompt, for both branches
        return pipe(image_embeds=embeddings, negative_image_embeds=negative, prompt_embeds=empty,
                    negative_prompt_embeds=empty, guidance_scale=guidance_scale, num_inference_steps=steps,
                    noise_level=noise_level, generator=generators, latents=latents, height=height, width=width,
                    output_type=output_type).images


# -------------------------------------------------------------------------------------------- SEED-1
class Seed1SDDecoder(ImageDecoder):
    """SEED-1: [B, 77, 768] text-encoder states -> images with Stable Diffusion 1.4 (PLMS by default)."""

    kind = "seed1"
    default_guidance_scale = 7.5
    default_num_inference_steps = 50
    _stock_class_name = "StableDiffusionPipeline"

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        return (int(self.pipeline.tokenizer.model_max_length), int(self.pipeline.unet.config.cross_attention_dim))

    @classmethod
    def from_pretrained(cls, path_or_id, *, scheduler: str | None = "pndm", safety_checker: bool = False,
                        **kwargs):
        """``scheduler``: "pndm" (default: PLMS, i.e. PNDM with ``skip_prk_steps``, as the reference) or None to
        keep the folder's. ``safety_checker``: load the folder's NSFW checker (off by default)."""
        if not safety_checker:
            kwargs.setdefault("safety_checker", None)
            kwargs.setdefault("feature_extractor", None)
            kwargs.setdefault("requires_safety_checker", False)
        decoder = super().from_pretrained(path_or_id, **kwargs)
        if scheduler == "pndm":
            from diffusers import PNDMScheduler

            decoder.pipeline.scheduler = PNDMScheduler.from_config(decoder.pipeline.scheduler.config,
                                                                   skip_prk_steps=True)
        elif scheduler is not None:
            raise ConfigError(f"unknown scheduler {scheduler!r}; choose 'pndm' or None (keep the folder's)")
        return decoder

    @classmethod
    def _load(cls, path, dtype, **kwargs):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(path, dtype=dtype, **kwargs)

    def _run(self, embeddings, negative, latents, generators, guidance_scale, steps, height, width, output_type):
        n = embeddings.shape[0]
        if negative is None:
            negative = self._empty_prompt_embeds().expand(n, -1, -1)  # unconditional = the encoding of ""
        return self.pipeline(prompt_embeds=embeddings, negative_prompt_embeds=negative,
                             guidance_scale=guidance_scale, num_inference_steps=steps, generator=generators,
                             latents=latents, height=height, width=width, output_type=output_type).images


# ---------------------------------------------------------------------------------------------- tiny
@dataclass
class TinyDecoderConfig:
    """The tiny preset's own decoder: a pixel-space diffusion UNet (diffusers ``UNet2DConditionModel``, no VAE,
    no cross-attention) conditioned on one generation embedding [B, ``embed_dim``], which a small MLP projects
    and adds to the timestep embedding (diffusers' ``class_embed_type="projection"``, as SD 2.1 unCLIP does
    with its image embedding); ``scale_shift`` lets it scale the features, not only shift them. Trained with
    ``DDPMScheduler`` on ``prediction_type`` (x0 by default); sampled with DDIM (trailing timesteps, x0 clipped
    to the pixel range). Classifier-free guidance: the unconditional input is the all-zeros embedding, which condition
    dropout (``cond_dropout``) teaches in training; the teacher embeddings (post-ReLU6 means) are never zero."""

    embed_dim: int = 1280
    image_size: int = 64  # pixels
    # No VAE; instead a fixed, lossless space-to-depth: the UNet works on [3 * p * p, S / p, S / p] (pixel
    # unshuffle), so at p = 2 a 64 px decoder costs about what a 32 px one does
    patch_size: int = 2
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    attention: bool = False  # self-attention blocks at the lowest resolution
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    # "sample" (x0), "v_prediction" or "epsilon". x0: at the same short CPU budget (200 steps x 32) it gives flat
    # backgrounds of the right colour and emoji-coloured shapes where v-prediction still leaves noise
    prediction_type: str = "sample"
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    cond_dropout: float = 0.1  # training: share of embeddings replaced by the null (zeros) embedding
    # Coarse-then-refine (as DiffuseVAE, Pandey et al. 2022: a regression model's blurry image conditions the
    # DDPM): ``coarse_size`` > 0 adds ``CoarseHead``, an MLP (standardised input -> ``coarse_layers`` x
    # ``coarse_hidden`` -> RGB at coarse_size^2) trained by MSE on the downsampled target; its output, upsampled, joins the UNet's input
    # channels. Why: in pixel space alone the UNet must find 1,142 emoji drawings through a 1-vector
    # timestep-embedding shift, and after 2,400 CPU steps it drew blobs (identity 0%); the MLP alone, 3,000
    # steps, drew recognisable emoji (29% top-1 from teacher embeddings, runs/exp/mlpdec.py)
    coarse_size: int = 0
    coarse_hidden: int = 1024
    coarse_layers: int = 1  # hidden layers of the coarse MLP
    # ``coarse_prototypes`` = K > 0 (a named deviation, tiny): the coarse head's MLP picks among K learned
    # RGBA images by a softmax and composites their weighted mix on a colour it also predicts, instead of
    # regressing the pixels. Why: regression paints the average of the emoji an embedding might mean, a blur
    # the scorer cannot name (coarse MLP alone from code embeddings: 1.7% / 5.1% identity top-1 / top-5); the
    # prototype head can commit to one drawing (22.4% / 39.0%, same 1,500 steps; runs/exp9/proto_exp.py,
    # not shipped). The prototypes start as K training targets (``CoarseHead.init_prototypes``)
    coarse_prototypes: int = 0
    # how those K targets are picked: "random", or "kmeans++" (k-means++ seeding on the subjects: K=1,024 of the
    # 24,000 training scenes then cover 881 distinct emoji of 1,142, where the random pick of seed 0 covers 676; coarse
    # head alone, 1,500 steps, test identity top-1 / top-5 at temperature 0.25: 21.1% / 36.1% vs 18.0% /
    # 31.4%; runs/exp10/screen.py, not shipped); or "emoji" (a named deviation, tiny): one prototype per emoji
    # of the world (K = the pool's 1,142), each started from a typical training drawing of it and, with the
    # cross-entropy below, taught towards the scene's own emoji (the emoji world's label, which its caption
    # names) instead of a pixel pseudo-label. Why: K=1,024 picks by pixels cover only 881-890 emoji (k-means++ /
    # farthest-point: one emoji on a light and a dark background masks differently), so the 23.5% of test
    # scenes whose emoji has no prototype were never right, while on the rest the head picked the right emoji
    # for 60.3% (runs/exp11/coverage*.py, not shipped)
    coarse_prototype_init: str = "random"
    # training (a named deviation, tiny): a cross-entropy of this weight on the prototype logits towards each
    # training image's class, added to the pixel MSE: its emoji with the "emoji" init, else its nearest
    # starting prototype (`CoarseHead.nearest_prototypes`: by the subject alone, a pseudo-label found from the
    # pixels). Why: the MSE alone spreads the softmax over look-alikes and the scorer cannot name the blend;
    # the cross-entropy makes the head a classifier over its drawings. Coarse head alone, 1,500 steps, test
    # identity top-1 / top-5 at temperature 0.25, 1,024 k-means++ prototypes: 42.8% / 56.5% with weight 1
    # against 21.1% / 36.1% without; with weight 3 and the background colours below 44.4% / 58.7%
    # (runs/exp11/screen2.py, not shipped); with the "emoji" init (tiny) 60.0% / 74.0%
    coarse_prototype_ce: float = 0.0
    # training (a named deviation, tiny; needs the classes above: the "emoji" init or ``coarse_prototype_ce``):
    # after the steps, each prototype is refit in closed form as the RGBA drawing that best composites into its
    # class's training targets, each on its own border colour (`CoarseHead.fit_prototypes`); the MLP and the
    # colours are kept. Why: trained through the softmax mix, a prototype learns its look-alikes too, and its edges a
    # halo of the backgrounds it was shown on. Bundled head, refit on its 48,000 training scenes, 1,000
    # validation scenes: drawings of the true emoji (forced) scored as it 90.4% -> 97.3%; reconstructions
    # through the codes, identity top-1 / top-5 67.8 / 79.6% -> 71.0 / 82.4% (runs/exp21/eval_protos.py)
    coarse_prototype_refit: bool = False
    # training: an MSE of this weight between the head's background colour and the target's border colour
    # (`border_colour`), so the classifier's pull does not cost the background (which the scorer also reads)
    coarse_background_weight: float = 0.0
    # ``coarse_background_colours`` = C > 0 (a named deviation, tiny): the background is a softmax mix of C learned
    # colours (started as k-means++ picks of the training targets' border colours, `init_background_colours`)
    # weighed by a linear map of the embedding, sharpened at decode like the prototypes, and taught with a
    # cross-entropy of weight ``coarse_background_ce`` towards each target's nearest starting colour. Why: a
    # regressed colour between two likely ones is neither, and the prototype cross-entropy crowds the shared
    # hidden layer. Coarse head alone, as above, test background accuracy: 94.6% with 16 colours against 78.6%
    # with the regressed colour (83.1% with an MSE of weight 10 on it), at prototype cross-entropy 3 or 1
    coarse_background_colours: int = 0
    coarse_background_ce: float = 0.0
    # decoding: the prototype head's softmax temperature (< 1 commits more to the likeliest prototype; training
    # uses 1). Coarse head alone after 1,100 training steps, 500 test scenes: identity top-1 12.6% at 1, 15.4%
    # at 0.25 (runs/exp9/coarse_tau.py, not shipped). Stored in the checkpoint, like guidance_scale
    coarse_temperature: float = 1.0
    # training: the coarse head is cheap and learns from every sample of a batch; the UNet (the cost) from the
    # first ``unet_batch`` of them (0: all)
    unet_batch: int = 0
    # training: Gaussian noise added to the embeddings, as a share of each dimension's batch std, so the decoder
    # also reads the noisier embeddings a de-tokenizer reconstructs from codes
    embed_noise: float = 0.0
    # training target: "scene" (the image as it is) or "centred" (the scorer's view: the subject cropped by the
    # flat background, recentred and scaled to 0.8 of the side: the emoji scorer's `normalize_scene`): a
    # pooled embedding hardly says where the subject was, so scene targets teach a blur over positions
    target: str = "scene"
    # training condition: "teacher" (each training image's teacher embedding, as Stable Diffusion learns from
    # real CLIP embeddings) or "generation" (a named deviation: what a trained tokenizer's de-tokenizer
    # reconstructs from that image's codes, i.e. what `SeedTokenizer.decode` feeds the decoder). The codes
    # cannot say everything the teacher does (where the subject sits, how large), so the de-tokenizer predicts
    # an average embedding the teacher-trained decoder never saw: a coarse head trained on teacher embeddings
    # read the background of the test scenes' code embeddings at 79.4%, one trained on code embeddings at 85.7%
    # (runs/exp7/coarse_exp.py, not shipped)
    condition: str = "teacher"
    # training (with a coarse head): what the UNet's coarse input shows. "head": the head's own drawing (of
    # the same step; at its decode temperature when only the UNet trains). "target" (a named deviation, as the
    # super-resolution stage of cascaded diffusion, Ho et al. 2021): the target itself, downsampled to the
    # head's size as the head's MSE target is, plus Gaussian noise of a std drawn per image from
    # [0, ``coarse_augment``] (their conditioning augmentation), so the UNet learns to render crisply whatever
    # drawing it is given. Why: the head's drawing is often another emoji or another drawing of it than the
    # target, and a UNet taught to correct it from a 1-vector embedding hedges: at decode it added colour
    # fringes and speckle that cost ~8 identity points against the head's drawing alone (runs/exp12/compare.py).
    # With "target", guidance's unconditional half sees the conditional half's drawing (it was trained so)
    unet_condition: str = "head"
    coarse_augment: float = 0.0
    guidance_scale: float = 2.0  # decode defaults, stored in the checkpoint
    num_inference_steps: int = 20
    # decoding (with a coarse head): 1 samples from pure noise; s < 1 starts from the coarse image noised to the
    # level of the last s share of the steps and runs only those (SDEdit; `TinyDecoderPipeline.__call__`)
    strength: float = 1.0
    # decoding (a named deviation, tiny; with prototypes): ``text_prior`` names the captions of each prototype's
    # class (`TEXT_PRIORS`; "" = none), and the coarse head's log-probabilities get ``text_prior_weight`` x
    # log-softmax(cosine / ``text_prior_temperature``) added, where cosine is the best match between the ids'
    # contrastive feature (the tokenizer's reconstruction branch) and the class's captions' text features
    # (`SeedTokenizer.caption_scores`). The ids alone decide both; no training. Why: the head learns 1,142
    # classes from ~21 scenes each, while the tokenizer's image-text alignment reads the name from the
    # frozen text tower's view of it; on the 1,000 validation scenes the head's logits pick the right emoji
    # for 65.6%, the captions alone for 54.6%, both (weight 1, temperature 0.02) for 71.3%
    # (runs/exp20/tune.py, not shipped; 0.01-0.05 and weights 0.5-2 gave 67.8-71.5%)
    text_prior: str = ""
    text_prior_weight: float = 1.0
    text_prior_temperature: float = 0.02
    # decoding (a named deviation, tiny; with background colours and a text prior whose caption columns are
    # background colours, `TEXT_PRIOR_COLOURS`): the background choice hears the captions too: per colour, the
    # best class's cosine (`SeedTokenizer.caption_scores(..., by_column=True)`), as weight x
    # log-softmax(cosine / temperature) (the same weight and temperature) added to the log-probability of each
    # learned background colour nearest that named colour. Why: the captions name the background of 97.4% of
    # the 1,000 validation scenes, the head's palette 94.0%, both 97.1% (runs/exp21/bgprior.py, not shipped)
    text_prior_background: bool = False
    seed: int = 0  # random init


#: named decoder configs: the tiny preset's, and a micro one for tests (the micro tokenizer's 48-d embeddings)
TINY_DECODERS = {
    # 1,142 prototypes (one per emoji) at 30 px: the 20 MB budget holds 1,142 at 30 px, not at 32
    "tiny": lambda: TinyDecoderConfig(embed_dim=1712, coarse_size=30, unet_batch=48, embed_noise=0.2,
                                      target="centred", condition="generation", coarse_prototypes=1142,
                                      coarse_hidden=384, coarse_temperature=0.25,
                                      coarse_prototype_init="emoji", coarse_prototype_ce=3.0,
                                      coarse_background_colours=16, coarse_background_ce=1.0, strength=0.1,
                                      unet_condition="target", coarse_augment=0.1, text_prior="emoji-world",
                                      coarse_prototype_refit=True, text_prior_background=True),
    "micro": lambda: TinyDecoderConfig(embed_dim=48, image_size=16, block_out_channels=(16, 32),
                                       norm_num_groups=8, attention=True, attention_head_dim=8,
                                       num_inference_steps=3, coarse_size=8, coarse_hidden=32, unet_batch=3,
                                       embed_noise=0.2, target="centred", coarse_prototypes=6,
                                       coarse_temperature=0.5, coarse_prototype_ce=1.0, coarse_background_colours=4,
                                       coarse_background_ce=1.0),
}


@functools.lru_cache(maxsize=1)
def _emoji_world_captions() -> tuple[tuple[str, ...], ...]:
    from ..data.emoji import PALETTE, caption_for, pool

    return tuple(tuple(caption_for(emoji.name, colour) for colour in PALETTE) for emoji in pool())


#: ``TinyDecoderConfig.text_prior`` -> the captions of each prototype class, in prototype order ("emoji-world":
#: prototype k is emoji k of the pool, described on every background colour, as the "emoji" init lays out)
TEXT_PRIORS: dict[str, Callable[[], Sequence[Sequence[str]]]] = {"emoji-world": _emoji_world_captions}


def _emoji_world_colours() -> tuple[tuple[int, int, int], ...]:
    from ..data.emoji import PALETTE

    return tuple(PALETTE.values())


#: text priors whose caption columns are background colours: name -> the RGB (0-255) of column j's background
#: (``TinyDecoderConfig.text_prior_background``)
TEXT_PRIOR_COLOURS: dict[str, Callable[[], Sequence[tuple[int, int, int]]]] = {"emoji-world": _emoji_world_colours}


#: the ``TinyDecoderConfig`` fields a decoder stores as its decode defaults (``model_index.json``)
DECODE_SETTINGS = ("guidance_scale", "num_inference_steps", "coarse_temperature", "strength", "text_prior",
                   "text_prior_weight", "text_prior_temperature", "text_prior_background")


#: what the UNet's coarse input shows in training (``TinyDecoderConfig.unet_condition``)
UNET_CONDITIONS = ("head", "target")


#: how a coarse head's prototypes start (`CoarseHead.init_prototypes`, ``TinyDecoderConfig.coarse_prototype_init``)
PROTOTYPE_INITS = ("random", "kmeans++", "emoji")


def _kmeans_plus_plus(features: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` [N, D] by k-means++ seeding (D^2 sampling), deterministic given
    ``generator``. Hand-written: a few lines, where a library would add a dependency for one loop."""
    picks = [int(torch.randint(len(features), (1,), generator=generator))]
    dist = (features - features[picks[0]]).square().sum(1)
    for _ in range(k - 1):
        total = dist.sum()
        nxt = int(torch.multinomial(dist / total, 1, generator=generator)) if total > 0 else \
            int(torch.randint(len(features), (1,), generator=generator))  # all covered: any row
        picks.append(nxt)
        dist = torch.minimum(dist, (features - features[nxt]).square().sum(1))
    return torch.tensor(picks)


def border_colour(rgb: torch.Tensor) -> torch.Tensor:
    """[N, 3]: the per-channel median of each image's border pixels (the flat background of a scene)."""
    return torch.cat([rgb[:, :, 0], rgb[:, :, -1], rgb[:, :, :, 0], rgb[:, :, :, -1]], -1).median(-1).values


@functools.cache
def _coarse_head_class():
    """``CoarseHead`` (a diffusers ModelMixin, so the pipeline saves and loads it as a component). Built on
    first use, like the pipeline class; the module ``__getattr__`` exposes it by name for diffusers' loader."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from torch import nn

    class CoarseHead(ModelMixin, ConfigMixin):
        """Embedding [B, D] -> coarse image [B, 3, size, size] in [-1, 1] units (not clipped). The input is
        standardised per dimension by the training data's statistics (``set_input_stats``; buffers, saved).

        ``prototypes`` = 0: an MLP regresses the pixels. ``prototypes`` = K: the MLP gives K logits and a
        background colour; the image is the softmax-weighted mix of K learned RGBA images (colour, alpha logit)
        composited on that colour, so a confident embedding draws one sharp learned image.
        ``background_colours`` = C > 0 (with prototypes): the background is likewise a softmax mix of C learned
        colours, weighed by a linear map of the input, instead of the MLP's regressed colour."""

        @register_to_config
        def __init__(self, embed_dim: int = 1280, size: int = 32, hidden: int = 1024, layers: int = 1,
                     prototypes: int = 0, background_colours: int = 0):
            super().__init__()
            self.register_buffer("input_mean", torch.zeros(embed_dim))
            self.register_buffer("input_std", torch.ones(embed_dim))
            widths = [embed_dim] + [hidden] * layers
            mlp: list[nn.Module] = []
            for a, b in zip(widths[:-1], widths[1:]):
                mlp += [nn.Linear(a, b), nn.GELU()]
            if background_colours and not prototypes:
                raise ConfigError("background_colours needs prototypes")
            # logits (+ a regressed background colour), or pixels
            outputs = prototypes + (0 if background_colours else 3) if prototypes else 3 * size * size
            self.net = nn.Sequential(*mlp, nn.Linear(hidden, outputs))
            if prototypes:
                self.prototype_images = nn.Parameter(0.1 * torch.randn(prototypes, 4, size, size))
            if background_colours:
                self.background_logits = nn.Linear(embed_dim, background_colours)
                self.background_palette = nn.Parameter(torch.zeros(background_colours, 3))

        @torch.no_grad()
        def set_input_stats(self, embeds: torch.Tensor) -> None:
            """Standardise inputs by these embeddings' per-dimension mean and std (training data)."""
            embeds = embeds.float()
            self.input_mean.copy_(embeds.mean(0))
            self.input_std.copy_(embeds.std(0).clamp(min=1e-3))

        @torch.no_grad()
        def init_prototypes(self, images: torch.Tensor, seed: int = 0, threshold: float = 0.19,
                            method: str = "random", labels: torch.Tensor | None = None) -> torch.Tensor:
            """Start the prototypes as K of these training targets [N, 3, H, W] (uint8, or floats in [-1, 1];
            area-resized to the head's size), opaque (alpha logit +3) where a pixel differs from the image's
            median border colour by more than ``threshold`` (~24/255) in some channel and transparent (-3)
            elsewhere: the data start of a codebook, so training refines drawings instead of finding them.
            ``method``: "random" picks K at random (``seed``); "kmeans++" picks them by k-means++ seeding
            (Arthur & Vassilvitskii 2007: each next pick drawn with probability proportional to its squared
            distance from the nearest pick) on the subjects alone (`subject_features`), so K picks cover more
            distinct subjects than K random ones do; "emoji" (with ``labels`` [N], each image's class in 0..K-1)
            starts prototype k as the image of class k whose subject is nearest its class's mean subject (a
            typical drawing), or as a random image where class k has none. Returns the picked rows of ``images``."""
            k = self.config.prototypes
            if not k:
                raise ValueError("this coarse head has no prototypes")
            if method not in PROTOTYPE_INITS:
                raise ConfigError(f"unknown prototype init {method!r}; choose {', '.join(PROTOTYPE_INITS)}")
            if method == "emoji":
                if labels is None or labels.shape != (len(images),):
                    raise ConfigError("the emoji prototype init needs one label per training image")
                if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < k:
                    raise ConfigError(f"emoji labels must lie in 0..{k - 1} (one prototype per emoji), got "
                                      f"{int(labels.min())}..{int(labels.max())}")
            elif len(images) < k:
                raise ConfigError(f"{k} coarse prototypes need at least {k} training images, got {len(images)}: "
                                  f"use more data or fewer coarse_prototypes")
            generator = torch.Generator().manual_seed(seed)
            if method == "random":
                pick = torch.randperm(len(images), generator=generator)[:k]
            elif method == "emoji":
                features = self.subject_features(images, threshold)
                labels = labels.long()
                pick = torch.randint(len(images), (k,), generator=generator)
                for label in labels.unique().tolist():
                    members = (labels == label).nonzero()[:, 0]
                    own = features[members]
                    pick[label] = members[(own - own.mean(0)).square().sum(1).argmin()]
            else:
                pick = _kmeans_plus_plus(self.subject_features(images, threshold), k, generator)
            rgb, opaque = self._subjects(images[pick], threshold)
            self.prototype_images.copy_(torch.cat([rgb, opaque * 6 - 3], 1).to(self.prototype_images.dtype))
            return pick

        def subject_features(self, images: torch.Tensor, threshold: float = 0.19) -> torch.Tensor:
            """[N, 4 * (s/2)^2]: each image's subject alone (colour where opaque, and the opacity mask) at half
            the head's size s, so two scenes of one emoji on different backgrounds have equal features."""
            rgb, opaque = self._subjects(images, threshold)
            return torch.nn.functional.avg_pool2d(torch.cat([rgb * opaque, opaque], 1), 2).flatten(1)

        @torch.no_grad()
        def nearest_prototypes(self, images: torch.Tensor, pick: torch.Tensor, threshold: float = 0.19,
                               chunk: int = 4096) -> torch.Tensor:
            """[N] long: for each image, the prototype (index into ``pick``, the rows `init_prototypes`
            returned) whose starting subject is nearest to its own (`subject_features`, Euclidean): the
            class the prototype cross-entropy (``TinyDecoderConfig.coarse_prototype_ce``) teaches."""
            features = self.subject_features(images, threshold)
            picked = features[pick]
            return torch.cat([torch.cdist(features[i:i + chunk], picked).argmin(1)
                              for i in range(0, len(features), chunk)])

        @torch.no_grad()
        def fit_prototypes(self, images: torch.Tensor, labels: torch.Tensor, ridge: float = 1.0,
                           chunk: int = 4096) -> int:
            """Set each prototype to the RGBA drawing that best composites into its class's training targets:
            per class k and pixel, the least-squares (colour c, alpha a) of ``a c + (1 - a) b_i ≈ x_i`` over
            the images i labelled k (``labels`` [N] in 0..K-1), each on its own border colour b_i
            (`border_colour`), at the head's size. Linear in (a c, a), so closed form: one 4x4 solve per class
            shared by all pixels. Alpha and colour are told apart because a class's scenes lie on several
            backgrounds; ``ridge`` pulls towards the current prototype (for a class seen on one colour only).
            Classes with no image keep theirs. Returns how many prototypes were refit.
            Why (``TinyDecoderConfig.coarse_prototype_refit``): trained through the softmax mix, a prototype
            also learns the look-alikes it was mixed with, and its edges a halo of background colours; given
            the true emoji, the bundled head's drawings were scored as it for 90.4% of the validation scenes,
            the refit ones for 97.3% (runs/exp21/oracle.py, eval_protos.py; not shipped)."""
            k, size = self.config.prototypes, self.config.size
            if not k:
                raise ValueError("this coarse head has no prototypes")
            labels = labels.long()
            if labels.shape != (len(images),) or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < k):
                raise ConfigError(f"fit_prototypes needs one label in 0..{k - 1} per image")
            targets = torch.cat([self._resized(images[i:i + chunk]) for i in range(0, len(images), chunk)])
            borders = border_colour(targets)
            current = self.prototype_images.detach().float()
            alpha = current[:, 3].sigmoid()
            start = torch.cat([current[:, :3] * alpha[:, None], alpha[:, None]], 1).flatten(2)  # [K, 4, s*s]
            eye = torch.eye(3)
            fitted = 0
            for label in labels.unique().tolist():
                members = (labels == label).nonzero()[:, 0]
                b = borders[members]  # [n, 3]
                # rows (image, channel): premultiplied colour u_ch - a b_ch = x_ch - b_ch
                design = torch.cat([eye.repeat(len(members), 1), -b.reshape(-1, 1)], 1)  # [3n, 4]
                rhs = (targets[members] - b[:, :, None, None]).flatten(2).reshape(-1, size * size)
                x = torch.linalg.solve(design.T @ design + ridge * torch.eye(4),
                                       design.T @ rhs + ridge * start[label])
                a = x[3].clamp(1e-3, 1 - 1e-3)
                # where nearly transparent, the colour is unidentified: keep the current one
                colour = torch.where(a > 0.05, x[:3] / a, current[label, :3].flatten(1)).clamp(-1, 1)
                self.prototype_images[label] = torch.cat([colour, torch.logit(a).clamp(-6, 6)[None]]).view(
                    4, size, size).to(self.prototype_images.dtype)
                fitted += 1
            return fitted

        def _resized(self, images: torch.Tensor) -> torch.Tensor:
            """Images (uint8, or floats in [-1, 1]) -> RGB in [-1, 1], area-resized to the head's size."""
            rgb = images.float()
            if images.dtype == torch.uint8:
                rgb = rgb / 127.5 - 1
            size = self.config.size
            if rgb.shape[-2:] != (size, size):
                rgb = torch.nn.functional.interpolate(rgb, size=(size, size), mode="area")
            return rgb

        def _subjects(self, images: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
            """Images -> (RGB in [-1, 1] at the head's size, [N, 1, s, s] mask of pixels off the border colour)."""
            rgb = self._resized(images)
            opaque = (rgb - border_colour(rgb)[:, :, None, None]).abs().amax(1, keepdim=True) > threshold
            return rgb, opaque.float()

        @torch.no_grad()
        def init_background_colours(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
            """Start the C background colours as the border colours (`border_colour`) of C of these training
            targets picked by k-means++ seeding, so they span the backgrounds seen; returns the picked rows."""
            c = self.config.background_colours
            if not c:
                raise ValueError("this coarse head has no background colours")
            borders = self.image_borders(images)
            pick = _kmeans_plus_plus(borders, c, torch.Generator().manual_seed(seed))
            self.background_palette.copy_(borders[pick].to(self.background_palette.dtype))
            return pick

        def image_borders(self, images: torch.Tensor) -> torch.Tensor:
            """[N, 3] in [-1, 1]: each image's border colour at the head's size."""
            return border_colour(self._resized(images))

        @torch.no_grad()
        def nearest_background_colours(self, images: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
            """[N] long: for each image, the starting background colour (index into ``pick``, the rows
            `init_background_colours` returned) nearest its own border colour: the class
            ``TinyDecoderConfig.coarse_background_ce`` teaches."""
            borders = self.image_borders(images)
            return torch.cdist(borders, borders[pick]).argmin(1)

        def forward(self, embeds: torch.Tensor, temperature: float = 1.0, return_parts: bool = False,
                    log_prior: torch.Tensor | None = None, background_log_prior: torch.Tensor | None = None):
            """``temperature``: the prototype softmax's (decoding may sharpen it; no effect without
            prototypes). ``log_prior`` [B, K] (decoding): added to the prototypes' log-probabilities before
            that softmax; ``background_log_prior`` [B, C] likewise to the background colours'.
            ``return_parts`` (prototypes only, training): (image, the K logits, the background colour [B, 3]
            in [-1, 1], the C background logits or None)."""
            size, k = self.config.size, self.config.prototypes
            x = (embeds - self.input_mean.to(embeds.dtype)) / self.input_std.to(embeds.dtype)
            out = self.net(x)
            if not k:
                return out.view(-1, 3, size, size)
            logits = out[:, :k]
            if log_prior is not None:
                logits = logits.log_softmax(-1) + log_prior.to(logits.dtype)
            weights = (logits / temperature).softmax(-1)
            mix = torch.einsum("bk,kchw->bchw", weights, self.prototype_images.to(out.dtype))
            alpha = mix[:, 3:].sigmoid()
            background_logits = None
            if self.config.background_colours:
                background_logits = self.background_logits(x)
                choice = background_logits
                if background_log_prior is not None:
                    choice = choice.log_softmax(-1) + background_log_prior.to(choice.dtype)
                background = (choice / temperature).softmax(-1) @ self.background_palette.to(out.dtype)
            else:
                background = torch.tanh(out[:, k:])
            image = alpha * mix[:, :3] + (1 - alpha) * background[:, :, None, None]
            return (image, out[:, :k], background, background_logits) if return_parts else image

    CoarseHead.__module__ = __name__
    return CoarseHead


def __getattr__(name: str):
    # diffusers' pipeline loader finds a component's class by module and name (model_index.json:
    # ["seedtok.models.image_decoder", "CoarseHead"]), then its loading method by looking up base classes such as
    # ``ModelMixin`` in the same module; both resolve lazily here, so importing seedtok stays diffusers-free
    if name == "CoarseHead":
        return _coarse_head_class()
    if name == "ModelMixin":
        from diffusers import ModelMixin

        return ModelMixin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiny_decoder_config(name: str) -> TinyDecoderConfig:
    try:
        return TINY_DECODERS[name]()
    except KeyError:
        raise ConfigError(f"no tiny decoder config {name!r}; choose one of {', '.join(TINY_DECODERS)}") from None


@functools.cache
def _tiny_pipeline_class():
    """``TinyDecoderPipeline``: a UNet and a scheduler, embeddings in, images out. Built on first use (diffusers
    is imported lazily). Its non-module settings (guidance, steps) are registered in ``model_index.json``."""
    from diffusers import DiffusionPipeline, ImagePipelineOutput
    from diffusers.utils.torch_utils import randn_tensor

    class TinyDecoderPipeline(DiffusionPipeline):
        model_cpu_offload_seq = "coarse->unet"
        _optional_components = ["coarse"]

        def __init__(self, unet, scheduler, coarse=None, guidance_scale: float = 2.0, num_inference_steps: int = 20,
                     cond_dropout: float = 0.1, patch_size: int = 1, coarse_temperature: float = 1.0,
                     strength: float = 1.0, unet_condition: str = "head", text_prior: str = "",
                     text_prior_weight: float = 1.0, text_prior_temperature: float = 0.02,
                     text_prior_background: bool = False):
            super().__init__()
            if text_prior and text_prior not in TEXT_PRIORS:
                raise ConfigError(f"unknown text_prior {text_prior!r}; choose one of {', '.join(TEXT_PRIORS)}")
            if text_prior_background and (text_prior not in TEXT_PRIOR_COLOURS or coarse is None
                                          or not coarse.config.background_colours):
                raise ConfigError("text_prior_background needs a text prior whose captions name background colours "
                                  f"({', '.join(TEXT_PRIOR_COLOURS)}) and a coarse head with background colours")
            if unet_condition not in UNET_CONDITIONS:
                raise ConfigError(f"unknown unet_condition {unet_condition!r}; choose "
                                  f"{' or '.join(UNET_CONDITIONS)}")
            self.register_modules(unet=unet, scheduler=scheduler, coarse=coarse)
            self.register_to_config(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                                    cond_dropout=cond_dropout, patch_size=patch_size,
                                    coarse_temperature=coarse_temperature, strength=strength,
                                    unet_condition=unet_condition, text_prior=text_prior,
                                    text_prior_weight=text_prior_weight,
                                    text_prior_temperature=text_prior_temperature,
                                    text_prior_background=text_prior_background)
            self.vae_scale_factor = patch_size  # pixels per latent cell (space-to-depth, no VAE)

        def to_latents(self, pixels: torch.Tensor) -> torch.Tensor:
            """Pixels [B, 3, H, W] in [-1, 1] -> the UNet's space [B, 3 p^2, H / p, W / p] (lossless)."""
            p = self.config.patch_size
            return torch.nn.functional.pixel_unshuffle(pixels, p) if p > 1 else pixels

        def to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
            p = self.config.patch_size
            return torch.nn.functional.pixel_shuffle(latents, p) if p > 1 else latents

        def coarse_latents(self, embeddings: torch.Tensor, height: int, width: int,
                           class_scores: torch.Tensor | None = None, text_prior_weight: float | None = None,
                           background_scores: torch.Tensor | None = None) -> torch.Tensor | None:
            """The coarse head's image for the embeddings, upsampled to the output size, in the UNet's space
            (None without a coarse head). ``class_scores`` [B, K]: the text prior's cosines
            (``TinyDecoderConfig.text_prior``), weighed by ``text_prior_weight`` (default: the config's) and
            the config's temperature; ``background_scores`` [B, C]: its cosines per background colour
            (``text_prior_background``), likewise."""
            if self.coarse is None:
                return None
            rows, device = embeddings.shape[0], embeddings.device
            log_prior = self.text_log_prior(class_scores, rows, text_prior_weight)
            background = self.background_log_prior(background_scores, rows, text_prior_weight)
            coarse = self.coarse(embeddings, temperature=self.config.coarse_temperature,
                                 log_prior=None if log_prior is None else log_prior.to(device),
                                 background_log_prior=None if background is None else background.to(device))
            return self.upsample_coarse(coarse, height, width)

        def background_log_prior(self, background_scores: torch.Tensor | None, rows: int,
                                 text_prior_weight: float | None = None) -> torch.Tensor | None:
            """The text prior's term [rows, C] for the coarse head's background colours: `_prior_term` of
            the scores over the prior's named colours, each learned colour taking that of its nearest named
            one (`background_colour_names`); None without scores, at weight 0 or when
            ``text_prior_background`` is off."""
            if not self.config.get("text_prior_background", False):
                return None
            colours = len(TEXT_PRIOR_COLOURS[self.config.text_prior]())
            term = self._prior_term(background_scores, text_prior_weight, (rows, colours), "background_scores",
                                    f"the text prior's {colours} background colours")
            return None if term is None else term[:, self.background_colour_names()]

        def background_colour_names(self) -> torch.Tensor:
            """[C] long: for each of the coarse head's learned background colours, its nearest (RGB) named
            colour of the text prior (`TEXT_PRIOR_COLOURS`: caption column j shows colour j)."""
            named = torch.tensor(TEXT_PRIOR_COLOURS[self.config.text_prior](), dtype=torch.float32) / 127.5 - 1
            return torch.cdist(self.coarse.background_palette.detach().float().cpu(), named).argmin(1)

        def text_log_prior(self, class_scores: torch.Tensor | None, rows: int,
                           text_prior_weight: float | None = None) -> torch.Tensor | None:
            """The text prior's term [rows, K] for the coarse head's log-probabilities (`_prior_term`); None
            without scores or at weight 0."""
            k = self.coarse.config.prototypes
            return self._prior_term(class_scores, text_prior_weight, (rows, k), "class_scores",
                                    f"this decoder's {k} prototypes")

        def _prior_term(self, scores: torch.Tensor | None, text_prior_weight: float | None,
                        shape: tuple[int, int], name: str, what: str) -> torch.Tensor | None:
            """weight x log-softmax(scores / ``text_prior_temperature``) (weight: ``text_prior_weight``,
            default the config's); None without scores or at weight 0."""
            weight = self.config.text_prior_weight if text_prior_weight is None else float(text_prior_weight)
            if scores is None or not weight:
                return None
            if tuple(scores.shape) != shape:
                raise DecodeInputError(f"{name} must be [{shape[0]}, {shape[1]}] for {what}, "
                                       f"got {tuple(scores.shape)}")
            return weight * (scores.float() / self.config.text_prior_temperature).log_softmax(-1)

        def upsample_coarse(self, coarse: torch.Tensor, height: int, width: int) -> torch.Tensor:
            """A coarse image [B, 3, c, c] -> bilinearly upsampled to the output size, in the UNet's space."""
            coarse = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear",
                                                     align_corners=False)
            return self.to_latents(coarse)

        def predict(self, sample, timestep, embeddings, coarse=None):
            """The UNet's output for noisy pixels and embeddings (no guidance); ``coarse``: `coarse_latents`."""
            if coarse is not None:
                sample = torch.cat([sample, coarse.to(sample.dtype)], dim=1)
            return self.unet(sample, timestep, encoder_hidden_states=None, class_labels=embeddings).sample

        @torch.no_grad()
        def __call__(self, image_embeds: torch.Tensor, negative_image_embeds: torch.Tensor | None = None,
                     guidance_scale: float | None = None, num_inference_steps: int | None = None,
                     generator=None, latents: torch.Tensor | None = None, height: int | None = None,
                     width: int | None = None, output_type: str = "pil", eta: float = 0.0,
                     return_dict: bool = True, strength: float | None = None,
                     class_scores: torch.Tensor | None = None, text_prior_weight: float | None = None,
                     background_scores: torch.Tensor | None = None):
            """``class_scores`` [B, K], ``background_scores`` [B, C] and ``text_prior_weight``: the text prior
            for the coarse head (`coarse_latents`).
            ``strength`` < 1 (with a coarse head; SDEdit, Meng et al. 2022, as diffusers' img2img
            ``strength``): sampling starts from the coarse image noised to the level of the last
            ``strength`` share of the timesteps and runs only those, so the UNet refines the head's drawing
            instead of redrawing it from noise (``latents``, when given, are that noise)."""
            strength = float(self.config.strength if strength is None else strength)
            if not 0.0 < strength <= 1.0:
                raise DecodeInputError(f"strength must lie in (0, 1], got {strength}")
            unet = self.unet
            param = next(unet.parameters())
            device, dtype = param.device, param.dtype
            guidance = float(self.config.guidance_scale if guidance_scale is None else guidance_scale)
            steps = int(num_inference_steps or self.config.num_inference_steps)
            p = self.config.patch_size
            size = unet.config.sample_size * p
            height, width = int(height or size), int(width or size)
            emb = image_embeds.to(device, dtype)
            n = emb.shape[0]
            if latents is None:
                latents = randn_tensor((n, unet.config.out_channels, height // p, width // p), generator=generator,
                                       device=device, dtype=dtype)
                latents = latents * self.scheduler.init_noise_sigma
            latents = latents.to(device, dtype)
            cfg = guidance > 1.0
            if cfg:
                negative = torch.zeros_like(emb) if negative_image_embeds is None else \
                    negative_image_embeds.to(device, dtype).expand_as(emb)
                cond = torch.cat([negative, emb])
            else:
                cond = emb
            if cfg and self.config.unet_condition == "target" and self.coarse is not None:
                # a UNet trained on the target's own drawing saw it with dropped embeddings too: guidance then
                # contrasts the embedding alone, not also the null embedding's drawing
                coarse = self.coarse_latents(emb, height, width, class_scores, text_prior_weight, background_scores)
                coarse = torch.cat([coarse, coarse])
            elif cfg and (class_scores is not None or background_scores is not None):
                # the prior informs the conditional half only
                coarse = torch.cat([self.coarse_latents(negative, height, width),
                                    self.coarse_latents(emb, height, width, class_scores, text_prior_weight,
                                                        background_scores)])
            else:
                coarse = self.coarse_latents(cond, height, width, class_scores, text_prior_weight, background_scores)
            self.scheduler.set_timesteps(steps, device=device)
            timesteps = self.scheduler.timesteps
            if strength < 1.0 and coarse is not None:
                timesteps = timesteps[steps - max(1, round(steps * strength)):]
                start = coarse[n:] if cfg else coarse  # the conditional half's drawing
                latents = self.scheduler.add_noise(start, latents / self.scheduler.init_noise_sigma,
                                                   timesteps[:1].expand(n))
            extra = {}
            params = inspect.signature(self.scheduler.step).parameters
            if "eta" in params:
                extra["eta"] = eta
            if "generator" in params:
                extra["generator"] = generator
            for t in self.progress_bar(timesteps):
                model_input = torch.cat([latents, latents]) if cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                out = self.predict(model_input, t, cond, coarse)
                if cfg:
                    uncond, conditional = out.chunk(2)
                    out = uncond + guidance * (conditional - uncond)
                latents = self.scheduler.step(out, t, latents, **extra).prev_sample
            images = (self.to_pixels(latents.float()) / 2 + 0.5).clamp(0, 1)
            if output_type == "pil":
                images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
            elif output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            if not return_dict:
                return (images,)
            return ImagePipelineOutput(images=images)

    TinyDecoderPipeline.__qualname__ = TinyDecoderPipeline.__name__
    TinyDecoderPipeline.__module__ = __name__
    return TinyDecoderPipeline


def tiny_pipeline_class():
    """The tiny decoder's pipeline class (imports diffusers)."""
    return _tiny_pipeline_class()


def build_tiny_pipeline(config: TinyDecoderConfig | str = "tiny"):
    """A randomly initialised tiny decoder pipeline (``config`` or a ``TINY_DECODERS`` name); same init for the
    same config."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    cfg = tiny_decoder_config(config) if isinstance(config, str) else config
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    if cfg.target not in ("scene", "centred"):
        raise ConfigError(f"decoder target must be 'scene' or 'centred', not {cfg.target!r}")
    channels = 3 * cfg.patch_size ** 2
    levels = len(cfg.block_out_channels)
    down, up = ["DownBlock2D"] * levels, ["UpBlock2D"] * levels
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = UNet2DConditionModel(
            sample_size=cfg.image_size // cfg.patch_size, in_channels=channels * (2 if cfg.coarse_size else 1),
            out_channels=channels,
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            down_block_types=tuple(down), up_block_types=tuple(up), mid_block_type="UNetMidBlock2D",
            class_embed_type="projection", projection_class_embeddings_input_dim=cfg.embed_dim,
            resnet_time_scale_shift="scale_shift", norm_num_groups=cfg.norm_num_groups,
            attention_head_dim=cfg.attention_head_dim)
        coarse = _coarse_head_class()(embed_dim=cfg.embed_dim, size=cfg.coarse_size, hidden=cfg.coarse_hidden,
                                      layers=cfg.coarse_layers, prototypes=cfg.coarse_prototypes,
                                      background_colours=cfg.coarse_background_colours) \
            if cfg.coarse_size else None
    # trailing timesteps: the first sampling step starts from (almost) pure noise, as training's last t
    scheduler = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                              prediction_type=cfg.prediction_type, clip_sample=True, clip_sample_range=1.0,
                              timestep_spacing="trailing", set_alpha_to_one=True)
    pipeline = _tiny_pipeline_class()(unet=unet.eval(), scheduler=scheduler,
                                      coarse=coarse.eval() if coarse is not None else None,
                                      cond_dropout=cfg.cond_dropout, patch_size=cfg.patch_size,
                                      unet_condition=cfg.unet_condition,
                                      **{name: getattr(cfg, name) for name in DECODE_SETTINGS})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class TinyDecoder(ImageDecoder):
    """The tiny preset: [B, 1712] generation embeddings -> 64x64 images, with its own small pixel-space
    diffusion UNet (``TinyDecoderConfig``). Same ``decode`` contract as the paper decoders, plus ``strength``
    (default: the checkpoint's, ``TinyDecoderConfig.strength``): in (0, 1], the share of the denoising steps run
    from the noised coarse image (1: from pure noise; `TinyDecoderPipeline.__call__`)."""

    kind = "tiny"
    decode_options = ("strength", "class_scores", "text_prior_weight", "background_scores")
    per_image_options = ("class_scores", "background_scores")
    default_guidance_scale = 2.0
    default_num_inference_steps = 20
    _stock_class_name = "TinyDecoderPipeline"

    def __init__(self, pipeline, *, guidance_scale: float | None = None, num_inference_steps: int | None = None,
                 **kwargs):
        # the checkpoint's own defaults (model_index.json) unless the caller overrides them
        super().__init__(pipeline, guidance_scale=pipeline.config.guidance_scale if guidance_scale is None
                         else guidance_scale,
                         num_inference_steps=num_inference_steps or pipeline.config.num_inference_steps, **kwargs)

    @classmethod
    def random(cls, config: TinyDecoderConfig | str = "tiny", **kwargs) -> "TinyDecoder":
        """A randomly initialised decoder (training starts here; tests)."""
        return cls(build_tiny_pipeline(config), **kwargs)

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        return (int(self.pipeline.unet.config.projection_class_embeddings_input_dim),)

    def prior_captions(self, text_prior_weight: float | None = None) -> Sequence[Sequence[str]] | None:
        """Per prototype class, the captions its text prior matches the ids against; None when it has no
        prior or its weight (``text_prior_weight``, default: the checkpoint's) is 0."""
        config = self.pipeline.config
        name = config.get("text_prior", "")
        weight = config.get("text_prior_weight", 0.0) if text_prior_weight is None else text_prior_weight
        if not name or not weight or self.pipeline.coarse is None:
            return None
        return TEXT_PRIORS[name]()

    def prior_names_backgrounds(self, text_prior_weight: float | None = None) -> bool:
        """Whether the text prior also picks the background (``TinyDecoderConfig.text_prior_background``):
        then `SeedTokenizer.decode` passes ``background_scores`` too, per caption column its best class's
        cosine."""
        return self.prior_captions(text_prior_weight) is not None and \
            bool(self.pipeline.config.get("text_prior_background", False))

    @classmethod
    def _load(cls, path, dtype, **kwargs):
        if not (Path(path) / "model_index.json").is_file():
            raise CheckpointError(f"no tiny image decoder in {path} (no model_index.json)")
        return _tiny_pipeline_class().from_pretrained(path, dtype=dtype, **kwargs)

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
        """Write the diffusers folder (``model_index.json``, ``unet/``, ``scheduler/``; safetensors). ``dtype``
        casts the stored weights (e.g. fp16 to bundle them) without changing this decoder's."""
        folder = Path(folder)
        unet, coarse = self.pipeline.unet, self.pipeline.coarse
        cast = resolve_dtype(dtype) if dtype is not None else None
        if cast is not None and cast != self.dtype:
            import copy

            def cast_copy(module):
                module = copy.deepcopy(module)
                for tensor in [*module.parameters(), *module.buffers()]:  # (ModelMixin.to warns about fp16)
                    if tensor.is_floating_point():
                        tensor.data = tensor.data.to(cast)
                return module

            unet = cast_copy(unet)
            coarse = cast_copy(coarse) if coarse is not None else None
        pipeline_class = _tiny_pipeline_class()
        settings = set(inspect.signature(pipeline_class.__init__).parameters) - {"self", "unet", "scheduler", "coarse"}
        pipeline = pipeline_class(unet=unet, scheduler=self.pipeline.scheduler, coarse=coarse,
                                  **{k: self.pipeline.config[k] for k in settings if k in self.pipeline.config})
        return atomic_write_folder(folder, lambda tmp: pipeline.save_pretrained(tmp, safe_serialization=True))

    def _run(self, embeddings, negative, latents, generators, guidance_scale, steps, height, width, output_type,
             strength=None, class_scores=None, text_prior_weight=None, background_scores=None):
        latents = latents * self.pipeline.scheduler.init_noise_sigma  # 1 for DDIM; unit-variance noise given
        return self.pipeline(image_embeds=embeddings, negative_image_embeds=negative, guidance_scale=guidance_scale,
                             num_inference_steps=steps, generator=generators, latents=latents, height=height,
                             width=width, output_type=output_type, strength=strength,
                             class_scores=class_scores, text_prior_weight=text_prior_weight,
                             background_scores=background_scores).images


# ------------------------------------------------------------------------------------------- registry
#: kind -> decoder class
DECODERS: dict[str, type[ImageDecoder]] = {"seed2": Seed2UnCLIPDecoder, "seed1": Seed1SDDecoder, "tiny": TinyDecoder}


def build_image_decoder(kind: str, path: str | os.PathLike, **kwargs) -> ImageDecoder:
    """The image decoder of a preset (``"seed2"``: SD 2.1 unCLIP, ``"seed1"``: SD 1.4, ``"tiny"``: the tiny
    preset's own), loaded from a local folder or hub id; keyword arguments go to its ``from_pretrained``."""
    try:
        cls = DECODERS[kind]
    except KeyError:
        raise ConfigError(f"unknown image decoder {kind!r}; choose one of {sorted(DECODERS)}") from None
    return cls.from_pretrained(path, **kwargs)


# ------------------------------------------------------------------------------- random tiny pipelines
def _byte_level_clip_tokenizer(max_length: int):
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (plain and word-final) and no merges: no
    files, no downloads. The byte -> symbol table is CLIP's (GPT-2's) byte-level alphabet."""
    from transformers import CLIPTokenizer

    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    symbols = [chr(b) for b in kept] + [chr(256 + i) for i in range(256 - len(kept))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for s in symbols:
            vocab[s + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_random_pipeline(kind: str, folder: str | os.PathLike | None = None, *, seed: int = 0,
                          channels: tuple[int, int] = (16, 32), sample_size: int = 8, embed_dim: int = 16,
                          text_dim: int = 32, max_length: int = 77, with_image_encoder: bool = False):
    """A tiny randomly initialised pipeline of the preset's architecture, for tests and benchmarks: a 2-level
    UNet (``channels``, one layer per block, cross-attention at the top level), a 2-level VAE (pixel size =
    2 x ``sample_size``), a 1-layer CLIP text encoder over a byte-level tokenizer; for "seed2" also the unCLIP
    embedding normaliser and noising scheduler (``embed_dim``-d image embeddings, the UNet's class embedding
    projects embedding + noise-level code) and DDIM; for "seed1" DDIM too (so the PLMS swap is visible).
    ``folder``: also save it there (the stock diffusers layout)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                           StableUnCLIPImg2ImgPipeline, UNet2DConditionModel)
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind not in ("seed1", "seed2"):
        raise ConfigError(f"unknown image decoder {kind!r}; choose 'seed1' or 'seed2'")
    groups = min(8, channels[0])
    torch.manual_seed(seed)
    tokenizer = _byte_level_clip_tokenizer(max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=max_length, projection_dim=text_dim, bos_token_id=0,
        eos_token_id=1, pad_token_id=1)).eval()
    unclip = {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 2 * embed_dim} \
        if kind == "seed2" else {}
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=4, norm_num_groups=groups, **unclip).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=2 * sample_size).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if kind == "seed2":
        image_encoder = feature_extractor = None
        if with_image_encoder:  # only the stock pipeline needs one (it reads its dtype)
            from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                patch_size=16, projection_dim=embed_dim)).eval()
            feature_extractor = CLIPImageProcessor(crop_size=32, size=32)
        normalizer = StableUnCLIPImageNormalizer(embedding_dim=embed_dim)
        with torch.no_grad():  # a non-trivial normalisation, so scale/unscale matter
            normalizer.mean.normal_(0, 0.5)
            normalizer.std.uniform_(0.5, 1.5)
        pipeline = StableUnCLIPImg2ImgPipeline(
            feature_extractor=feature_extractor, image_encoder=image_encoder, image_normalizer=normalizer,
            image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=tokenizer,
            text_encoder=text_encoder, unet=unet, scheduler=scheduler, vae=vae)
    else:
        pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    if folder is not None:
        pipeline.save_pretrained(folder)
    return pipeline
