"""The abilities the web app and the demo report show, behind one object:

    tokenize     image -> 32 ids
    detokenize   ids -> image (the tokenizer's image decoder)
    reconstruct  image -> ids -> image
    caption      image (or its ids) -> text (SeedLM)
    ask          image (or its ids) + question -> answer (SeedLM)
    draw         prompt -> ids (SeedLM) -> image (the image decoder)

One copy of each model is in memory, and every model call holds one lock: concurrent requests are served one
at a time. Two forwards at once would gain nothing on a small CPU (each already uses every core), and the
models hold state that is not made for threads (the lazily loaded image decoder, the LM's text-id cache).

An ability whose weights are missing (no ``decoder/`` folder, no bundled LM) is *unavailable*: its reason is one
line (`Engine.abilities`), calls to it raise `UnavailableError`, and the rest keeps working.
"""

from __future__ import annotations

import io
import sys
import threading
import warnings
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from ..data.transforms import load_image, to_rgb
from ..errors import ImageError, ImageTooLargeError, SeedtokError, UnavailableError  # noqa: F401 (re-exported)

ABILITIES = ("tokenize", "detokenize", "reconstruct", "caption", "ask", "draw")
# Image formats accepted from uploads: what a browser or a camera produces. Restricting PIL's decoders keeps
# rarely used (and rarely hardened) parsers out of reach of the network.
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
MAX_PIXELS = 40_000_000  # a 10 MB upload can still claim 2^30 pixels (decompression bomb); checked before decoding
MAX_TEXT = 300  # characters of a question or prompt


