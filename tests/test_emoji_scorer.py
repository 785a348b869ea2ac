"""The emoji-world scorer: background detection, the crop path shared by scenes and templates, and the ceiling
on real test-split scenes (clean, blurred, JPEG-compressed).

Building a template bank costs ~2,300 EfficientNet-Lite0 forwards at 128 px, so the ceiling is measured on the
first 200 test scenes of one background colour (one bank); the report's 500-scene numbers cover all colours.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from seedtok.data.emoji import PALETTE, EmojiWorld, pool, render
from seedtok.evaluate import emoji_scorer as ES
from seedtok.evaluate.emoji_scorer import (EmojiScorer, ScoreResult, detect_background, normalize_scene,
                                           template_scene)

COLOUR = "purple"
N_SCENES = 200


def jpeg(image, quality=50):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def index_of(name):
    return next(i for i, e in enumerate(pool()) if e.name == name)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return EmojiScorer(cache_dir=tmp_path_factory.mktemp("emoji-templates"))


@pytest.fixture(scope="module")
def scenes():
    world = EmojiWorld("test", seed=0)
    out, i = [], 0
    while len(out) < N_SCENES:
        sample = world[i]
        if sample.meta["background"] == COLOUR:
            out.append(sample)
        i += 1
    return out


# ------------------------------------------------------------------------------------------------ no model
@pytest.mark.parametrize("size", [64, 37, 128])
def test_background_detector_gets_every_palette_colour_on_flat_images(size):
    rng = np.random.default_rng(size)
    for name, colour in PALETTE.items():
        assert detect_background(Image.new("RGB", (size, size), colour)) == name
        noisy = np.clip(np.asarray(colour)[None, None] + rng.integers(-20, 21, (size, size, 3)), 0, 255)
        assert detect_background(Image.fromarray(noisy.astype(np.uint8))) == name


def test_background_detector_ignores_an_emoji_touching_the_border():
    e = index_of("red apple")
    for name in ("blue", "white", "black"):
        for x, y in ((0, 0), (6, 0), (0, 6)):  # the biggest size the world draws, in a corner
            assert detect_background(render(e, name, 57 / 64, x, y)) == name


def test_templates_come_from_the_same_render_path_as_scenes(scenes):
    for sample in scenes[:10]:
        meta = sample.meta
        scene = template_scene(meta["emoji_index"], meta["background"], scale=meta["scale"])
        size = round(meta["scale"] * 64)
        offset = (64 - size) // 2
        assert np.array_equal(np.asarray(scene), np.asarray(render(meta["emoji_index"], meta["background"],
                                                                   meta["scale"], offset, offset)))
        # the crop is translation-invariant: the world's scene and the centred template give identical pixels
        view = normalize_scene(sample.image)
        assert view.size == (ES.INPUT_SIZE, ES.INPUT_SIZE)
        assert np.array_equal(np.asarray(view), np.asarray(normalize_scene(scene, meta["background"])))
    blurred = template_scene(0, COLOUR, blur=True)
    assert np.array_equal(np.asarray(blurred),
                          np.asarray(template_scene(0, COLOUR).filter(ImageFilter.GaussianBlur(ES.TEMPLATE_BLUR))))


def test_crop_recentres_and_fills_and_falls_back_on_flat_or_noisy_images():
    e = index_of("rocket")
    small = normalize_scene(render(e, "green", 0.5, 0, 30))
    big = normalize_scene(render(e, "green", 0.9, 5, 1))
    a, b = np.asarray(small).astype(int), np.asarray(big).astype(int)
    for view in (a, b):
        mask = np.abs(view - np.asarray(PALETTE["green"])).max(-1) > 48
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        long_side = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
        assert abs(long_side - ES.FILL * ES.INPUT_SIZE) <= 3
        assert abs((rows[0] + rows[-1]) / 2 - 63.5) <= 2 and abs((cols[0] + cols[-1]) / 2 - 63.5) <= 2
    flat = normalize_scene(Image.new("RGB", (64, 64), PALETTE["pink"]))
    assert np.array_equal(np.asarray(flat), np.full((128, 128, 3), PALETTE["pink"], dtype=np.uint8))
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert normalize_scene(noise).size == (128, 128)  # a degenerate case still gives a valid view


# ------------------------------------------------------------------------------------------------ model
def test_ceiling_on_clean_scenes(scorer, scenes):
    result = scorer.score([s.image for s in scenes], [s.meta for s in scenes])
    assert isinstance(result, ScoreResult)
    assert result.top5.shape == (N_SCENES, 5) and result.top5_cosine.shape == (N_SCENES, 5)
    assert (result.top5_cosine[:, :-1] >= result.top5_cosine[:, 1:]).all()
    assert result.identity_top1 >= 97.0
    assert result.identity_top5 >= result.identity_top1
    assert result.background_acc >= 99.0
    assert set(result.metrics()) == {"identity_top1", "identity_top5", "background_acc"}


@pytest.mark.parametrize("degrade", ["blur", "jpeg"])
def test_ceiling_survives_blur_and_jpeg(scorer, scenes, degrade):
    fn = {"blur": lambda im: im.filter(ImageFilter.GaussianBlur(1)), "jpeg": jpeg}[degrade]
    result = scorer.score([fn(s.image) for s in scenes], [s.meta for s in scenes])
    assert result.identity_top1 >= 85.0
    assert result.background_acc >= 99.0


def test_a_scene_with_the_wrong_emoji_scores_as_that_emoji(scorer, scenes):
    images, others = [], []
    for sample, name in zip(scenes, ("red apple", "rocket", "pizza", "bicycle")):
        other = index_of(name)
        assert other != sample.meta["emoji_index"]
        m = sample.meta
        images.append(render(other, m["background"], m["scale"], m["x"], m["y"]))
        others.append(other)
    result = scorer.score(images, [s.meta for s in scenes[:len(images)]])
    assert result.predictions == others
    assert result.identity_top1 == 0.0 and result.background_acc == 100.0
    assert scorer.score(images, [{"emoji_index": o} for o in others]).identity_top1 == 100.0


def test_template_bank_is_the_mean_of_sharp_and_blurred_features_and_is_cached(scorer, tmp_path_factory):
    bank = scorer.templates(COLOUR)
    assert bank.shape == (len(pool()), 320)
    assert torch.allclose(bank.norm(dim=-1), torch.ones(len(pool())), atol=1e-5)
    e = index_of("pizza")
    views = [normalize_scene(template_scene(e, COLOUR, blur), COLOUR) for blur in (False, True)]
    feats = scorer._features(views)["block15"]
    expected = torch.nn.functional.normalize(feats.mean(0), dim=-1)
    assert torch.allclose(bank[e], expected, atol=1e-4)
    # a second scorer on the same cache folder loads the bank (both features) instead of building it
    files = list(scorer.cache_dir.glob(f"*{COLOUR}*.safetensors"))
    assert len(files) == 1
    head = EmojiScorer(cache_dir=scorer.cache_dir, feature="head", encoder=scorer.model)
    assert head.templates(COLOUR).shape == (len(pool()), 1280)
    assert head.template_seconds == 0.0
    assert torch.equal(EmojiScorer(cache_dir=scorer.cache_dir, encoder=scorer.model).templates(COLOUR), bank)


def test_score_without_truth_and_bad_input(scorer, scenes):
    flat = Image.new("RGB", (64, 64), PALETTE[COLOUR])
    result = scorer.score([scenes[0].image, flat])
    assert result.backgrounds == [COLOUR, COLOUR]
    assert result.identity_top1 is None and result.metrics() == {}
    with pytest.raises(ValueError):
        scorer.score([flat], [])
    with pytest.raises(ValueError):
        EmojiScorer(feature="pixels", encoder=scorer.model)


def test_pooled_features_and_embed_cosine(scorer, scenes):
    images = [s.image for s in scenes[:4]]
    feats = scorer.pooled_features(images)
    assert feats.shape == (4, 320)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert scorer.pooled_features(images, feature="head").shape == (4, 1280)
    assert scorer.embed_cosine(images, images) == pytest.approx(1.0, abs=1e-5)
    blurred = [im.filter(ImageFilter.GaussianBlur(1)) for im in images]
    shuffled = images[1:] + images[:1]
    near, far = scorer.embed_cosine(images, blurred), scorer.embed_cosine(images, shuffled)
    assert far < near < 1.0
    with pytest.raises(ValueError):
        scorer.embed_cosine(images, images[:2])
