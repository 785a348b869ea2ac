"""Questions about emoji-world scenes, generated from their metadata (instruction data for the LM, and the
VQA evaluation): which emoji, which background colour, is there a ... (yes / no)."""

from __future__ import annotations

import numpy as np

KINDS = ("emoji", "color", "exists")


def emoji_question(meta: dict, kind: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) about a scene, or None when ``meta`` is not an emoji-world scene."""
    if "emoji" not in meta or "background" not in meta:
        return None
    if kind == "emoji":
        return "What emoji is in the image?", meta["emoji"]
    if kind == "color":
        return "What color is the background?", meta["background"]
    if kind == "exists":
        from .emoji import article, pool

        names = pool()
        if rng.random() < 0.5:
            name, answer = meta["emoji"], "yes"
        else:
            name = meta["emoji"]
            while name == meta["emoji"]:
                name = names[int(rng.integers(len(names)))].name
            answer = "no"
        return f"Is there {article(name)} {name} in the image?", answer
    raise ValueError(f"unknown question kind {kind!r}")