def image_from_bytes(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Uploaded bytes -> an RGB PIL image, or a one-line `ImageError` (empty, not an image, an unsupported
    format, corrupt, too many pixels). The pixel count is read from the header and checked before decoding."""
    if not data:
        raise ImageError("the upload is empty")
    try:
        with warnings.catch_warnings():  # over PIL's MAX_IMAGE_PIXELS: refused below, no warning needed
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
        with im:
            width, height = im.size
            image = None
            if width * height <= max_pixels:
                im.seek(0)  # animated images: first frame
                im.load()
                image = im.copy()
    except UnidentifiedImageError:
        raise ImageError(f"not an image, or not one of {', '.join(UPLOAD_FORMATS)}") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large (decompression bomb guard): {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    if image is None:
        raise ImageTooLargeError(f"image too large: {width}x{height} pixels (at most {max_pixels:,})")
    return to_rgb(image)


def unavailable_lines(unavailable: dict[str, str]) -> list[str]:
    """{ability: reason} -> one line per distinct reason, naming the abilities it stops."""
    by_reason: dict[str, list[str]] = {}
    for ability, why in unavailable.items():
        by_reason.setdefault(why, []).append(ability)
    return [f"{', '.join(names)} unavailable: {why}" for why, names in by_reason.items()]


def check_text(text: str, what: str) -> str:
    text = (text or "").strip()
    if not text:
        raise SeedtokError(f"the {what} is empty")
    if len(text) > MAX_TEXT:
        raise SeedtokError(f"the {what} is too long ({len(text)} characters, at most {MAX_TEXT})")
    return text


class Engine:
    """A tokenizer (required) and optionally a SeedLM sharing it; see the module docstring.

    ``lm_reason``: why there is no LM (shown instead of the LM abilities). The image decoder is looked for at
    construction (``tokenizer.image_decoder()``), so a missing one is known before the first request."""

    def __init__(self, tokenizer, lm=None, *, lm_reason: str | None = None, model_name: str = "",
                 lm_name: str = ""):
        self.tokenizer = tokenizer
        self.lm = lm
        self.model_name = model_name or tokenizer.config.name
        self.lm_name = lm_name or (lm.config.name if lm is not None else "")
        self._lock = threading.Lock()
        self.decoder_reason: str | None = None
        try:
            tokenizer.image_decoder()
        except SeedtokError as exc:  # CheckpointError: no decoder/ folder, or one that does not fit
            self.decoder_reason = str(exc)
        self.lm_reason = None if lm is not None else (lm_reason or "no language model loaded")
        if lm is not None:
            lm.image_tokenizer = tokenizer  # one tokenizer in memory (and a ConfigError when they do not fit)

    @classmethod
    def load(cls, model: str = "tiny", lm: str | None = "tiny", dtype: str = "fp32",
             log: Callable[[str], None] | None = None) -> "Engine":
        """Load a tokenizer (preset or folder; errors propagate: nothing works without it) and an LM (preset
        or folder; ``None``: none). A missing or unfitting LM leaves its abilities unavailable, with the
        reason."""
        from ..models.lm import SeedLM
        from ..models.tokenizer import SeedTokenizer

        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        log(f"seedtok: loading tokenizer {model} ...")
        tokenizer = SeedTokenizer.from_pretrained(model, dtype=dtype)
        seed_lm, reason = None, None
        if lm is None:
            reason = "no language model requested"
        else:
            log(f"seedtok: loading language model {lm} ...")
            try:
                seed_lm = SeedLM.from_pretrained(lm).fuse()
                seed_lm.image_tokenizer = tokenizer
            except SeedtokError as exc:
                seed_lm, reason = None, str(exc)
        engine = cls(tokenizer, seed_lm, lm_reason=reason, model_name=str(model), lm_name=str(lm or ""))
        for line in engine.unavailable_lines():
            log(f"seedtok: {line}")
        return engine

    # ------------------------------------------------------------------------------------------- status
    def reason(self, ability: str) -> str | None:
        """Why ``ability`` is unavailable, in one line; None when it works."""
        if ability in ("detokenize", "reconstruct"):
            return self.decoder_reason
        if ability in ("caption", "ask", "draw"):
            return self.lm_reason  # draw without a decoder still gives ids (`draw` returns no images)
        if ability == "tokenize":
            return None
        raise ValueError(f"unknown ability {ability!r}")

    def unavailable(self) -> dict[str, str]:
        return {a: r for a in ABILITIES if (r := self.reason(a)) is not None}

    def unavailable_lines(self) -> list[str]:
        """One line per missing part: "caption, ask, draw unavailable: <reason>"."""
        return unavailable_lines(self.unavailable())

    def info(self) -> dict:
        """What the page shows about the models and which abilities work."""
        tok = self.tokenizer
        return {"model": self.model_name, "lm": self.lm_name or None, "num_tokens": tok.num_tokens,
                "codebook_size": tok.codebook_size,
                "abilities": {a: {"available": self.reason(a) is None, "reason": self.reason(a)} for a in ABILITIES},
                "draw_images": self.decoder_reason is None}

    def _need(self, ability: str) -> None:
        why = self.reason(ability)
        if why is not None:
            raise UnavailableError(f"{ability} is unavailable: {why}")

    # ------------------------------------------------------------------------------------------- abilities
    def tokenize(self, images: Sequence) -> torch.Tensor:
        """Images -> ids [B, num_tokens]."""
        images = [load_image(im) for im in images]
        with self._lock:
            return self.tokenizer.encode(images)

    def check_ids(self, ids) -> torch.Tensor:
        """Validated ids [B, num_tokens] on the CPU (an `IdsError` otherwise)."""
        return self.tokenizer.check_ids(ids).cpu()

    def detokenize(self, ids, seed: int = 0) -> list[Image.Image]:
        self._need("detokenize")
        ids = self.check_ids(ids)
        with self._lock:
            return self.tokenizer.decode(ids, seed=seed)

    def reconstruct(self, images: Sequence, seed: int = 0) -> tuple[torch.Tensor, list[Image.Image]]:
        self._need("reconstruct")
        ids = self.tokenize(images)
        return ids, self.detokenize(ids, seed=seed)

    def caption(self, images_or_ids) -> list[str]:
        """Images, or their ids [B, N] (a LongTensor), -> one caption each (greedy)."""
        self._need("caption")
        source = self._lm_input(images_or_ids)
        with self._lock:
            return self.lm.caption(source)

    def ask(self, images_or_ids, questions: str | Sequence[str]) -> list[str]:
        self._need("ask")
        questions = [questions] if isinstance(questions, str) else list(questions)
        questions = [check_text(q, "question") for q in questions]
        source = self._lm_input(images_or_ids)
        if len(questions) == 1:
            questions = questions * len(source)
        with self._lock:
            return self.lm.ask(source, questions)

    def draw(self, prompts: str | Sequence[str], seed: int = 0) -> tuple[torch.Tensor, list[Image.Image] | None]:
        """Prompts -> (ids [B, N], images, or None without an image decoder). Row i samples with seed + i."""
        self._need("draw")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompts = [check_text(p, "prompt") for p in prompts]
        with self._lock:
            ids = self.lm.draw(prompts, seed=seed)
            images = self.tokenizer.decode(ids, seed=seed) if self.decoder_reason is None else None
        return ids, images

    def _lm_input(self, images_or_ids):
        if torch.is_tensor(images_or_ids) and not images_or_ids.is_floating_point():
            return self.check_ids(images_or_ids)
        return self.tokenize(list(images_or_ids))
