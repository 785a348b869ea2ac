"""SEED's vector quantizer (SPEC §2.4), in the exact form of the released weights.

``encode_task_layer`` (Linear -> Tanh -> Linear) projects the causal embeddings to the code width; the
nearest codebook entry by squared L2 distance, computed in taming's form ``|z|^2 + |e|^2 - 2 z.e`` (another
formula can flip near-ties, and ids must match the reference bit for bit), gives the id; the straight-through
estimator passes gradients; the loss is taming's legacy form with beta on the codebook term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import QuantizerConfig


@dataclass
class QuantizerOutput:
    ids: torch.Tensor  # [B, N] long
    codes: torch.Tensor  # [B, N, code_dim]: z + sg(z_q - z), equal to the codebook vectors in value
    latents: torch.Tensor  # [B, N, code_dim]: z, before quantisation
    loss: torch.Tensor  # scalar VQ loss


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig, input_width: int):
        super().__init__()
        self.config = cfg
        self.encode_task_layer = nn.Sequential(
            nn.Linear(input_width, input_width), nn.Tanh(), nn.Linear(input_width, cfg.code_dim))
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)

    def lookup(self, latents: torch.Tensor) -> torch.Tensor:
        """Nearest code ids [..., ] for latents [..., code_dim], by squared L2 in taming's form, in fp32."""
        z = latents.reshape(-1, latents.shape[-1]).float()
        e = self.embedding.weight.float()
        distances = (z.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1)
                     - 2 * torch.einsum("bd,dn->bn", z, e.t()))
        return distances.argmin(dim=1).view(latents.shape[:-1])

    def forward(self, hidden: torch.Tensor) -> QuantizerOutput:
        z = self.encode_task_layer(hidden)
        ids = self.lookup(z)
        z_q = self.embedding(ids).to(z.dtype)
        loss = vq_loss(z, z_q, self.config.beta)
        codes = z + (z_q - z).detach()  # straight-through estimator
        return QuantizerOutput(ids=ids, codes=codes, latents=z, loss=loss)

    def codes_for(self, ids: torch.Tensor) -> torch.Tensor:
        """Codebook vectors [B, N, code_dim] for ids [B, N]."""
        return self.embedding(ids)


def vq_loss(z: torch.Tensor, z_q: torch.Tensor, beta: float) -> torch.Tensor:
    """taming "legacy": mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)."""
    return torch.mean((z_q.detach() - z) ** 2) + beta * torch.mean((z_q - z.detach()) ** 2)
