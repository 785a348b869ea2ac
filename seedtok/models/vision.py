"""Frozen image encoders behind one small interface: pixels [B, 3, H, W] -> ``VisionOutput``
(states [B, N, D] for the Q-Former's cross-attention, pooled [B, D]).

``EvaViT`` is EVA ViT-g/14 (SPEC §2.1). transformers' ``Blip2VisionModel`` is the same network (checked in
the SPEC to 2.7e-6 against the reference), so we reuse it: its layers run with SDPA attention, and
``ln_vision`` (the reference's fp32 LayerNorm) replaces its ``post_layernorm``.
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


class EvaViT(nn.Module):
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

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def forward(self, pixel_values: torch.Tensor) -> VisionOutput:
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        x = self.model.embeddings(pixel_values.to(dtype))
        for layer in self.model.encoder.layers:
            x = layer(x)
        # ln_vision is computed in fp32 whatever the model's dtype, as in the reference.
        states = F.layer_norm(x.float(), (x.shape[-1],), self.ln_vision.weight.float(),
                              self.ln_vision.bias.float(), self.ln_vision.eps).to(dtype)
        return VisionOutput(states=states, pooled=states[:, 0])


def build_vision(cfg: VisionConfig) -> nn.Module:
    if cfg.kind == "eva_vit":
        return EvaViT(cfg)
    raise ValueError(f"unknown vision encoder kind {cfg.kind!r}")
