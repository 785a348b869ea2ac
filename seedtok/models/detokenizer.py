"""De-tokenizers: codebook vectors -> generation embeddings (and reconstructed causal embeddings).

- ``Seed2Detokenizer`` (SPEC §2.5): ``decode_task_layer`` -> + ``pos_embed_image`` -> 4 ViT blocks ->
  ``image_down`` MLP (no bias) -> flatten query-major -> ``distill_image_proj`` = the 1024-d unCLIP image
  embedding. The reconstruction branch (``pos_embed`` + 4 ``blocks``) rebuilds the causal embeddings for the
  stage-2 loss.
- ``Seed1Detokenizer`` (SPEC §2.6): ``decode_task_layer`` -> + ``pos_embed_text`` -> 4 ViT blocks -> a
  77-query, non-causal reverse Q-Former cross-attending to them -> ``distill_text_proj`` = [B, 77, 768],
  Stable Diffusion v1's text-encoder states.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DetokenizerConfig, QFormerConfig, QuantizerConfig
from .qformer import QFormer


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN ViT block (timm's names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _blocks(cfg: DetokenizerConfig, dim: int) -> nn.ModuleList:
    return nn.ModuleList(Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.layer_norm_eps) for _ in range(cfg.num_blocks))


def _pos_embed(num_tokens: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)


def _run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


class Detokenizer(nn.Module):
    """Shared part: ``decode_task_layer`` (code width -> hidden) and the optional reconstruction branch."""

    def __init__(self, cfg: DetokenizerConfig, quantizer: QuantizerConfig, num_tokens: int, hidden: int):
        super().__init__()
        self.config = cfg
        self.decode_task_layer = nn.Sequential(
            nn.Linear(quantizer.code_dim, quantizer.code_dim), nn.Tanh(), nn.Linear(quantizer.code_dim, hidden))
        if cfg.reconstruction_branch:
            self.pos_embed = _pos_embed(num_tokens, hidden)
            self.blocks = _blocks(cfg, hidden)

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook vectors [B, N, code_dim] -> reconstructed causal embeddings [B, N, hidden]."""
        if not self.config.reconstruction_branch:
            raise RuntimeError("this de-tokenizer was built without the reconstruction branch")
        return _run(self.blocks, self.decode_task_layer(codes) + self.pos_embed)

    def generation_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generation_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The generation branch's own parameters: all but ``decode_task_layer`` (shared with the reconstruction
        branch) and the reconstruction branch, so retraining them leaves ids and reconstructions unchanged."""
        return [(n, p) for n, p in self.named_parameters()
                if not (n == "pos_embed" or n.startswith(("decode_task_layer.", "blocks.")))]

    def _init(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


class Seed2Detokenizer(Detokenizer):
    def __init__(self, cfg: DetokenizerConfig, quantizer: QuantizerConfig, num_tokens: int, hidden: int):
        super().__init__(cfg, quantizer, num_tokens, hidden)
        self.pos_embed_image = _pos_embed(num_tokens, hidden)
        self.blocks_image = _blocks(cfg, hidden)
        dims = (hidden, *cfg.image_down_dims)
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.ReLU()]
        self.image_down = nn.Sequential(*layers[:-1])  # no activation after the last Linear
        self.distill_image_proj = nn.Linear(num_tokens * dims[-1], cfg.generation_dim)
        self._init()

    def generation_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, N, code_dim] -> unCLIP image embedding [B, generation_dim]."""
        x = _run(self.blocks_image, self.decode_task_layer(codes) + self.pos_embed_image)
        return self.distill_image_proj(self.image_down(x).flatten(1))


class Seed1Detokenizer(Detokenizer):
    def __init__(self, cfg: DetokenizerConfig, quantizer: QuantizerConfig, num_tokens: int, hidden: int):
        super().__init__(cfg, quantizer, num_tokens, hidden)
        self.pos_embed_text = _pos_embed(num_tokens, hidden)
        self.blocks_text = _blocks(cfg, hidden)
        self._init()
        self.reverse_qformer = QFormer(reverse_qformer_config(cfg, hidden))
        self.distill_text_proj = nn.Linear(hidden, cfg.generation_dim)

    def generation_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, N, code_dim] -> SD-1 text-encoder states [B, reverse_queries, generation_dim]."""
        x = _run(self.blocks_text, self.decode_task_layer(codes) + self.pos_embed_text)
        return self.distill_text_proj(self.reverse_qformer(x))


def reverse_qformer_config(cfg: DetokenizerConfig, hidden: int) -> QFormerConfig:
    """SEED-1's reverse Q-Former: 77 queries, 4 BERT layers, cross-attention in layers 0 and 2 to the
    decoded states (width ``hidden``), **not** causal, no text branch."""
    return dataclasses.replace(
        QFormerConfig(), num_queries=cfg.reverse_queries, hidden_size=hidden, num_layers=cfg.reverse_layers,
        num_heads=cfg.reverse_num_heads, intermediate_size=cfg.reverse_intermediate_size,
        cross_attention_every=cfg.reverse_cross_attention_every, encoder_width=hidden, causal=False,
        text_branch=False)


def build_detokenizer(cfg: DetokenizerConfig, quantizer: QuantizerConfig, num_tokens: int,
                      hidden: int) -> Detokenizer:
    kinds = {"seed2": Seed2Detokenizer, "seed1": Seed1Detokenizer}
    return kinds[cfg.kind](cfg, quantizer, num_tokens, hidden)
