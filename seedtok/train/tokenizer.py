"""Tokenizer training, stages 1 and 2 (SPEC §3), as Tasks on the shared loop.

Stage 1 (causal Q-Former): image-text contrastive only. Image feature = ``vision_proj`` of the last query,
text feature = ``text_proj`` of the text CLS, both L2-normalised; learnable temperature (init 0.07, clamped to
[0.001, 0.5] as BLIP-2 does); negatives gathered across processes (gradient flows to the local part);
cross-entropy with label smoothing 0.1 in both directions. Trains the Q-Former, its queries and text branch,
and ``ln_vision``.

Stage 2 (codebook and de-tokenizer): Q-Former, queries and ViT frozen. Loss = 5 * VQ + 2 * (1 - cos)
between reconstructed and true causal embeddings (per token, averaged) + 0.5 * MSE between the generation
embedding and the teacher's. Three named additions, 0 (off) in the paper recipes, each on the last query (the
one that retrieval, and the paper's code-retrieval table, reads):
- ``retrieval_weight`` x InfoNCE from the reconstructed last query's contrastive feature to the true ones of
  the global batch (one way, no label smoothing, temperature `RETRIEVAL_TEMPERATURE`; targets detached): the
  reconstruction must keep what tells images apart, not only point the same way;
- ``caption_weight`` x InfoNCE from the same feature to the frozen text features of *every* distinct caption
  of the training set (``caption_bank``; the batch's ``caption`` indexes it): stage 1's image-to-text objective,
  with thousands of negatives instead of a batch's;
- ``last_query_weight`` x an extra (1 - cos) on the last query.
Measured (200 steps on cached embeddings, position rotation; code R@1 I->T / T->I on the test split): none
51.0 / 62.3; retrieval + last query 71.3 / 75.6; the symmetric, label-smoothed stage-1 form in place of this
retrieval loss 65.3 / 76.8; captions + last query 72.3 / 76.6; all three 74.8 / 78.0.

The generation objective has two named options (`TrainConfig`): ``generation_loss="standardized"`` (the MSE
after z-scoring each teacher dimension by the training set's statistics, so low-variance dimensions such as the
colour-keeping level-4 means count as much as the head's) and ``generation_contrastive_weight`` x one-way InfoNCE
from the standardised generation embedding to the standardised teachers of the global batch (it must say which
image it came from, not only its average). ``train_parts="generation"`` trains the generation branch alone
(codebook, ``decode_task_layer`` and reconstruction branch frozen): ids and reconstructions stay as they were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.tokenizer import SeedTokenizer

LABEL_SMOOTHING = 0.1
VQ_WEIGHT, RECON_WEIGHT, GEN_WEIGHT = 5.0, 2.0, 0.5
RETRIEVAL_TEMPERATURE = 0.05  # stage 2's retrieval and caption losses (the stage-1 temperature ends near 0.06)
GENERATION_LOSSES = ("mse", "standardized")
TRAIN_PARTS = ("all", "generation")


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 across processes; gradients flow back to each process's own part."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def process_rank() -> int:
    """This process's rank under torch.distributed (0 without it)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def contrastive_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, temp: torch.Tensor,
                     rank: int | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with label smoothing over the global batch; local rows are the queries (``rank``:
    this process's, by default from torch.distributed)."""
    rank = process_rank() if rank is None else rank
    all_images, all_texts = gather_with_grad(image_feats), gather_with_grad(text_feats)
    labels = torch.arange(image_feats.shape[0], device=image_feats.device) + rank * image_feats.shape[0]
    i2t = image_feats @ all_texts.t() / temp
    t2i = text_feats @ all_images.t() / temp
    return (F.cross_entropy(i2t.float(), labels, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(t2i.float(), labels, label_smoothing=LABEL_SMOOTHING)) / 2


def one_way_infonce(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
                    temperature: float = RETRIEVAL_TEMPERATURE) -> torch.Tensor:
    """Cross-entropy of ``queries`` [B, D] over ``keys`` [K, D] (cosine / temperature), true key ``labels``."""
    return F.cross_entropy((queries.float() @ keys.float().t()) / temperature, labels)


def _unwrap(model: nn.Module) -> SeedTokenizer:
    return model.module if hasattr(model, "module") else model


def image_states(model: SeedTokenizer, batch: dict) -> torch.Tensor:
    """ln_vision(frozen backbone features): from the cache when the batch has it, else from pixels."""
    features = batch.get("features")
    if features is None:
        with torch.no_grad():
            features = model.vision.features(batch["pixels"])
    return model.vision.normalize(features.to(model.dtype))


class Stage1:
    """Contrastive training of the causal Q-Former."""

    def train_mode(self, model):
        _unwrap(model).train()

    def trainable_parameters(self, model):
        model = _unwrap(model)
        frozen = set(model.qformer.frozen_text_keys())
        return ([(f"qformer.{n}", p) for n, p in model.qformer.named_parameters() if n not in frozen]
                + [(f"vision.ln_vision.{n}", p) for n, p in model.vision.ln_vision.named_parameters()])

    def loss(self, model, batch):
        model = _unwrap(model)
        qformer = model.qformer
        with torch.no_grad():
            qformer.temp.clamp_(0.001, 0.5)
        queries = qformer(image_states(model, batch))
        text = qformer.encode_text(batch["input_ids"], batch["attention_mask"])
        loss = contrastive_loss(qformer.image_features(queries), qformer.text_features(text), qformer.temp)
        return loss, {"temp": qformer.temp.item()}


class Stage2:
    """Codebook + de-tokenizer training against frozen causal embeddings and a generation teacher; the
    weights are the named loss additions of the module docstring (0: the paper's loss). ``caption_bank``
    [captions, D]: the frozen text features of the training captions (`TokenizerData.caption_bank`), needed by
    ``caption_weight``."""

    def __init__(self, retrieval_weight: float = 0.0, last_query_weight: float = 0.0, caption_weight: float = 0.0,
                 caption_bank: torch.Tensor | None = None, generation_loss: str = "mse",
                 generation_contrastive_weight: float = 0.0,
                 teacher_stats: tuple[torch.Tensor, torch.Tensor] | None = None, train_parts: str = "all"):
        self.retrieval_weight = float(retrieval_weight)
        self.last_query_weight = float(last_query_weight)
        self.caption_weight = float(caption_weight)
        if train_parts not in TRAIN_PARTS:
            raise ConfigError(f"unknown train_parts {train_parts!r}; choose {' or '.join(TRAIN_PARTS)}")
        self.generation_only = train_parts == "generation"  # the caption loss, like the codebook's, is unused
        if self.caption_weight and caption_bank is None and not self.generation_only:
            raise ConfigError("caption_weight needs the training captions' text features: cached data "
                              "(cache_features), not streamed shards")
        self.caption_bank = caption_bank
        if generation_loss not in GENERATION_LOSSES:
            raise ConfigError(f"unknown generation_loss {generation_loss!r}; choose {' or '.join(GENERATION_LOSSES)}")
        self.generation_loss = generation_loss
        self.generation_contrastive_weight = float(generation_contrastive_weight)
        if (generation_loss == "standardized" or self.generation_contrastive_weight) and teacher_stats is None:
            raise ConfigError("the standardised generation loss needs the teacher's statistics (teacher_stats)")
        self.teacher_stats = teacher_stats

    def train_mode(self, model):
        model = _unwrap(model)
        if self.generation_only:  # the codebook must not move (no k-means init, no dead-code restarts)
            model.eval()
            model.detokenizer.train()
            return
        model.train()
        model.qformer.eval()  # frozen: its causal embeddings are targets, computed without dropout

    def trainable_parameters(self, model):
        model = _unwrap(model)
        if self.generation_only:
            return [(f"detokenizer.{n}", p) for n, p in model.detokenizer.generation_parameters()]
        return ([(f"quantizer.{n}", p) for n, p in model.quantizer.named_parameters()]
                + [(f"detokenizer.{n}", p) for n, p in model.detokenizer.named_parameters()])

    def generation_objective(self, generation: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """GEN_WEIGHT x (MSE or standardised MSE) + generation_contrastive_weight x InfoNCE (standardised)."""
        generation, teacher = generation.float(), teacher.float()
        logs = {"gen_mse": F.mse_loss(generation, teacher).item()}
        if self.teacher_stats is not None:
            mean, std = (t.to(teacher.device) for t in self.teacher_stats)
            generation_z, teacher_z = (generation - mean) / std, (teacher - mean) / std
        if self.generation_loss == "standardized":
            loss = F.mse_loss(generation_z, teacher_z)
            logs["gen_std_mse"] = loss.item()
        else:
            loss = F.mse_loss(generation, teacher)
        loss = GEN_WEIGHT * loss
        if self.generation_contrastive_weight:
            keys = gather_with_grad(F.normalize(teacher_z, dim=-1))
            labels = torch.arange(generation.shape[0], device=generation.device) + process_rank() * generation.shape[0]
            contrastive = one_way_infonce(F.normalize(generation_z, dim=-1), keys, labels)
            loss = loss + self.generation_contrastive_weight * contrastive
            logs["gen_contrastive"] = contrastive.item()
        return loss, logs

    def loss(self, model, batch):
        model = _unwrap(model)
        causal, teacher = batch.get("causal"), batch.get("teacher")
        if causal is None or teacher is None:
            with torch.no_grad():
                features = batch.get("features")
                if features is None:
                    features = model.vision.features(batch["pixels"])
                if teacher is None:  # streamed batches: the "vision_pooled" teacher, from the same features
                    teacher = model.vision.pooled_teacher(features)
                if causal is None:
                    causal = model.qformer(model.vision.normalize(features.to(model.dtype)))
        causal = causal.to(model.dtype)
        if self.generation_only:  # codes fixed: only the generation objective has anything to train
            with torch.no_grad():
                codes = model.quantizer(causal).codes
            return self.generation_objective(model.detokenizer.generation_embeddings(codes), teacher)
        quantized = model.quantizer(causal)
        recon = model.detokenizer.reconstruct(quantized.codes)
        recon_loss = (1 - F.cosine_similarity(recon.float(), causal.float(), dim=-1)).mean()
        gen_loss, logs = self.generation_objective(model.detokenizer.generation_embeddings(quantized.codes), teacher)
        loss = VQ_WEIGHT * quantized.loss + RECON_WEIGHT * recon_loss + gen_loss
        used = torch.unique(quantized.ids).numel() / model.codebook_size
        logs.update({"vq": quantized.loss.item(), "recon_cos": recon_loss.item(), "batch_code_usage": used})
        if self.retrieval_weight or self.caption_weight:
            features = model.qformer.image_features(recon)
        if self.retrieval_weight:
            with torch.no_grad():
                targets = gather_with_grad(model.qformer.image_features(causal))
            labels = torch.arange(features.shape[0], device=features.device) + process_rank() * features.shape[0]
            retrieval = one_way_infonce(features, targets, labels)
            loss = loss + self.retrieval_weight * retrieval
            logs["retrieval"] = retrieval.item()
        if self.caption_weight:
            self.caption_bank = self.caption_bank.to(features.device)
            caption = one_way_infonce(features, self.caption_bank, batch["caption"].to(features.device))
            loss = loss + self.caption_weight * caption
            logs["caption"] = caption.item()
        if self.last_query_weight:
            last = (1 - F.cosine_similarity(recon[:, -1].float(), causal[:, -1].float(), dim=-1)).mean()
            loss = loss + self.last_query_weight * last
            logs["last_cos"] = last.item()
        return loss, logs
