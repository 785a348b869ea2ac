"""LM evaluation (stage 3): captioning, VQA, text-to-image and language kept, on emoji-world scenes.

Metrics (`evaluate_lm`):
- ``caption_name_acc`` / ``caption_color_acc``: the generated caption parsed as "a(n) NAME on a(n) COLOUR
  background"; exact match of NAME with the scene's emoji and COLOUR with its background (percent).
- ``cider``: CIDEr-D against the scene's reference caption (`cider_d`).
- ``vqa_acc``: exact match (case- and punctuation-insensitive) on generated questions, one of each kind
  (which emoji, which background colour, is there a ...) per scene (percent).
- ``t2i_identity_top1`` / ``_top5`` / ``t2i_background_acc``: images drawn from the reference captions
  (ids -> `SeedTokenizer.decode`) scored by `EmojiScorer` (percent); None when the tokenizer has no image decoder.
- ``caption_nll_own`` / ``caption_nll_other``: the reference caption's loss (nats per token, image first) after
  the scene's own ids and after the next scene's: how much the LM's captions depend on the image it sees
  (equal when it ignores the image).
- ``draw_nll_own`` / ``draw_nll_other``: the scene's own 32 codes' loss (nats per code, the LM's scores over
  the code tokens only, as constrained drawing sees them) after its reference caption and after another
  scene's caption: a teacher-forced measure of drawing that counts every code (log 1024 = 6.93 for a uniform guess
  over the tiny codebook; equal when the drawing ignores the text).
- ``text_ppl_base`` / ``text_ppl_tuned``: perplexity of a small fixed held-out plain-text set with the adapter
  off and on: the tuned LM should keep its language.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from ..data.questions import KINDS, emoji_question
from ..models.lm import IGNORE

# Held-out plain English (written for this project; not emoji captions), for text perplexity.
HELD_OUT_TEXT = (
    "The river was cold in the morning, and the fishermen waited on the bank until the fog had lifted.",
    "Most bread is made from flour, water, salt and yeast, mixed into a dough and left to rise before baking.",
    "When the train arrived late, the passengers hurried across the platform to catch the last bus home.",
    "A good library keeps old books in a cool, dry room so that the paper does not turn yellow too quickly.",
    "She opened the window, looked at the clouds over the hills, and decided to take an umbrella with her.",
    "Computers store numbers in binary, using only two digits, zero and one, to represent every value.",
    "The children planted tomatoes in the garden and watered them every evening during the dry summer.",
    "After the meeting, the committee agreed to publish its report before the end of the month.",
)

_CAPTION = re.compile(r"^an? (?P<name>.+) on an? (?P<color>[a-z]+) background")


def parse_caption(caption: str) -> tuple[str | None, str | None]:
    """"a red apple on a blue background" -> ("red apple", "blue"); (None, None) when it does not parse."""
    match = _CAPTION.match(caption.strip().lower())
    return (match.group("name"), match.group("color")) if match else (None, None)


def _normalize_answer(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


# ------------------------------------------------------------------------------------------------ CIDEr-D
def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
            ) -> float:
    """CIDEr-D (Vedantam et al. 2015, as in the coco-caption code): n-grams 1..4, tf-idf with document
    frequencies over the references of the whole set, per-n cosine with clipping of the candidate's counts at
    the reference's, Gaussian length penalty exp(-(len_c - len_r)^2 / (2 sigma^2)) with sigma 6, averaged over
    references and n, x10. Returns the corpus mean."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        return 0.0
    refs_words = [[_tokens(r) for r in refs] for refs in references]
    cand_words = [_tokens(c) for c in candidates]
    df: Counter = Counter()
    for refs in refs_words:
        seen = set()
        for words in refs:
            for k in range(1, n + 1):
                seen.update(_ngrams(words, k))
        df.update(seen)
    log_n = math.log(float(len(candidates)))

    def vec(words: list[str]):
        vecs, norms = [], []
        for k in range(1, n + 1):
            counts = _ngrams(words, k)
            v = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms, len(words)

    scores = []
    for cand, refs in zip(cand_words, refs_words):
        cv, cn, cl = vec(cand)
        total = np.zeros(n)
        for ref in refs:
            rv, rn, rl = vec(ref)
            for k in range(n):
                dot = sum(min(x, rv[k][g]) * rv[k][g] for g, x in cv[k].items() if g in rv[k])
                if cn[k] and rn[k]:
                    total[k] += dot / (cn[k] * rn[k]) * math.exp(-((cl - rl) ** 2) / (2 * sigma ** 2))
        scores.append(float(total.mean()) / max(1, len(refs)) * 10.0)
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------------------ evaluation
@torch.inference_mode()
def caption_nll(lm, ids: torch.Tensor, captions: Sequence[str], batch_size: int = 8) -> float:
    """Mean loss (nats per labelled token) of each caption (and its end token) after its row of ``ids``."""
    total, count = 0.0, 0
    for start in range(0, len(captions), batch_size):
        rows = range(start, min(len(captions), start + batch_size))
        batch = lm.collate([lm.caption_sequence(ids[i], captions[i], True, label_image=False) for i in rows],
                           max_length=10_000)
        out = lm(**{k: v.to(lm.device) for k, v in batch.items()})  # loss: mean over the labelled tokens
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        total, count = total + out.loss.item() * labelled, count + labelled
    return total / max(1, count)


