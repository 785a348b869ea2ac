"""Reconstruction through the codes: image -> ids -> image, scored on emoji-world scenes.

``evaluate_decoder`` tokenizes each test scene, decodes its ids (one seed per image, so the numbers do not
depend on the batch size), and scores the reconstructions with ``EmojiScorer``:

- ``identity_top1`` / ``identity_top5``: share of reconstructions whose nearest (top-5) scorer template is the
  original emoji; ``background_acc``: share whose detected background is the original colour (percent);
- ``ceiling_top1`` / ``ceiling_top5``: the same scorer on the original scenes (what a perfect decoder gets);
- ``embed_cosine``: mean cosine between the original's and the reconstruction's pooled features;
- ``images_per_s``: reconstructions per second (tokenize + decode, scoring excluded);
- ``decode_settings``: the guidance, steps and (tiny) strength and text prior the reconstructions used.
"""

from __future__ import annotations

import time
from typing import Sequence

from ..data.sources import DataError, Sample

__all__ = ["decode_settings", "evaluate_decoder"]

DEFAULT_TEMPLATE_CACHE = "~/.cache/seedtok/emoji-templates"


def decode_settings(decoder, decode_kwargs: dict) -> dict:
    """The decoder settings a run used: the caller's overrides, else the decoder's own defaults (the tiny
    decoder's ``strength`` and text prior from its ``model_index.json``)."""
    config = getattr(decoder.pipeline, "config", {})
    settings = {"guidance_scale": decoder.guidance_scale, "num_inference_steps": decoder.num_inference_steps}
    own = ("strength", "text_prior", "text_prior_weight", "text_prior_temperature", "text_prior_background")
    settings.update({k: config[k] for k in own if k in config})
    settings.update({k: v for k, v in decode_kwargs.items() if v is not None and k in settings})
    return settings


def evaluate_decoder(tokenizer, samples: Sequence[Sample], scorer=None, batch_size: int = 16, seed: int = 0,
                     progress: bool = True, return_images: bool = False, **decode_kwargs) -> dict:
    """Reconstruct ``samples`` (emoji-world scenes: each ``meta`` has "emoji_index" and "background") through
    ``tokenizer``'s codes and image decoder; returns the metrics above (and ``num_images``). ``scorer``: an
    ``EmojiScorer`` (default: one with its template banks cached in ~/.cache/seedtok). Keyword arguments go to
    ``SeedTokenizer.decode`` (``guidance_scale``, ``num_inference_steps``, ...)."""
    truth = [s.meta for s in samples]
    for i, meta in enumerate(truth):
        if "emoji_index" not in meta or "background" not in meta:
            raise DataError(f"sample {i} has no emoji_index/background in its metadata: decoder evaluation "
                            f"needs emoji-world scenes (`seedtok data emoji --split test --out DIR`)")
    if scorer is None:
        from .emoji_scorer import EmojiScorer

        scorer = EmojiScorer(cache_dir=DEFAULT_TEMPLATE_CACHE)
    originals = [s.image for s in samples]
    decoder = tokenizer.image_decoder()  # load it before the clock starts
    starts = range(0, len(originals), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="reconstruct", unit="batch")
    recon, start_time = [], time.perf_counter()
    for start in starts:
        chunk = originals[start:start + batch_size]
        ids = tokenizer.encode(chunk, batch_size=batch_size)
        recon.extend(tokenizer.decode(ids, seed=[seed + start + i for i in range(len(chunk))], **decode_kwargs))
    seconds = time.perf_counter() - start_time
    scored = scorer.score(recon, truth)
    ceiling = scorer.score(originals, truth)
    result = {"identity_top1": scored.identity_top1, "identity_top5": scored.identity_top5,
              "background_acc": scored.background_acc,
              "embed_cosine": scorer.embed_cosine(originals, recon),
              "ceiling_top1": ceiling.identity_top1, "ceiling_top5": ceiling.identity_top5,
              "images_per_s": len(recon) / seconds if seconds > 0 else float("nan"),
              "num_images": len(recon), "decode_settings": decode_settings(decoder, decode_kwargs)}
    if return_images:
        result["images"] = recon
    return result
