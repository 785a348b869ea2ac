"""The emoji world: pool, determinism, splits, captions, the visibility rule."""

import re

import numpy as np
import pytest
from PIL import Image

from seedtok.data import emoji as E
from seedtok.data.emoji import PALETTE, EmojiWorld, article, caption_for, pool, render, split_combos
from seedtok.data.sources import DataError, Sample
from seedtok.errors import SeedtokError


def pixels(image):
    return np.asarray(image)


# ------------------------------------------------------------------------------------------------ pool
def test_pool_is_large_distinct_sorted_and_filtered():
    entries = pool()
    assert len(entries) >= 1000
    names = [e.name for e in entries]
    assert len(set(names)) == len(names)
    cps = [int(e.codepoint, 16) for e in entries]
    assert cps == sorted(cps) and len(set(cps)) == len(cps)
    assert pool() is entries  # cached
    for e in entries:
        assert e.name.isascii() and e.name == e.name.lower()
        assert ":" not in e.name and "_" not in e.name and e.name.strip() == e.name
        assert e.category not in ("Symbols", "Flags", "Component")
        cp = int(e.codepoint, 16)
        assert not 0x1F1E6 <= cp <= 0x1F1FF and not 0x1F3FB <= cp <= 0x1F3FF
        assert e.path.name == f"{e.codepoint}.png"
    assert entries[0].path.is_file() and entries[-1].path.is_file()
    by_name = {e.name: e for e in entries}
    assert by_name["red apple"].codepoint == "1f34e"
    assert by_name["red apple"].char == "\U0001F34E"


def test_palette_has_the_eleven_colours():
    assert list(PALETTE) == ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
                             "white", "gray"]
    assert len(set(PALETTE.values())) == 11


# ------------------------------------------------------------------------------------------------ determinism
def test_same_split_seed_index_gives_identical_pixels_in_any_order():
    a = EmojiWorld("train", seed=0)
    forward = [a[i] for i in range(8)]
    b = EmojiWorld("train", seed=0)
    backward = {i: b[i] for i in reversed(range(8))}
    for i, s in enumerate(forward):
        assert isinstance(s, Sample)
        assert np.array_equal(pixels(s.image), pixels(backward[i].image))
        assert s.caption == backward[i].caption and s.meta == backward[i].meta
    # far indices work and are independent of what was generated before
    assert np.array_equal(pixels(EmojiWorld("train", 0)[10**9].image), pixels(a[10**9].image))


def test_different_seeds_splits_and_indices_differ():
    def batch(split, seed):
        return [pixels(s.image) for s in EmojiWorld(split, seed).take(10)]

    base = batch("train", 0)
    for other in (batch("train", 1), batch("test", 0)):
        assert sum(not np.array_equal(x, y) for x, y in zip(base, other)) >= 9
    assert sum(not np.array_equal(base[i], base[i + 1]) for i in range(9)) >= 8


def test_iteration_and_take_match_indexing():
    world = EmojiWorld("val", seed=3)
    it = iter(world)
    first = [next(it) for _ in range(3)]
    taken = list(world.take(3, start=2))
    assert first[2].caption == taken[0].caption
    assert np.array_equal(pixels(first[2].image), pixels(world[2].image))
    assert len(taken) == 3


def test_bad_arguments():
    with pytest.raises(DataError):
        EmojiWorld("training")
    with pytest.raises(IndexError):
        EmojiWorld()[-1]
    with pytest.raises(DataError) as info:
        render(0, "teal", 0.5, 0, 0)
    assert isinstance(info.value, SeedtokError)
    with pytest.raises(DataError):
        render(0, "red", 0.9, 30, 0)  # 58 px at x=30 leaves the 64 px canvas
    with pytest.raises(DataError):
        render(len(pool()), "red", 0.5, 0, 0)


# ------------------------------------------------------------------------------------------------ scenes
def test_scene_geometry_meta_and_render_roundtrip():
    world = EmojiWorld("train", seed=7)
    for i in range(30):
        s = world[i]
        m = s.meta
        assert s.image.mode == "RGB" and s.image.size == (64, 64)
        assert set(m) >= {"emoji", "codepoint", "background", "scale", "x", "y"}
        assert 0.5 <= m["scale"] <= 0.9
        size = round(m["scale"] * 64)
        assert 0 <= m["x"] <= 64 - size and 0 <= m["y"] <= 64 - size
        entry = pool()[m["emoji_index"]]
        assert (entry.name, entry.codepoint) == (m["emoji"], m["codepoint"])
        assert np.array_equal(pixels(world.render(m["emoji_index"], m["background"], m["scale"], m["x"], m["y"])),
                              pixels(s.image))
        # outside the emoji's box the scene is the flat background colour
        outside = np.ones((64, 64), dtype=bool)
        outside[m["y"]:m["y"] + size, m["x"]:m["x"] + size] = False
        assert (pixels(s.image)[outside] == PALETTE[m["background"]]).all()


def test_scales_positions_and_backgrounds_are_spread():
    metas = [s.meta for s in EmojiWorld("train", 0).take(300)]
    scales = [m["scale"] for m in metas]
    assert min(scales) < 0.55 and max(scales) > 0.85
    assert len({m["background"] for m in metas}) == 11
    assert len({m["emoji"] for m in metas}) > 200
    assert min(m["x"] for m in metas) == 0 and max(m["x"] for m in metas) > 25


