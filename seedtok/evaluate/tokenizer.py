"""Tokenizer evaluation: the paper's zero-shot retrieval table in miniature (SPEC §4), and codebook health.

Retrieval uses the stage-1 contrastive head on the last query:
- ``embeddings``: the causal Q-Former's embeddings;
- ``codes``: ids -> codebook -> the de-tokenizer's reconstruction branch -> the same head (what survives VQ);
- ``bidirectional``: a baseline Q-Former trained by the same command with ``--no-causal``.

Captions with identical text are indistinguishable, so a retrieved caption (or image) counts as correct when
its text equals the ground truth's. Codebook health on the same images: usage (share of codes used),
perplexity of the code distribution, and dead codes (never used).

Generation (presets whose teacher is the vision encoder's own pooled features, ``teacher="vision_pooled"``):
how well the de-tokenizer's generation embedding of each image's codes matches that image's teacher embedding,
what the image decoder learned from: cosine, MSE, MSE after z-scoring each dimension by the eval images'
teacher statistics, and ``teacher_r1``: the share of images whose generation embedding is nearest (cosine of
the z-scored vectors) to their own teacher among all the eval images' teachers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.sources import Sample
from ..models.tokenizer import SeedTokenizer


@dataclass
class RetrievalFeatures:
    image: torch.Tensor  # [N, D] normalised
    text: torch.Tensor  # [M, D] normalised


def recall_at_k(image_feats: torch.Tensor, text_feats: torch.Tensor, text_image: torch.Tensor,
                same_text: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image recall in percent.

    ``text_image[j]``: index of caption j's image. ``same_text[j, j']``: captions j and j' are the same text."""
    sims = image_feats @ text_feats.t()  # [N, M]
    n_images = image_feats.shape[0]
    # which captions are correct for each image: its own, or any caption with the same text as one of its own
    own = torch.zeros(n_images, text_feats.shape[0], dtype=torch.bool)
    own[text_image, torch.arange(text_feats.shape[0])] = True
    correct_i2t = (own.float() @ same_text.float()) > 0
    out = {}
    order = sims.argsort(dim=1, descending=True)
    for k in ks:
        hits = torch.gather(correct_i2t, 1, order[:, :k]).any(dim=1)
        out[f"i2t_r{k}"] = 100.0 * hits.float().mean().item()
    order_t = sims.t().argsort(dim=1, descending=True)  # [M, N]
    correct_t2i = correct_i2t.t()  # caption j is correct for image i
    for k in ks:
        hits = torch.gather(correct_t2i, 1, order_t[:, :k]).any(dim=1)
        out[f"t2i_r{k}"] = 100.0 * hits.float().mean().item()
    return out


def codebook_health(ids: torch.Tensor, codebook_size: int) -> dict[str, float]:
    counts = torch.bincount(ids.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"usage": 100.0 * used / codebook_size, "perplexity": float(entropy.exp()),
            "dead": codebook_size - used}


@torch.inference_mode()
def retrieval_features(model: SeedTokenizer, samples: Sequence[Sample], captions: list[str],
                       batch_size: int = 64, progress: bool = False) -> dict[str, torch.Tensor]:
    """Contrastive features of the images (from embeddings and from codes), of the captions, and the ids."""
    qformer = model.qformer
    emb_feats, code_feats, ids_all, generation, teacher = [], [], [], [], []
    pooled = model.config.detokenizer.teacher == "vision_pooled"
    starts = range(0, len(samples), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="eval images", unit="batch")
    for start in starts:
        pixels = model.preprocess([samples[i].image for i in range(start, min(start + batch_size, len(samples)))])
        features = model.vision.features(pixels.to(model.device))  # = model(pixels), split open
        causal = qformer(model.vision.normalize(features))  # so that the teacher reuses the features
        ids = model.quantizer(causal).ids
        emb_feats.append(qformer.image_features(causal).float())
        ids_all.append(ids)
        codes = model.codes(ids)
        if model.config.detokenizer.reconstruction_branch:
            code_feats.append(qformer.image_features(model.detokenizer.reconstruct(codes)).float())
        if pooled:
            generation.append(model.detokenizer.generation_embeddings(codes).float())
            teacher.append(model.vision.pooled_teacher(features).float())
    result = {"embeddings": torch.cat(emb_feats), "text": model.caption_features(captions),
              "ids": torch.cat(ids_all).cpu()}
    if code_feats:
        result["codes"] = torch.cat(code_feats)
    if pooled:
        result["generation"], result["teacher"] = torch.cat(generation), torch.cat(teacher)
    return result


def generation_agreement(generation: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Generation embeddings vs their images' teacher embeddings [N, D] (see the module docstring)."""
    mean, std = teacher.mean(0), teacher.std(0).clamp(min=1e-3)
    gen_z, teacher_z = (generation - mean) / std, (teacher - mean) / std
    similarity = F.normalize(gen_z, dim=-1) @ F.normalize(teacher_z, dim=-1).t()
    hits = similarity.argmax(dim=1) == torch.arange(len(generation), device=generation.device)
    return {"cosine": float(F.cosine_similarity(generation, teacher, dim=-1).mean()),
            "mse": float(F.mse_loss(generation, teacher)), "standardized_mse": float(F.mse_loss(gen_z, teacher_z)),
            "teacher_r1": 100.0 * float(hits.float().mean())}


def evaluate_tokenizer(model: SeedTokenizer, samples: Sequence[Sample], baseline: SeedTokenizer | None = None,
                       captions: list[tuple[int, str]] | None = None, progress: bool = False) -> dict:
    """The retrieval table and codebook health. ``captions`` = (image index, text) pairs; default: each
    sample's own caption."""
    if captions is None:
        captions = [(i, samples[i].caption) for i in range(len(samples))]
    texts = [c for _, c in captions]
    text_image = torch.tensor([i for i, _ in captions])
    index = {t: k for k, t in enumerate(dict.fromkeys(texts))}
    groups = torch.tensor([index[t] for t in texts])
    same_text = groups[:, None] == groups[None, :]
    feats = retrieval_features(model, samples, texts, progress=progress)
    retrieval = {"embeddings": recall_at_k(feats["embeddings"], feats["text"], text_image, same_text)}
    if "codes" in feats:
        retrieval["codes"] = recall_at_k(feats["codes"], feats["text"], text_image, same_text)
    if baseline is not None:
        base = retrieval_features(baseline, samples, texts, progress=progress)
        retrieval["bidirectional"] = recall_at_k(base["embeddings"], base["text"], text_image, same_text)
    result = {"retrieval": retrieval, "codebook": codebook_health(feats["ids"], model.codebook_size),
              "num_images": len(samples), "num_captions": len(texts)}
    if "generation" in feats:
        result["generation"] = generation_agreement(feats["generation"], feats["teacher"])
    return result