@torch.inference_mode()
def drawing_nll(lm, ids: torch.Tensor, captions: Sequence[str], batch_size: int = 8) -> float:
    """Mean loss (nats per code) of each row of ``ids`` drawn after its caption (``draw_prompt``: the caption,
    then ``<img>``), with the LM's scores restricted to the code tokens, as constrained drawing samples them."""
    codes = lm.image_token_ids().to(lm.device)
    total, count = 0.0, 0
    for start in range(0, len(captions), batch_size):
        rows = range(start, min(len(captions), start + batch_size))
        sequences = []
        for i in rows:
            prompt = lm.draw_prompt(captions[i])
            image = [lm.image_offset + c for c in lm.check_image_ids(ids[i])]
            sequences.append((prompt + image, [IGNORE] * len(prompt) + image))
        batch = lm.collate(sequences, max_length=10_000)
        logits = lm(input_ids=batch["input_ids"].to(lm.device),
                    attention_mask=batch["attention_mask"].to(lm.device)).logits[:, :-1]
        target = batch["labels"][:, 1:].to(lm.device)
        keep = target != IGNORE
        scores = logits[keep][:, codes].float()
        nll = torch.nn.functional.cross_entropy(scores, target[keep] - lm.image_offset, reduction="sum")
        total, count = total + nll.item(), count + int(keep.sum())
    return total / max(1, count)


def evaluate_lm(lm, samples: Sequence, n: int | None = None, batch_size: int = 8, t2i: bool = True,
                seed: int = 0, progress: bool = True, scorer=None, draw_sampling: dict | None = None) -> dict:
    """Score a SeedLM on emoji-world samples (``Sample``s with meta "emoji", "background", "emoji_index").
    ``draw_sampling``: ``temperature`` / ``top_p`` / ``top_k`` for the drawings (default: the LM config's,
    SPEC §3); the result records what was used."""
    from tqdm import tqdm

    draw_sampling = dict(draw_sampling or {})
    n = min(len(samples), n or len(samples))
    items = [samples[i] for i in range(n)]
    images = [s.image for s in items]
    ids = lm.image_tokenizer.encode(images, batch_size=batch_size).cpu()
    captions: list[str] = []
    answers: list[tuple[str, str]] = []
    rng = np.random.default_rng(seed)
    questions = [[emoji_question(s.meta, kind, rng) for kind in KINDS] for s in items]
    starts = range(0, n, batch_size)
    for start in (tqdm(starts, desc="caption + vqa", unit="batch") if progress else starts):
        stop = min(n, start + batch_size)
        captions += lm.caption(ids[start:stop])
        for k in range(len(KINDS)):
            rows = [i for i in range(start, stop) if questions[i][k] is not None]
            if rows:
                got = lm.ask(ids[rows], [questions[i][k][0] for i in rows])
                answers += [(g, questions[i][k][1]) for g, i in zip(got, rows)]
    parsed = [parse_caption(c) for c in captions]
    result = {
        "n": n,
        "caption_name_acc": 100.0 * float(np.mean([p[0] == s.meta.get("emoji") for p, s in zip(parsed, items)])),
        "caption_color_acc": 100.0 * float(np.mean([p[1] == s.meta.get("background") for p, s in zip(parsed, items)])),
        "cider": cider_d(captions, [[s.caption] for s in items]),
        "vqa_acc": 100.0 * float(np.mean([_normalize_answer(g) == _normalize_answer(a) for g, a in answers]))
        if answers else None,
        "t2i_identity_top1": None, "t2i_identity_top5": None, "t2i_background_acc": None,
        "draw_sampling": {"temperature": lm.config.temperature, "top_p": lm.config.top_p, "top_k": lm.config.top_k,
                          **draw_sampling},
        "examples": [{"caption": c, "reference": s.caption} for c, s in zip(captions[:5], items)],
    }
    if t2i:
        tok = lm.image_tokenizer
        if not callable(getattr(tok, "decode", None)):
            print("seedtok: skipping text-to-image metrics: this image tokenizer has no image decoder "
                  "(SeedTokenizer.decode)", file=sys.stderr)
        else:
            drawn = []
            for start in (tqdm(starts, desc="draw", unit="batch") if progress else starts):
                prompts = [s.caption for s in items[start:start + batch_size]]
                drawn.append(lm.draw(prompts, seed=seed + start, **draw_sampling))
            try:
                pictures = tok.decode(torch.cat(drawn))
            except Exception as exc:  # noqa: BLE001 - a missing/untrained decoder must not lose the other metrics
                print(f"seedtok: skipping text-to-image metrics: decode failed ({exc})", file=sys.stderr)
                pictures = None
            if pictures is not None:
                if scorer is None:
                    from .emoji_scorer import EmojiScorer

                    scorer = EmojiScorer()
                scored = scorer.score(pictures, [s.meta for s in items])
                result.update(t2i_identity_top1=scored.identity_top1, t2i_identity_top5=scored.identity_top5,
                              t2i_background_acc=scored.background_acc)
    references = [s.caption for s in items]
    result["caption_nll_own"] = caption_nll(lm, ids, references, batch_size)
    result["caption_nll_other"] = caption_nll(lm, ids.roll(1, dims=0), references, batch_size)
    result["draw_nll_own"] = drawing_nll(lm, ids, references, batch_size)
    result["draw_nll_other"] = drawing_nll(lm, ids.roll(1, dims=0), references, batch_size)
    result["text_ppl_base"] = lm.perplexity(HELD_OUT_TEXT, base=True)
    result["text_ppl_tuned"] = lm.perplexity(HELD_OUT_TEXT)
    return result
