"""``SeedTokenizer.decode`` and the decoding verbs (detokenize, reconstruct, eval decoder) on a micro checkpoint
folder with a random micro image decoder in its ``decoder/`` sub-folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from seedtok import SeedTokenizer  # noqa: E402
from seedtok.cli import main  # noqa: E402
from seedtok.errors import CheckpointError, ConfigError, IdsError  # noqa: E402
from seedtok.models.image_decoder import TinyDecoder  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: threads only add overhead


@pytest.fixture(scope="module")
def folder(tmp_path_factory, micro):
    root = tmp_path_factory.mktemp("ckpt") / "m"
    micro.save_pretrained(root)
    TinyDecoder.random("micro").save_pretrained(root / "decoder")
    return root


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from seedtok.data.emoji import EmojiWorld
    from seedtok.data.writer import write_dataset

    out = tmp_path_factory.mktemp("scenes") / "test"
    write_dataset(EmojiWorld("test", 0).take(3), out)
    return out


def ids_for(n, seed=0):
    return torch.randint(0, 64, (n, 32), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ library
def test_decode_loads_the_checkpoint_decoder_lazily(folder):
    tok = SeedTokenizer.from_pretrained(folder)
    assert tok.image_decoder_kind == "tiny" and tok._image_decoder is None
    ids = ids_for(3)
    images = tok.decode(ids)
    assert len(images) == 3 and {im.size for im in images} == {(16, 16)}
    assert isinstance(tok._image_decoder, TinyDecoder)
    # the same as decoding the embeddings directly, seed 0 for every image (batch-independent)
    direct = tok._image_decoder.decode(tok.decode_embeddings(ids), seed=0, output_type="np")
    np.testing.assert_allclose(tok.decode(ids, output_type="np"), direct, atol=1e-6)
    np.testing.assert_allclose(tok.decode(ids[1], output_type="np")[0], direct[1], atol=1e-5)
    # negative ids become the negative embedding
    neg = tok.decode(ids, negative_ids=ids_for(1, seed=5), output_type="np")
    expected = tok._image_decoder.decode(tok.decode_embeddings(ids), seed=0, output_type="np",
                                         negative_embeddings=tok.decode_embeddings(ids_for(1, seed=5)))
    np.testing.assert_allclose(neg, expected, atol=1e-6)
    with pytest.raises(IdsError, match="expected 32 ids"):
        tok.decode(ids[:, :5])


def test_no_decoder_is_one_clear_error(folder, tmp_path, micro):
    with pytest.raises(CheckpointError, match="was not loaded from a checkpoint folder.*seedtok train decoder"):
        SeedTokenizer.from_pretrained("micro").decode(ids_for(1))
    micro.save_pretrained(tmp_path / "bare")
    with pytest.raises(CheckpointError, match=r"no image decoder for micro: .*decoder does not exist"):
        SeedTokenizer.from_pretrained(tmp_path / "bare").decode(ids_for(1))
    # given explicitly instead
    tok = SeedTokenizer.from_pretrained(tmp_path / "bare")
    assert len(tok.decode(ids_for(2), image_decoder=folder / "decoder")) == 2
    wrong = TinyDecoder.random("tiny")
    with pytest.raises(CheckpointError, match="embeddings"):
        tok.set_image_decoder(wrong)


def test_save_pretrained_carries_the_decoder(folder, tmp_path):
    tok = SeedTokenizer.from_pretrained(folder)
    tok.save_pretrained(tmp_path / "copy")  # not loaded yet: the folder is copied
    assert (tmp_path / "copy" / "decoder" / "model_index.json").is_file()
    tok.image_decoder()
    tok.save_pretrained(tmp_path / "half", dtype="fp16")  # loaded: saved (here in fp16)
    again = SeedTokenizer.from_pretrained(tmp_path / "half")
    a, b = tok.decode(ids_for(2), output_type="np"), again.decode(ids_for(2), output_type="np")
    assert np.abs(a - b).max() < 0.05


# ------------------------------------------------------------------------------------------------ CLI
def test_detokenize_writes_a_png(folder, tmp_path, capsys):
    ids = ",".join(map(str, ids_for(1)[0].tolist()))
    out = tmp_path / "sub" / "out.png"
    assert main(["detokenize", "--model", str(folder), "--ids", ids, "-o", str(out), "--steps", "2"]) == 0
    image = Image.open(out)
    assert image.size == (16, 16) and image.mode == "RGB"
    tok = SeedTokenizer.from_pretrained(folder)
    expected = tok.decode(ids_for(1), num_inference_steps=2)[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
    # spaces and brackets are fine too
    spaced = "[" + " ".join(map(str, ids_for(1)[0].tolist())) + "]"
    assert main(["detokenize", "--model", str(folder), "--ids", spaced, "-o", str(tmp_path / "b.png"),
                 "--steps", "2"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(image))


@pytest.mark.parametrize("ids, message", [
    ("1,2,3", "expected 32 ids"),
    (",".join(["1"] * 31 + ["64"]), r"ids must lie in \[0, 64\)"),
    (",".join(["1"] * 31 + ["-1"]), r"ids must lie in \[0, 64\)"),
    (",".join(["1"] * 31 + ["x7"]), "ids must be integers.*'x7'"),
    (",".join(["1"] * 31 + ["2.5"]), "ids must be integers.*'2.5'"),
    ("", "no ids given"),
])
def test_detokenize_bad_ids_exit_2_with_one_line(folder, tmp_path, capsys, ids, message):
    out = tmp_path / "o.png"
    assert main(["detokenize", "--model", str(folder), "--ids", ids, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("seedtok: error:") and "Traceback" not in err
    import re
    assert re.search(message, err), err
    assert not out.exists()


def test_detokenize_without_a_decoder_exits_2(tmp_path, capsys, micro):
    micro.save_pretrained(tmp_path / "bare")
    ids = ",".join(["1"] * 32)
    assert main(["detokenize", "--model", str(tmp_path / "bare"), "--ids", ids, "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no image decoder" in err


def test_reconstruct_writes_pngs_and_a_grid(folder, tmp_path, photos, capsys):
    paths = []
    for i, im in enumerate(photos[:3]):
        paths.append(tmp_path / f"p{i}.png")
        im.save(paths[-1])
    out, grid = tmp_path / "rec", tmp_path / "grid.png"
    assert main(["reconstruct", "--model", str(folder), *map(str, paths), "-o", str(out), "--grid", str(grid),
                 "--batch-size", "2", "--steps", "2"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["p0.png", "p1.png", "p2.png"]
    tok = SeedTokenizer.from_pretrained(folder)
    expected = tok.decode(tok.encode([photos[2]]), num_inference_steps=2)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "p2.png")), np.asarray(expected))
    g = Image.open(grid)
    assert g.size == (2 * 16 + 3 * 2, 3 * (16 + 2) + 2)
    row2 = np.asarray(g)[2 + 2 * 18: 2 + 2 * 18 + 16]
    np.testing.assert_array_equal(row2[:, 2 * 2 + 16: 2 * 2 + 32], np.asarray(expected))  # right: reconstruction
    # same stems in different folders do not overwrite each other
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    photos[0].save(tmp_path / "a" / "x.png"), photos[1].save(tmp_path / "b" / "x.png")
    assert main(["reconstruct", "--model", str(folder), str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                 "-o", str(tmp_path / "dup"), "--steps", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "dup").iterdir()) == ["0000-x.png", "0001-x.png"]
    assert main(["reconstruct", "--model", str(folder), str(tmp_path / "missing.png"), "-o", str(out)]) == 2


class StubScorer:
    """Stands in for EmojiScorer (its template banks take minutes to build): records what it is given."""

    calls = []

    def __init__(self, *args, **kwargs):
        pass

    def score(self, images, truth=None):
        from seedtok.evaluate.emoji_scorer import ScoreResult

        images = list(images)
        StubScorer.calls.append(("score", images, truth))
        n = len(images)
        correct = len(StubScorer.calls) == 1  # first call: reconstructions (half right); second: originals
        top5 = torch.tensor([[int(t["emoji_index"])] + [0] * 4 for t in truth])
        return ScoreResult(backgrounds=[t["background"] for t in truth], top5=top5, top5_cosine=torch.zeros(n, 5),
                           identity_top1=50.0 if correct else 100.0, identity_top5=75.0 if correct else 100.0,
                           background_acc=100.0)

    def embed_cosine(self, originals, reconstructions):
        StubScorer.calls.append(("cosine", list(originals), list(reconstructions)))
        return 0.5


def test_eval_decoder_writes_the_json(folder, scenes, tmp_path, capsys, monkeypatch):
    import seedtok.evaluate.emoji_scorer as scorer_module

    StubScorer.calls = []
    monkeypatch.setattr(scorer_module, "EmojiScorer", StubScorer)
    out = tmp_path / "r" / "eval.json"
    assert main(["eval", "decoder", "--model", str(folder), "--data", str(scenes), "--json", str(out),
                 "--steps", "1", "--batch-size", "2"]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"identity_top1", "identity_top5", "background_acc", "embed_cosine", "ceiling_top1",
                           "ceiling_top5", "images_per_s"}
    assert (result["identity_top1"], result["identity_top5"], result["ceiling_top1"]) == (50.0, 75.0, 100.0)
    assert result["embed_cosine"] == 0.5 and result["images_per_s"] > 0 and result["num_images"] == 3
    # what the reconstructions used: the flags given, the decoder's own defaults otherwise
    assert result["decode_settings"] == {"guidance_scale": 2.0, "num_inference_steps": 1, "strength": 1.0,
                                         "text_prior": "", "text_prior_weight": 1.0, "text_prior_temperature": 0.02,
                                         "text_prior_background": False}
    (_, recon, truth), (_, originals, _), (_, cos_a, cos_b) = StubScorer.calls
    assert len(recon) == 3 and {im.size for im in recon} == {(16, 16)}  # reconstructions, then the originals
    assert {im.size for im in originals} == {(64, 64)} and cos_b == recon
    assert [t["emoji_index"] for t in truth] == [json.loads(line)["emoji_index"] for line in
                                                 (scenes / "captions.jsonl").read_text().splitlines()]
    # a dataset without emoji metadata is one clear error
    from seedtok.data.writer import write_dataset
    from seedtok.data.sources import Sample

    write_dataset([Sample(Image.new("RGB", (8, 8)), "x", {})], tmp_path / "plain")
    assert main(["eval", "decoder", "--model", str(folder), "--data", str(tmp_path / "plain")]) == 2
    assert "emoji_index" in capsys.readouterr().err


def test_strength_is_a_tiny_decoder_option(folder, tmp_path, capsys):
    tok = SeedTokenizer.from_pretrained(folder)
    ids = ids_for(2)
    default = tok.decode(ids, output_type="np")  # the micro decoder's strength, 1
    half = tok.decode(ids, strength=0.5, output_type="np")
    assert np.abs(half - default).max() > 1e-3
    np.testing.assert_allclose(tok.decode(ids, strength=1.0, output_type="np"), default, atol=1e-6)
    from seedtok.models.image_decoder import DecodeInputError

    with pytest.raises(DecodeInputError, match="strength must lie"):
        tok.decode(ids, strength=1.5)
    with pytest.raises(DecodeInputError, match="has no option noise_level"):
        tok.decode(ids, noise_level=3)
    out = tmp_path / "o.png"
    arg = ",".join(map(str, ids[0].tolist()))
    assert main(["detokenize", "--model", str(folder), "--ids", arg, "-o", str(out), "--strength", "0.5"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(tok.decode(ids[:1], strength=0.5)[0]))
    capsys.readouterr()
    assert main(["detokenize", "--model", str(folder), "--ids", arg, "-o", str(tmp_path / "p.png"),
                 "--strength", "0"]) == 2
    err = capsys.readouterr().err  # (after the decoder's loading bar)
    assert "Traceback" not in err and err.splitlines()[-1] == "seedtok: error: strength must lie in (0, 1], got 0.0"


# ------------------------------------------------------------------------------------------- text prior
CLASS_CAPTIONS = [["a red apple"], ["a blue cat", "a cat on a blue background"], ["a star"], ["a dog", "dogs"],
                  ["a green tree"], ["a yellow sun", "the sun"]]  # one class per micro prototype


def test_caption_scores_are_each_classes_best_cosine(tmp_path, monkeypatch, micro):
    monkeypatch.setenv("SEEDTOK_CACHE", str(tmp_path))
    ids = ids_for(3)
    scores = micro.caption_scores(ids, CLASS_CAPTIONS)
    flat = [c for group in CLASS_CAPTIONS for c in group]
    text = torch.nn.functional.normalize(micro.caption_features(flat), dim=-1)
    with torch.no_grad():
        image = micro.qformer.image_features(micro.detokenizer.reconstruct(micro.codes(ids)))
    cos = torch.nn.functional.normalize(image, dim=-1) @ text.T
    expected = torch.stack([cos[:, 0], cos[:, 1:3].max(1).values, cos[:, 3], cos[:, 4:6].max(1).values,
                            cos[:, 6], cos[:, 7:9].max(1).values], dim=1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.std(0).max() > 1e-4  # other ids, other scores
    # the caption features are cached on disk: a fresh tokenizer does not recompute them
    fresh = SeedTokenizer.from_pretrained("micro")
    monkeypatch.setattr(type(fresh), "caption_features", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    torch.testing.assert_close(fresh.caption_scores(ids, CLASS_CAPTIONS), scores)
    # ... keyed by the weights: a changed text branch recomputes
    monkeypatch.undo()
    monkeypatch.setenv("SEEDTOK_CACHE", str(tmp_path))
    assert torch.equal(fresh.cached_caption_features(flat), micro.cached_caption_features(flat))
    with torch.no_grad():
        next(fresh.qformer.parameters()).add_(1.0)
    assert len(list((tmp_path / "caption-features").glob("*.safetensors"))) == 1
    fresh.cached_caption_features(flat)
    assert len(list((tmp_path / "caption-features").glob("*.safetensors"))) == 2
    with pytest.raises(ConfigError, match="needs the de-tokenizer's reconstruction branch"):
        SeedTokenizer.from_pretrained("micro-seed1").caption_scores(ids, CLASS_CAPTIONS)


def test_caption_scores_by_column_give_each_columns_best_class(tmp_path, monkeypatch, micro):
    monkeypatch.setenv("SEEDTOK_CACHE", str(tmp_path))
    grid = [["a red apple", "a blue apple", "a green apple"], ["a red cat", "a blue cat", "a green cat"]]
    ids = ids_for(3)
    classes, columns = micro.caption_scores(ids, grid, by_column=True)
    text = torch.nn.functional.normalize(micro.caption_features([c for row in grid for c in row]), dim=-1)
    with torch.no_grad():
        image = micro.qformer.image_features(micro.detokenizer.reconstruct(micro.codes(ids)))
    cos = (torch.nn.functional.normalize(image, dim=-1) @ text.T).view(3, 2, 3)
    torch.testing.assert_close(classes, cos.amax(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(columns, cos.amax(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(classes, micro.caption_scores(ids, grid))
    with pytest.raises(ConfigError, match="same number of captions"):
        micro.caption_scores(ids, CLASS_CAPTIONS, by_column=True)


def test_decode_hands_a_text_prior_decoder_the_ids_caption_scores(tmp_path, monkeypatch, micro):
    import dataclasses

    from seedtok.models import image_decoder
    from seedtok.models.image_decoder import tiny_decoder_config

    monkeypatch.setenv("SEEDTOK_CACHE", str(tmp_path))
    monkeypatch.setitem(image_decoder.TEXT_PRIORS, "test", lambda: CLASS_CAPTIONS)
    cfg = dataclasses.replace(tiny_decoder_config("micro"), text_prior="test", text_prior_temperature=0.01,
                              text_prior_weight=3.0)
    tok = SeedTokenizer.from_pretrained("micro").set_image_decoder(TinyDecoder.random(cfg))
    ids = ids_for(3)
    got = tok.decode(ids, output_type="np")
    scores = tok.caption_scores(ids, CLASS_CAPTIONS)
    direct = tok.image_decoder().decode(tok.decode_embeddings(ids), seed=0, class_scores=scores, output_type="np")
    np.testing.assert_allclose(got, direct, atol=1e-6)
    without = tok.image_decoder().decode(tok.decode_embeddings(ids), seed=0, output_type="np")
    assert np.abs(got - without).max() > 1e-3
    # the weight is a decode option (0: off), and so a CLI flag
    np.testing.assert_allclose(tok.decode(ids, text_prior_weight=0.0, output_type="np"), without, atol=1e-6)
    root = tmp_path / "ckpt"
    tok.save_pretrained(root)
    arg = ",".join(map(str, ids[0].tolist()))
    for flag, expected in ((["--text-prior-weight", "0"], without[0]), ([], got[0])):
        assert main(["detokenize", "--model", str(root), "--ids", arg, "-o", str(tmp_path / "o.png"), *flag]) == 0
        np.testing.assert_allclose(np.asarray(Image.open(tmp_path / "o.png")) / 255.0, expected, atol=1 / 255)
    # a prior that also picks the background gets the scores per caption column
    grid = [[f"a {c} {name}" for c in ("red", "blue")] for name in ("apple", "cat", "star", "dog", "tree", "sun")]
    monkeypatch.setitem(image_decoder.TEXT_PRIORS, "grid", lambda: grid)
    monkeypatch.setitem(image_decoder.TEXT_PRIOR_COLOURS, "grid", lambda: ((255, 0, 0), (0, 0, 255)))
    both = SeedTokenizer.from_pretrained("micro").set_image_decoder(TinyDecoder.random(dataclasses.replace(
        cfg, text_prior="grid", text_prior_background=True)))
    with torch.no_grad():  # a random head's learned colours are all alike: make them differ
        palette = both.image_decoder().pipeline.coarse.background_palette
        palette.copy_(torch.linspace(-1, 1, palette.numel()).view_as(palette))
    classes, columns = both.caption_scores(ids, grid, by_column=True)
    direct = both.image_decoder().decode(both.decode_embeddings(ids), seed=0, class_scores=classes,
                                         background_scores=columns, output_type="np")
    np.testing.assert_allclose(both.decode(ids, output_type="np"), direct, atol=1e-6)
    # a decoder without a prior never asks for caption scores
    plain = SeedTokenizer.from_pretrained("micro").set_image_decoder(TinyDecoder.random("micro"))
    monkeypatch.setattr(SeedTokenizer, "caption_scores", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    np.testing.assert_allclose(plain.decode(ids, output_type="np"), without, atol=1e-6)
