"""``SeedTokenizer``: image -> 32 causal ids -> generation embeddings, in one checkpoint folder.

    image -> preprocess -> vision encoder -> causal Q-Former -> quantizer -> ids [B, 32]
    ids -> codebook vectors -> de-tokenizer -> generation embeddings (unCLIP 1024 / SD-1 77x768 / tiny 1712)
    generation embeddings -> image decoder (diffusion, loaded lazily from ``<checkpoint>/decoder``) -> images
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import PRESETS, TokenizerConfig, preset, resolve_dtype
from ..data.transforms import ImageInput, load_image, preprocess
from ..errors import CheckpointError, ConfigError, IdsError
from ..fileio import atomic_write, cache_dir
from .detokenizer import build_detokenizer
from .qformer import QFormer
from .quantizer import QuantizerOutput, VectorQuantizer
from .vision import build_vision

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DECODER_DIR = "decoder"  # the image decoder's sub-folder of a checkpoint (a diffusers folder)
# generation teacher -> the image decoder that paints its embeddings
_DECODER_KIND = {"unclip": "seed2", "sd1_text": "seed1", "vision_pooled": "tiny"}
# Weights that stay fp32 whatever the model's dtype: the reference computes ln_vision in fp32, and code
# lookup is done in fp32 (see VectorQuantizer.lookup), so the codebook is kept exact.
_FP32_PARAMS = ("vision.ln_vision.", "quantizer.embedding.")
# Presets whose trained weights ship inside the package
BUNDLED = {"tiny": Path(__file__).resolve().parent.parent / "weights" / "tiny"}


@dataclass
class TokenizerOutput:
    ids: torch.Tensor  # [B, N]
    causal_embeddings: torch.Tensor  # [B, N, hidden]: the Q-Former's outputs, before quantisation
    quantized: QuantizerOutput


class SeedTokenizer(nn.Module):
    """The SEED image tokenizer. Build from a config (random weights), a preset or folder
    (`from_pretrained`), or official checkpoints (`from_official`)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        if config.vision.extra_levels and config.vision.kind != "efficientnet_lite0":
            raise ConfigError(f"vision.extra_levels needs the efficientnet_lite0 encoder, not {config.vision.kind!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # every build of a config gives the same random weights
            self.vision = build_vision(config.vision)
            self.qformer = QFormer(config.qformer)
            self.quantizer = VectorQuantizer(config.quantizer, config.qformer.hidden_size, config.num_tokens)
            self.detokenizer = build_detokenizer(config.detokenizer, config.quantizer, config.num_tokens,
                                                 config.qformer.hidden_size)
        self.vision.requires_grad_(False)  # frozen in every stage
        det = config.detokenizer
        if det.teacher == "vision_pooled" and det.generation_dim != self.vision.teacher_dim:
            raise ConfigError(f"detokenizer.generation_dim is {det.generation_dim}, but the vision_pooled teacher "
                              f"of this vision config is {self.vision.teacher_dim}-d")
        self.load_report = None
        self.checkpoint_path: Path | None = None  # the folder it was loaded from (its decoder/ sub-folder)
        self._image_decoder = None
        if not self.qformer.query_tokens.is_meta:
            self._load_frozen_text()

    def _load_frozen_text(self) -> None:
        """Registry-shipped frozen text weights (``qformer.frozen_text``): loaded at build time, never stored."""
        keys = self.qformer.frozen_text_keys()
        if keys:
            from ..assets import ASSETS, resolve

            source = self.config.qformer.init_from
            self.qformer.init_from_bert(resolve(source) if source in ASSETS else Path(source), only=keys)

    # ------------------------------------------------------------------------------------- properties
    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def dtype(self) -> torch.dtype:
        return self.qformer.query_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.qformer.query_tokens.device

    def set_dtype(self, dtype: str | torch.dtype) -> "SeedTokenizer":
        """Cast to fp32 / bf16 / fp16, keeping ln_vision and the codebook in fp32."""
        dtype = resolve_dtype(dtype)
        for name, param in self.named_parameters():
            param.data = param.data.to(torch.float32 if name.startswith(_FP32_PARAMS) else dtype)
        for name, buf in self.named_buffers():  # e.g. BatchNorm statistics of the tiny encoder
            if buf.is_floating_point() and not name.startswith("quantizer."):
                buf.data = buf.data.to(dtype)
        return self

    def text_tokenizer(self):
        """The Q-Former's BERT text tokenizer (stage 1, retrieval): a folder or a registry asset name."""
        from transformers import BertTokenizerFast

        from ..assets import ASSETS, resolve

        name = self.config.qformer.text_tokenizer
        if not name:
            raise ConfigError(f"{self.config.name} has no text tokenizer (qformer.text_tokenizer)")
        return BertTokenizerFast.from_pretrained(str(resolve(name) if name in ASSETS else Path(name)))

    @torch.no_grad()
    def caption_features(self, captions: Sequence[str], batch_size: int = 256, progress: bool = False
                         ) -> torch.Tensor:
        """The Q-Former text branch's contrastive features [len(captions), D] (fp32, on the model's device)."""
        qformer, tokenizer = self.qformer, self.text_tokenizer()
        starts = range(0, len(captions), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="caption features", unit="batch")
        out = []
        for start in starts:
            enc = tokenizer(list(captions[start:start + batch_size]), padding=True, truncation=True,
                            max_length=self.config.qformer.max_text_length, return_tensors="pt")
            states = qformer.encode_text(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            out.append(qformer.text_features(states).float())
        return torch.cat(out)

    def cached_caption_features(self, captions: Sequence[str], progress: bool = False) -> torch.Tensor:
        """`caption_features`, kept in memory and in the user cache (`seedtok.fileio.cache_dir`; safetensors,
        keyed by the Q-Former's weights, the text tokenizer and the captions), since a decoder's text prior
        scores thousands of captions (~11 s for the tiny decoder's 12,562 on a 2-core CPU) on every load."""
        import hashlib

        from safetensors.torch import load_file as load, save_file as save

        weights = sorted(self.qformer.state_dict().items())
        # hashing 34 M weights takes ~0.1 s: redo it only when a tensor was replaced or changed in place
        version = tuple((t.data_ptr(), t._version) for _, t in weights)
        memo = self.__dict__.get("_qformer_digest")
        if memo is None or memo[0] != version:
            weights_digest = hashlib.sha256()
            for name, tensor in weights:
                weights_digest.update(name.encode())
                weights_digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
            memo = self.__dict__["_qformer_digest"] = (version, weights_digest.hexdigest())
        digest = hashlib.sha256(repr((memo[1], self.config.qformer.text_tokenizer, list(captions))).encode())
        key = digest.hexdigest()[:20]
        memory = self.__dict__.setdefault("_caption_feature_cache", {})
        if key in memory:
            return memory[key]
        path = cache_dir() / "caption-features" / f"{key}.safetensors"
        features = None
        if path.is_file():
            try:
                features = load(str(path))["features"]
            except (SafetensorError, OSError, KeyError):
                features = None  # a damaged cache file is recomputed and replaced
        if features is None or features.shape[0] != len(captions):
            features = self.caption_features(captions, progress=progress).cpu()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: save({"features": features.contiguous()}, tmp))
        memory[key] = features
        return features

    def caption_scores(self, ids, captions: Sequence[Sequence[str]], by_column: bool = False):
        """Ids [B, N] and K classes' captions -> [B, K] float: per class, the best cosine between the ids'
        contrastive feature (the reconstruction branch's causal embeddings, as code retrieval reads them) and
        its captions' text features. Needs the reconstruction branch and the Q-Former's text branch.
        ``by_column`` (every class with C captions, column j one variant of each, e.g. its scene on background
        colour j): returns ([B, K], [B, C]), the second per column its best class's cosine."""
        if not (self.config.detokenizer.reconstruction_branch and self.config.qformer.text_branch):
            raise ConfigError(f"{self.config.name} cannot score captions: it needs the de-tokenizer's "
                              "reconstruction branch and the Q-Former's text branch")
        sizes = [len(group) for group in captions]
        if not sizes or min(sizes) == 0:
            raise ConfigError("caption_scores needs at least one caption for every class")
        text = nn.functional.normalize(self.cached_caption_features([c for group in captions for c in group]),
                                       dim=-1)
        with torch.inference_mode():
            image = self.qformer.image_features(self.detokenizer.reconstruct(self.codes(ids))).float()
        cosines = nn.functional.normalize(image, dim=-1).cpu() @ text.float().T
        if by_column:
            if len(set(sizes)) != 1:
                raise ConfigError("caption_scores by_column needs the same number of captions for every class")
            grid = cosines.view(len(cosines), len(sizes), sizes[0])
            return grid.amax(2), grid.amax(1)
        classes = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).expand_as(cosines)
        best = torch.full((cosines.shape[0], len(sizes)), -2.0)
        return best.scatter_reduce(1, classes, cosines, reduce="amax")

    # ----------------------------------------------------------------------------------------- encode
    def preprocess(self, images: Iterable[ImageInput], background: tuple[int, int, int] | None = None
                   ) -> torch.Tensor:
        """Images (paths, PIL, numpy, tensors; any size and mode) -> pixel tensor [B, 3, S, S] (fp32)."""
        pil = [load_image(im, background) for im in images]
        cfg = self.config
        return preprocess(pil, cfg.image_size, cfg.image_mean, cfg.image_std, cfg.resample)

    def forward(self, pixel_values: torch.Tensor) -> TokenizerOutput:
        """Pixels -> ids, causal embeddings and the quantizer's output (with its loss, for training)."""
        states = self.vision(pixel_values.to(self.device)).states
        causal = self.qformer(states)
        quantized = self.quantizer(causal)
        return TokenizerOutput(ids=quantized.ids, causal_embeddings=causal, quantized=quantized)

    def encode(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 8,
               background: tuple[int, int, int] | None = None, progress: bool = False) -> torch.Tensor:
        """Images -> ids ``LongTensor[B, num_tokens]``. Accepts one image or a list; any size and colour mode.

        ``background`` composites transparent images onto that RGB colour (off by default: the reference
        drops alpha)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        ids = []
        chunks = range(0, len(images), batch_size)
        if progress:
            from tqdm import tqdm
            chunks = tqdm(chunks, desc="tokenize", unit="batch")
        for start in chunks:
            pixels = self.preprocess(images[start:start + batch_size], background)
            ids.append(self.encode_pixels(pixels))
        if not ids:
            return torch.empty(0, self.num_tokens, dtype=torch.long)
        return torch.cat(ids)

    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [B, 3, S, S] -> ids [B, num_tokens]."""
        with torch.inference_mode():
            return self(pixel_values).ids.cpu()

    def causal_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels -> the Q-Former's causal embeddings [B, num_tokens, hidden] (before VQ)."""
        with torch.inference_mode():
            return self.qformer(self.vision(pixel_values.to(self.device)).states)

    # ----------------------------------------------------------------------------------------- decode
    def check_ids(self, ids) -> torch.Tensor:
        """Validate ids: integers in [0, codebook_size), shape [B, num_tokens] (or [num_tokens])."""
        if isinstance(ids, (str, bytes)):
            raise IdsError(f"ids must be integers, got text {str(ids)[:40]!r} (see parse_ids)")
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:  # ragged rows, strings, huge ints
            raise IdsError(f"ids must be a [B, {self.num_tokens}] array of integers: {exc}") from None
        if ids.numel() == 0 and ids.dtype.is_floating_point:
            ids = ids.long()  # torch.as_tensor([]) is float: an empty list is a count error, not a type error
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise IdsError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            raise IdsError(f"expected {self.num_tokens} ids per image, got shape {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.codebook_size):
            raise IdsError(f"ids must lie in [0, {self.codebook_size}), got min {int(ids.min())}, "
                           f"max {int(ids.max())}")
        return ids.long().to(self.device)

    def codes(self, ids) -> torch.Tensor:
        """Ids [B, N] -> codebook vectors [B, N, code_dim] (in the model's dtype)."""
        return self.quantizer.codes_for(self.check_ids(ids)).to(self.dtype)

    def decode_embeddings(self, ids) -> torch.Tensor:
        """Ids [B, N] -> generation embeddings: [B, 1024] unCLIP image embeddings (seed2) or
        [B, 77, 768] SD-1 text states (seed1)."""
        with torch.inference_mode():
            return self.detokenizer.generation_embeddings(self.codes(ids))

    @property
    def image_decoder_kind(self) -> str:
        """Which image decoder paints this model's generation embeddings: "seed2" (SD 2.1 unCLIP), "seed1"
        (SD 1.4) or "tiny" (the tiny preset's own), by the de-tokenizer's teacher."""
        return _DECODER_KIND[self.config.detokenizer.teacher]

    def set_image_decoder(self, decoder, **kwargs) -> "SeedTokenizer":
        """Attach an image decoder: an ``ImageDecoder``, or a folder / hub id loaded as this model's kind
        (keyword arguments go to its ``from_pretrained``, e.g. ``dtype``, ``num_inference_steps``)."""
        from .image_decoder import ImageDecoder, build_image_decoder

        if not isinstance(decoder, ImageDecoder):
            kwargs.setdefault("device", self.device)
            decoder = build_image_decoder(self.image_decoder_kind, decoder, **kwargs)
        if tuple(decoder.embedding_shape) != tuple(self._generation_shape()):
            raise CheckpointError(f"the image decoder takes {tuple(decoder.embedding_shape)} embeddings, this "
                                  f"model makes {tuple(self._generation_shape())}")
        self._image_decoder = decoder
        return self

    def image_decoder(self, path: str | os.PathLike | None = None, **kwargs):
        """The attached image decoder, loading it on first use: ``path`` (a folder or hub id), else the
        checkpoint's ``decoder/`` sub-folder. A model without one raises a one-line ``CheckpointError``."""
        if path is not None:
            return self.set_image_decoder(path, **kwargs)._image_decoder
        if self._image_decoder is None:
            folder = self.checkpoint_path / DECODER_DIR if self.checkpoint_path is not None else None
            if folder is None or not (folder / "model_index.json").is_file():
                where = f"{folder} does not exist" if folder is not None else \
                    f"{self.config.name} was not loaded from a checkpoint folder"
                hint = "train one with `seedtok train decoder`" if self.image_decoder_kind == "tiny" else \
                    f"give the {self.image_decoder_kind} Stable Diffusion folder or hub id (image_decoder=...)"
                raise CheckpointError(f"no image decoder for {self.config.name}: {where}; {hint}")
            self.set_image_decoder(folder, **kwargs)
        return self._image_decoder

    def _generation_shape(self) -> tuple[int, ...]:
        det = self.config.detokenizer
        if det.kind == "seed1":
            return (det.reverse_queries, det.generation_dim)
        return (det.generation_dim,)

    def decode(self, ids, *, image_decoder=None, negative_ids=None, seed: int | Sequence[int] | None = 0,
               **kwargs):
        """Ids [B, N] (or one row [N]) -> B images (a list of PIL images by default): ids -> generation
        embeddings -> the image decoder. ``image_decoder``: an ``ImageDecoder`` or a folder / hub id to use
        (kept for later calls); default: the checkpoint's ``decoder/``. ``negative_ids``: ids whose embedding is
        the negative for classifier-free guidance ([B or 1, N]; default: the decoder's null embedding).
        ``seed``: one int for every image (default 0: an image depends only on its ids) or one per image; other
        keyword arguments (``generator``, ``latents``, ``guidance_scale``, ``num_inference_steps``,
        ``batch_size``, ``output_type``, ...) go to ``ImageDecoder.decode``. A decoder with a text prior (the
        tiny one) also gets ``class_scores``: `caption_scores` of the ids against its classes' captions (and,
        when its prior also picks the background, ``background_scores``: per background colour)."""
        ids = self.check_ids(ids)
        decoder = self.image_decoder(image_decoder) if image_decoder is not None else self.image_decoder()
        embeddings = self.decode_embeddings(ids).float()
        weight = kwargs.get("text_prior_weight")
        captions = decoder.prior_captions(weight)  # a text prior (tiny)
        if captions is not None and kwargs.get("class_scores") is None:
            if decoder.prior_names_backgrounds(weight) and kwargs.get("background_scores") is None:
                kwargs["class_scores"], kwargs["background_scores"] = self.caption_scores(ids, captions,
                                                                                          by_column=True)
            else:
                kwargs["class_scores"] = self.caption_scores(ids, captions)
        if negative_ids is not None:
            kwargs["negative_embeddings"] = self.decode_embeddings(negative_ids).float()
        if kwargs.get("generator") is not None:
            seed = None
        return decoder.decode(embeddings, seed=seed, **kwargs)

    def reconstruct_causal(self, ids) -> torch.Tensor:
        """Ids -> reconstructed causal embeddings [B, N, hidden] (the stage-2 reconstruction branch)."""
        with torch.inference_mode():
            return self.detokenizer.reconstruct(self.codes(ids))

    # --------------------------------------------------------------------------------------- save/load
    def save_pretrained(self, folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors``; each file is written to a temp name then renamed.
        ``dtype`` casts floating-point weights for storage (e.g. fp16 to halve the size)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cast = resolve_dtype(dtype) if dtype else None
        tensors = {k: (v.to(cast) if cast and v.is_floating_point() else v).detach().contiguous().cpu()
                   for k, v in self.stored_state_dict().items()}
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(self.config.to_json()))
        self._save_image_decoder(folder / DECODER_DIR, dtype)
        return folder

    def _save_image_decoder(self, target: Path, dtype) -> None:
        """The tiny decoder travels with the checkpoint (``decoder/``): the attached one, else a copy of the
        source checkpoint's. Stable Diffusion decoders (GBs) stay where they are."""
        from .image_decoder import TinyDecoder

        if isinstance(self._image_decoder, TinyDecoder):
            self._image_decoder.save_pretrained(target, dtype=dtype)
            return
        source = self.checkpoint_path / DECODER_DIR if self.checkpoint_path is not None else None
        if self._image_decoder is None and source is not None and (source / "model_index.json").is_file() \
                and source.resolve() != target.resolve():
            import shutil

            from ..fileio import atomic_write_folder

            atomic_write_folder(target, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "SeedTokenizer":
        """A saved folder, or a preset name. ``micro`` presets build random weights from a fixed seed;
        ``seed1``/``seed2`` need the official weights (`from_official`, `seedtok convert official`)."""
        path = Path(name_or_path)
        if str(name_or_path) in BUNDLED:
            path = BUNDLED[str(name_or_path)]
            if not (path / CONFIG_NAME).is_file():
                raise CheckpointError(f"the {name_or_path!r} weights are not in this install ({path}); train them "
                                      f"with `seedtok train tokenizer --stage 1` then `--stage 2`")
        if (path / CONFIG_NAME).is_file():
            config = _read_config(path / CONFIG_NAME)
            state = _load_safetensors(path / WEIGHTS_NAME)
            model = cls.empty(config)
            model.load_state_dict_checked(state)
            model.checkpoint_path = path
        elif str(name_or_path) in PRESETS:
            name = str(name_or_path)
            if name in ("seed1", "seed2"):
                raise CheckpointError(
                    f"preset {name!r} has no bundled weights: convert the official ones with "
                    f"`seedtok convert official PATH... --out DIR` and pass DIR")
            model = cls(preset(name))
        elif path.exists():
            raise CheckpointError(f"{path} is not a seedtok checkpoint folder (no {CONFIG_NAME})")
        else:
            raise CheckpointError(f"no checkpoint folder or preset named {str(name_or_path)!r} "
                                  f"(presets: {', '.join(PRESETS)})")
        model.set_dtype(dtype or torch.float32)
        return model.to(device).eval()

    @classmethod
    def from_official(cls, *paths: str | os.PathLike, version: str | None = None, strict: bool = True,
                      dtype: str | torch.dtype | None = None, config: TokenizerConfig | None = None
                      ) -> "SeedTokenizer":
        """Official SEED checkpoints -> SeedTokenizer (``model.load_report`` says what was loaded).

        SEED-2: ``seed_quantizer.pt`` + LAVIS ``eva_vit_g.pth``; SEED-1: ``eva_vit_g.pth``,
        ``causal_qformer.pth``, ``seed_tokenizer.pth`` (later files override earlier ones). ``version`` is
        inferred from the keys when not given; ``config`` overrides the preset (e.g. reduced widths)."""
        from ..official import load_official

        model = load_official(cls, paths, version=version, strict=strict, config=config)
        model.set_dtype(dtype or torch.float32)
        return model.eval()

    @classmethod
    def empty(cls, config: TokenizerConfig) -> "SeedTokenizer":
        """A model with zero weights, built without running the random initialisation (fast for the 1.15B
        paper presets); for loaders that fill every weight."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.zero_()
        for module in model.modules():  # buffers not in checkpoints, derived from the config
            if hasattr(module, "init_fixed_buffers"):
                module.init_fixed_buffers()
        if config.vision.pretrained:
            model.vision.load_pretrained()
        model._load_frozen_text()
        return model

    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: everything but a registry-shipped frozen backbone (reloaded from its
        package at build time)."""
        state = self.state_dict()
        if self.config.vision.pretrained:
            state = {k: v for k, v in state.items() if not k.startswith("vision.model.")}
        for key in self.qformer.frozen_text_keys():
            state.pop(f"qformer.{key}")
        return state

    def load_state_dict_checked(self, state: dict[str, torch.Tensor]) -> None:
        """Load our own state dict; any missing/unexpected key or shape mismatch is a CheckpointError."""
        own = self.stored_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint does not match the config ({self.config.name}): {len(missing)} missing keys "
                f"{_preview(missing)}, {len(unexpected)} unexpected keys {_preview(unexpected)}")
        for key, value in state.items():
            if value.shape != own[key].shape:
                raise CheckpointError(f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, "
                                      f"model {tuple(own[key].shape)}")
        self.load_state_dict(state, strict=False)  # what is not stored was checked above to be registry-shipped

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part. EVA-based models are counted as the reference does (the fixed-zero k slice of
        EVA's qkv bias is not a parameter there)."""
        if self.config.vision.kind == "eva_vit":
            from ..official import official_parameter_counts

            return official_parameter_counts(self)
        counts: dict[str, int] = {}
        for name, param in self.named_parameters():
            part = ("ln_vision" if name.startswith("vision.ln_vision.") else
                    "vision_encoder" if name.startswith("vision.") else name.split(".")[0])
            counts[part] = counts.get(part, 0) + param.numel()
        counts["total"] = sum(counts.values())
        return counts


def _preview(keys: list[str], n: int = 3) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


def _read_config(path: Path) -> TokenizerConfig:
    """A checkpoint's config.json; a file of the wrong shape (not an object, wrong value types) is a
    CheckpointError, not a TypeError from deep inside the config classes."""
    from ..errors import SeedtokError

    try:
        return TokenizerConfig.from_json_file(path)
    except SeedtokError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a valid seedtok tokenizer config: {exc}") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors (truncated or not safetensors?): {exc}") from None


def parse_ids(text: str) -> list[int]:
    """Ids typed as text -- ``"3,17,..."``, ``"3 17 ..."`` or ``"[3, 17, ...]"`` -- as ints; an IdsError
    naming the first bad part otherwise (range and count are checked by `SeedTokenizer.check_ids`)."""
    parts = [p for p in text.replace(",", " ").strip().strip("[]").split() if p]
    if not parts:
        raise IdsError("no ids given (expected integers separated by commas or spaces)")
    try:
        return [int(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("+-").isdigit())
        raise IdsError(f"ids must be integers separated by commas or spaces, got {bad!r}") from None
