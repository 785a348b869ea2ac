"""SEED's vector quantizer (SPEC §2.4), in the exact form of the released weights.

``encode_task_layer`` (Linear -> Tanh -> Linear) projects the causal embeddings to the code width; the
nearest codebook entry by squared L2 distance, computed in taming's form ``|z|^2 + |e|^2 - 2 z.e`` (another
formula can flip near-ties, and ids must match the reference bit for bit), gives the id; the straight-through
estimator passes gradients; the loss is taming's legacy form with beta on the codebook term.

Two named training options, off in the paper presets and active only in training mode: ``kmeans_init`` (the
codebook starts as k-means centroids of the first batch's latents) and ``dead_code_restart`` (codes whose usage
EMA falls below a threshold are moved onto random latents of the current batch). Their state is kept in
buffers, so checkpoints and resumed runs carry it. A third, ``position_dither``, changes the mapping itself
(in training and inference): a fixed random offset per token position, scaled by the latent's RMS, is added
to the latent before the lookup. Without it, causal embeddings that are alike across positions give one code
repeated 32 times (measured on the tiny preset: 1.4 distinct ids per image); with it, the positions fall into
different cells of the same codebook (subtractive dither), and the codes of an image jointly carry far more
of its latent. A fourth, ``position_rotation``, also changes the mapping: position k looks ``z R_k`` up (a
fixed random rotation per position, i.e. its own rotated copy of the codebook) and hands the de-tokenizer the
code rotated back, ``e R_k^T``; alike latents then get independent quantisation errors at every position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import QuantizerConfig


@dataclass
class QuantizerOutput:
    ids: torch.Tensor  # [B, N] long
    # [B, N, code_dim]: z + sg(z_q - z), equal to the codebook vectors in value (rotated back to the common
    # space under ``position_rotation``)
    codes: torch.Tensor
    latents: torch.Tensor  # [B, N, code_dim]: z, before quantisation
    loss: torch.Tensor  # scalar VQ loss


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig, input_width: int, num_tokens: int = 32):
        super().__init__()
        self.config = cfg
        self.encode_task_layer = nn.Sequential(
            nn.Linear(input_width, input_width), nn.Tanh(), nn.Linear(input_width, cfg.code_dim))
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if cfg.kmeans_init:
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if cfg.dead_code_restart:
            self.register_buffer("usage", torch.full((cfg.codebook_size,), 1.0 / cfg.codebook_size))
        if cfg.position_dither:
            generator = torch.Generator().manual_seed(cfg.dither_seed)
            self.register_buffer("dither", torch.randn(num_tokens, cfg.code_dim, generator=generator))
        if cfg.position_rotation:
            # not stored in checkpoints: rebuilt exactly (fp32) from the seed, so an fp16 bundle cannot perturb it
            self.register_buffer("rotation", torch.empty(num_tokens, cfg.code_dim, cfg.code_dim), persistent=False)
        self.init_fixed_buffers()

    @torch.no_grad()
    def init_fixed_buffers(self) -> None:
        """(Re)compute the buffers that are functions of the config, not of training (the position rotations);
        a model built on the meta device and then filled from a checkpoint must call this."""
        if self.config.position_rotation:
            num_tokens, dim = self.rotation.shape[:2]
            self.rotation = random_rotations(num_tokens, dim, self.config.rotation_seed).to(self.rotation.device)

    def lookup(self, latents: torch.Tensor) -> torch.Tensor:
        """Nearest code ids [..., ] for latents [..., code_dim], by squared L2 in taming's form, in fp32."""
        z = latents.reshape(-1, latents.shape[-1]).float()
        e = self.embedding.weight.float()
        distances = (z.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1)
                     - 2 * torch.einsum("bd,dn->bn", z, e.t()))
        return distances.argmin(dim=1).view(latents.shape[:-1])

    def latents(self, hidden: torch.Tensor) -> torch.Tensor:
        """The latents [B, N, code_dim] whose nearest codes are the ids (rotated and dithered by position when
        enabled)."""
        z = self.encode_task_layer(hidden)
        if self.config.position_rotation:
            z = torch.einsum("...nd,nde->...ne", z, self.rotation[: z.shape[-2]].to(z.dtype))
        if self.config.position_dither:
            rms = z.detach().float().pow(2).mean(dim=-1, keepdim=True).sqrt()
            z = z + (self.config.position_dither * rms * self.dither[: z.shape[-2]]).to(z.dtype)
        return z

    def forward(self, hidden: torch.Tensor) -> QuantizerOutput:
        z = self.latents(hidden)
        if self.training and self.config.kmeans_init and not bool(self.initialized):
            self.kmeans_init_(z.detach().reshape(-1, z.shape[-1]))
        ids = self.lookup(z)
        if self.training and self.config.dead_code_restart:
            self.restart_dead_codes_(z.detach().reshape(-1, z.shape[-1]), ids.flatten())
        z_q = self.embedding(ids).to(z.dtype)
        loss = vq_loss(z, z_q, self.config.beta)
        codes = self.unrotate(z + (z_q - z).detach())  # straight-through estimator
        return QuantizerOutput(ids=ids, codes=codes, latents=z, loss=loss)

    def unrotate(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, N, code_dim] from the positions' lookup spaces back to the one space the de-tokenizer reads
        (the identity unless ``position_rotation``)."""
        if not self.config.position_rotation:
            return codes
        return torch.einsum("...ne,nde->...nd", codes, self.rotation[: codes.shape[-2]].to(codes.dtype))

    @torch.no_grad()
    def kmeans_init_(self, latents: torch.Tensor, iters: int = 10) -> None:
        """Lloyd's k-means (squared L2) on ``latents`` [N, code_dim]; empty clusters get random latents."""
        k = self.config.codebook_size
        x = latents.float()
        centroids = x[torch.randint(0, x.shape[0], (k,), device=x.device)].clone()
        for _ in range(iters):
            assign = ((x.pow(2).sum(1, keepdim=True) + centroids.pow(2).sum(1) - 2 * x @ centroids.t())
                      .argmin(dim=1))
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).float()
            empty = counts == 0
            centroids = torch.where(empty[:, None], x[torch.randint(0, x.shape[0], (k,), device=x.device)],
                                    sums / counts.clamp(min=1)[:, None])
        self.embedding.weight.copy_(centroids.to(self.embedding.weight.dtype))
        self.initialized.fill_(True)

    @torch.no_grad()
    def restart_dead_codes_(self, latents: torch.Tensor, ids: torch.Tensor) -> int:
        """Update the usage EMA with this batch; move dead codes onto random batch latents. Returns how many."""
        cfg = self.config
        share = torch.bincount(ids, minlength=cfg.codebook_size).float() / ids.numel()
        self.usage.mul_(cfg.usage_decay).add_(share, alpha=1 - cfg.usage_decay)
        dead = (self.usage < cfg.dead_code_threshold).nonzero().flatten()
        if dead.numel():
            picks = torch.randint(0, latents.shape[0], (dead.numel(),), device=latents.device)
            self.embedding.weight[dead] = latents[picks].to(self.embedding.weight.dtype)
            self.usage[dead] = 1.0 / cfg.codebook_size
        return int(dead.numel())

    def codes_for(self, ids: torch.Tensor) -> torch.Tensor:
        """The de-tokenizer's input [B, N, code_dim] for ids [B, N]: their codebook vectors (rotated back to the
        common space under ``position_rotation``)."""
        return self.unrotate(self.embedding(ids))


def random_rotations(count: int, dim: int, seed: int) -> torch.Tensor:
    """``count`` random orthogonal [dim, dim] matrices (QR of Gaussian matrices, signs fixed so the draw is
    unique), reproducible from ``seed`` on any machine."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(count, dim, dim, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.float()


def vq_loss(z: torch.Tensor, z_q: torch.Tensor, beta: float) -> torch.Tensor:
    """taming "legacy": mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)."""
    return torch.mean((z_q.detach() - z) ** 2) + beta * torch.mean((z_q - z.detach()) ** 2)