def test_captions_mention_emoji_and_background():
    for s in EmojiWorld("test", seed=0).take(100):
        m = s.meta
        assert m["emoji"] in s.caption and f"{m['background']} background" in s.caption
        name, colour = m["emoji"], m["background"]
        assert s.caption == f"{article(name)} {name} on {article(colour)} {colour} background"
        assert re.fullmatch(r"an? .+ on an? [a-z]+ background", s.caption)


@pytest.mark.parametrize("phrase, expected", [
    ("red apple", "a"), ("orange", "an"), ("eagle", "an"), ("unicorn", "a"), ("umbrella", "an"),
    ("hourglass done", "an"), ("honeybee", "a"), ("x-ray", "an"), ("t-shirt", "a"), ("e-mail", "an"),
    ("one-piece swimsuit", "a"), ("euro banknote", "a"), ("ok hand", "an"), ("1st place medal", "a"),
    ("8 ball", "an"), ("11 o'clock", "an"), ("ewe", "a"), ("upside-down face", "an"), ("mrs. claus", "a"),
])
def test_article(phrase, expected):
    assert article(phrase) == expected


def test_caption_for():
    assert caption_for("red apple", "blue") == "a red apple on a blue background"
    assert caption_for("owl", "orange") == "an owl on an orange background"


def _independent_visible_fraction(sample):
    """The documented rule, recomputed from the Twemoji PNG without the module's helpers."""
    m = sample.meta
    size = round(m["scale"] * 64)
    with Image.open(pool()[m["emoji_index"]].path) as im:
        sprite = np.asarray(im.convert("RGBA").resize((size, size), Image.Resampling.LANCZOS))
    opaque = sprite[..., 3] >= 128
    region = pixels(sample.image)[m["y"]:m["y"] + size, m["x"]:m["x"] + size].astype(int)
    differs = (np.abs(region - np.array(PALETTE[m["background"]])) > 48).any(axis=-1)
    return (differs & opaque).sum() / opaque.sum()


def test_scene_matches_an_independent_composite():
    """64x64 flat background, the 72x72 Twemoji resized with LANCZOS, alpha-composited at (x, y)."""
    for s in EmojiWorld("test", seed=4).take(20):
        m = s.meta
        size = round(m["scale"] * 64)
        with Image.open(pool()[m["emoji_index"]].path) as im:
            sprite = im.convert("RGBA").resize((size, size), Image.Resampling.LANCZOS)
        scene = Image.new("RGBA", (64, 64), PALETTE[m["background"]] + (255,))
        scene.alpha_composite(sprite, dest=(m["x"], m["y"]))
        assert np.array_equal(pixels(scene.convert("RGB")), pixels(s.image))


def test_visibility_rule_holds_on_generated_scenes():
    fractions = []
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        fractions += [_independent_visible_fraction(s) for s in EmojiWorld(split, seed).take(100)]
    assert min(fractions) >= 0.5


def test_invisible_combinations_are_never_drawn():
    table = E._visibility_table()
    invisible = {(i, c) for i in range(len(pool())) for j, c in enumerate(PALETTE) if table[i, j] < E.MIN_VISIBLE}
    assert invisible  # e.g. a yellow face on yellow
    grinning = next(i for i, e in enumerate(pool()) if e.name == "grinning face")
    assert (grinning, "yellow") in invisible
    for split in E.SPLITS:
        drawn = {(i, c) for i, cs in split_combos(split).items() for c in cs}
        assert not drawn & invisible
    # the table follows the documented rule on the 72x72 originals
    for i in (0, grinning, len(pool()) - 1):
        with Image.open(pool()[i].path) as im:
            rgba = np.asarray(im.convert("RGBA"))
        for j, colour in enumerate(PALETTE.values()):
            opaque = rgba[..., 3] >= 128
            differs = (np.abs(rgba[..., :3].astype(int) - colour) > 48).any(axis=-1)
            assert table[i, j] == pytest.approx((differs & opaque).sum() / opaque.sum())


# ------------------------------------------------------------------------------------------------ splits
def _pairs(split):
    return {(i, c) for i, colours in split_combos(split).items() for c in colours}


def test_split_combos_are_disjoint_and_cover_every_emoji_in_train():
    train, val, test = _pairs("train"), _pairs("val"), _pairs("test")
    assert not train & test and not train & val and not val & test
    n = len(pool())
    assert {i for i, _ in train} == set(range(n))  # every emoji appears in training
    assert len({i for i, _ in test}) > 0.95 * n
    for i, colours in split_combos("test").items():
        assert len(colours) == 2 and len(split_combos("val")[i]) == 1
        assert len(split_combos("train")[i]) >= 4
    assert EmojiWorld("test", seed=0).combos() == EmojiWorld("test", seed=99).combos()  # not the sample seed


def test_samples_stay_in_their_split():
    train = _pairs("train")
    for split in ("test", "val"):
        allowed = _pairs(split)
        for s in EmojiWorld(split, seed=5).take(150):
            combo = (s.meta["emoji_index"], s.meta["background"])
            assert combo in allowed and combo not in train
    for s in EmojiWorld("train", seed=5).take(150):
        assert (s.meta["emoji_index"], s.meta["background"]) in train
