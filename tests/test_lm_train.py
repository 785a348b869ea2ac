"""LM data, training on the shared loop, id shards, evaluation metrics and the CLI verbs (tiny random LLaMA)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from seedtok.cli import main
from seedtok.data.ids import extract_ids, load_ids
from seedtok.data.sources import DataError, open_source
from seedtok.errors import ConfigError
from seedtok.evaluate.lm import cider_d, parse_caption
from seedtok.models.lm import IGNORE, SeedLM
from seedtok.train.lm import LMData, lm_recipe, train_lm

from test_lm import lm_config, make_base, perturb  # noqa: E402 - the tests folder is on sys.path (pytest rootdir)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_base("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def ids_dir(micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("ids") / "emoji"
    extract_ids(micro, open_source("emoji:train:10"), out, source="emoji:train:10", shard_size=4, batch_size=3,
                progress=False)
    return out


def test_extract_ids_shards_round_trip(micro, ids_dir):
    data = load_ids(ids_dir)
    samples = open_source("emoji:train:10")
    assert sorted(p.name for p in ids_dir.glob("ids-*.safetensors")) == [f"ids-{i:06d}.safetensors" for i in range(3)]
    assert torch.equal(data.ids, micro.encode([s.image for s in samples]).cpu())
    assert data.captions == [s.caption for s in samples]
    assert data.meta[3]["emoji"] == samples[3].meta["emoji"] and data.codebook_size == micro.codebook_size
    index = json.loads((ids_dir / "index.json").read_text())
    assert index["count"] == 10 and index["num_tokens"] == 32
    with pytest.raises(DataError, match="already"):
        extract_ids(micro, samples, ids_dir, progress=False)


def test_extract_ids_resumes_and_detects_damage(micro, ids_dir, tmp_path):
    import shutil

    copy = tmp_path / "ids"
    shutil.copytree(ids_dir, copy)
    (copy / "index.json").unlink()
    (copy / "ids-000001.safetensors").unlink()  # interrupted: the finished shards are kept, the rest redone
    extract_ids(micro, open_source("emoji:train:10"), copy, shard_size=4, batch_size=3, progress=False)
    assert torch.equal(load_ids(copy).ids, load_ids(ids_dir).ids)
    (copy / "ids-000002.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="cannot read"):
        load_ids(copy)
    with pytest.raises(DataError, match="extract-ids"):
        load_ids(tmp_path / "nothing")


def test_lm_data_mixes_directions_and_questions(llama, ids_dir, micro):
    lm = SeedLM.build(lm_config(llama))
    data = LMData(lm, load_ids(ids_dir), seed=0)
    kinds = {"i2t": 0, "t2i": 0, "qa": 0}
    for step in range(40):
        ids, labels = data.sequence(step % len(data), step)
        first = ids[len(lm.bos_ids)]
        if all(l == IGNORE for l in labels[:5]):
            kinds["qa"] += 1
        elif first == lm.begin_id:
            kinds["i2t"] += 1
        else:
            kinds["t2i"] += 1
    assert all(v > 3 for v in kinds.values()), kinds
    assert data.sequence(3, 7) == data.sequence(3, 7)  # a pure function of (seed, index, step): exact resume
    batch = data.batch([0, 1, 2], step=0)
    assert batch["input_ids"].shape[0] == 3 and (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_lm_data_mix_options(llama, ids_dir, micro):
    """image_first_fraction 1 and no instructions: every sample is image -> caption; with
    label_leading_image=False its image span (and markers) is unlabelled while the caption stays labelled."""
    lm = SeedLM.build(lm_config(llama, image_first_fraction=1.0, instruct_fraction=0.0, label_leading_image=False))
    data = LMData(lm, load_ids(ids_dir), seed=0)
    span = lm.num_image_tokens + 2
    for step in range(6):
        ids, labels = data.sequence(step % len(data), step)
        start = len(lm.bos_ids)
        assert ids[start] == lm.begin_id and ids[start + span - 1] == lm.end_id
        assert all(l == IGNORE for l in labels[:start + span])
        assert labels[start + span:] == ids[start + span:]  # caption + eos: every token labelled
    lm.config.label_leading_image = True  # the paper's rule: the image span is labelled too
    ids, labels = data.sequence(0, 0)
    assert labels[len(lm.bos_ids):] == ids[len(lm.bos_ids):]
    lm.config.image_first_fraction = 1.5
    with pytest.raises(ConfigError, match="image_first_fraction"):
        LMData(lm, load_ids(ids_dir))


def test_train_lm_on_shared_loop_and_resume(llama, ids_dir, tmp_path):
    cfg = lm_config(llama)
    lm = SeedLM.build(cfg)
    recipe = lm_recipe("micro")
    result = train_lm((cfg, recipe), data=ids_dir, out=tmp_path / "run", lm=lm, progress=False)
    assert result.steps == 6 and np.isfinite(result.final_loss)
    loaded = SeedLM.from_pretrained(tmp_path / "run" / "final")
    for (name, a), (_, b) in zip(lm.trainable_named_parameters(), loaded.trainable_named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(Exception, match="already holds a run"):
        train_lm((cfg, lm_recipe("micro")), data=ids_dir, out=tmp_path / "run", lm=SeedLM.build(cfg), progress=False)
    # resume from the step-3 checkpoint replays the same batches: same final weights
    import shutil

    run2 = tmp_path / "run2"
    shutil.copytree(tmp_path / "run", run2)
    shutil.rmtree(run2 / "final")
    shutil.rmtree(run2 / "ckpt-0000006")
    (run2 / "latest").write_text("ckpt-0000003")
    lm_resumed = SeedLM.build(cfg)
    result = train_lm((cfg, lm_recipe("micro")), data=ids_dir, out=run2, lm=lm_resumed, progress=False, resume=True)
    assert result.steps == 6
    for (name, a), (_, b) in zip(lm.trainable_named_parameters(), lm_resumed.trainable_named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


# ------------------------------------------------------------------------------------------ metrics
def test_cider_d():
    refs = [["a red apple on a blue background"], ["a gray cat on a pink background"]]
    perfect = cider_d(["a red apple on a blue background", "a gray cat on a pink background"], refs)
    assert perfect == pytest.approx(10.0)
    worse = cider_d(["a red apple on a pink background", "a gray cat on a pink background"], refs)
    assert 0 < worse < perfect
    # clipping: repeating a matching word does not raise the score
    assert cider_d(["red red red apple", "gray cat"], refs) <= cider_d(["red apple", "gray cat"], refs) + 1e-9
    assert cider_d(["", ""], refs) == 0.0


def test_parse_caption():
    assert parse_caption("an orange on a blue background") == ("orange", "blue")
    assert parse_caption("A red apple on an orange background.") == ("red apple", "orange")
    assert parse_caption("something else") == (None, None)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_errors_are_one_line(llama, tmp_path, capsys):
    lm = SeedLM.build(lm_config(llama))
    lm.save_pretrained(tmp_path / "ckpt")
    model = str(tmp_path / "ckpt")
    capsys.readouterr()
    cases = [
        ["caption", str(tmp_path / "missing.png"), "--model", model],
        ["ask", str(tmp_path / "missing.png"), "what?", "--model", model],
        ["draw", "", "-o", str(tmp_path / "x.png"), "--model", model],
        ["draw", "a cat", "--model", model],  # neither -o nor --ids
        ["caption", "x.png", "--model", str(tmp_path / "nope")],
        ["extract-ids", "--data", "emoji:bad", "--out", str(tmp_path / "ids")],
        ["train", "lm", "--config", "micro-nope"],
        ["train", "lm", "--config", "tiny", "--data", str(tmp_path / "no-ids"), "--out", str(tmp_path / "r")],
        ["eval", "lm", "--model", str(tmp_path / "nope"), "--data", "emoji:test:2"],
    ]
    for argv in cases:
        if argv[0] == "caption" and "nope" in argv[-1]:
            (tmp_path / "x.png").write_bytes(b"")
            argv[1] = str(tmp_path / "x.png")
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [l for l in err.strip().splitlines() if l.startswith("seedtok:")]
        assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("seedtok: error:"), (argv, err)
        assert err.strip().splitlines()[-1] == lines[0]


def test_cli_caption_ask_draw_ids(llama, tmp_path, capsys):
    import skimage.data
    from PIL import Image

    lm = SeedLM.build(lm_config(llama))
    lm.save_pretrained(tmp_path / "ckpt")
    image = tmp_path / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(image)
    model = str(tmp_path / "ckpt")
    assert main(["caption", str(image), "--model", model, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")
    assert main(["ask", str(image), "what color ?", "--model", model, "--max-new-tokens", "4"]) == 0
    assert main(["draw", "a red apple", "--ids", "-n", "2", "--model", model]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert all(len(l["ids"]) == 32 for l in lines)
    assert main(["lm", "merge", model, "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "seedlm.json").is_file()


def test_evaluate_lm_metrics_and_language_kept(llama):
    from seedtok.evaluate.lm import evaluate_lm

    lm = SeedLM.build(lm_config(llama))
    result = evaluate_lm(lm, open_source("emoji:test:3"), batch_size=2, t2i=False, progress=False)
    for key in ("caption_name_acc", "caption_color_acc", "cider", "vqa_acc", "text_ppl_base", "text_ppl_tuned"):
        assert result[key] is not None and np.isfinite(result[key]), key
    assert result["t2i_identity_top1"] is None
    # a fresh adapter (LoRA B = 0) leaves the base LM's text untouched
    assert result["text_ppl_tuned"] == pytest.approx(result["text_ppl_base"], rel=1e-5)
    # distinct scenes: the caption's loss depends on which ids precede it
    assert np.isfinite(result["caption_nll_own"]) and result["caption_nll_own"] != result["caption_nll_other"]
    assert np.isfinite(result["draw_nll_own"]) and result["draw_nll_own"] != result["draw_nll_other"]


def test_evaluate_lm_draws_every_caption_with_the_sampling_asked_for(llama, monkeypatch):
    from types import SimpleNamespace

    from seedtok.evaluate.lm import evaluate_lm

    lm = SeedLM.build(lm_config(llama))
    perturb(lm)
    tok = lm.image_tokenizer
    monkeypatch.setattr(tok, "decode", lambda ids: [row for row in ids], raising=False)  # "pictures" = the ids
    seen = {}

    class Scorer:
        def score(self, pictures, metas):
            seen.update(pictures=pictures, metas=metas)
            return SimpleNamespace(identity_top1=1.0, identity_top5=2.0, background_acc=3.0)

    samples = open_source("emoji:test:3")
    result = evaluate_lm(lm, samples, batch_size=2, progress=False, scorer=Scorer(),
                         draw_sampling={"temperature": 0.0})
    greedy = lm.draw([samples[i].caption for i in range(3)], temperature=0.0)
    assert torch.equal(torch.stack(seen["pictures"]), greedy)
    assert [m["emoji"] for m in seen["metas"]] == [samples[i].meta["emoji"] for i in range(3)]
    assert (result["t2i_identity_top1"], result["t2i_identity_top5"], result["t2i_background_acc"]) == (1.0, 2.0, 3.0)
    assert result["draw_sampling"] == {"temperature": 0.0, "top_p": lm.config.top_p, "top_k": lm.config.top_k}
    # the default is the model's sampling (SPEC: temperature 1.0, top-p 0.5), seeded per batch
    sampled = evaluate_lm(lm, samples, batch_size=2, progress=False, scorer=Scorer())
    assert sampled["draw_sampling"]["temperature"] == lm.config.temperature
    expected = torch.cat([lm.draw([samples[0].caption, samples[1].caption], seed=0), lm.draw([samples[2].caption], seed=2)])
    assert torch.equal(torch.stack(seen["pictures"]), expected)


def test_caption_nll_is_the_mean_loss_of_the_caption_tokens_after_the_image(llama):
    from seedtok.evaluate.lm import caption_nll

    lm = SeedLM.build(lm_config(llama))
    ids = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(0))
    captions = ["a red cat on a blue background", "a dog on a green background", "a star on a pink background"]
    with torch.inference_mode():
        total, count = 0.0, 0
        for i in range(3):
            seq, labels = lm.caption_sequence(ids[i], captions[i], True, label_image=False)
            out = lm(input_ids=torch.tensor([seq]), labels=torch.tensor([labels]))
            n = sum(l != IGNORE for l in labels[1:])
            total, count = total + out.loss.item() * n, count + n
    assert caption_nll(lm, ids, captions, batch_size=2) == pytest.approx(total / count, rel=1e-5)
    # the same ids for every scene: shuffling them changes nothing
    same = ids[:1].expand(3, -1)
    assert caption_nll(lm, same, captions) == pytest.approx(caption_nll(lm, same.roll(1, dims=0), captions))


def test_drawing_nll_is_the_mean_loss_of_the_codes_over_the_code_tokens_after_the_caption(llama):
    from seedtok.evaluate.lm import drawing_nll

    lm = SeedLM.build(lm_config(llama))
    perturb(lm)  # trained-looking new rows: the code tokens' scores differ
    ids = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(0))
    captions = ["a red cat on a blue background", "a dog on a green background", "a star on a pink background"]
    codes = lm.image_token_ids()
    with torch.inference_mode():
        total = 0.0
        for i in range(3):
            prompt = lm.draw_prompt(captions[i])  # caption, then <img>: what drawing conditions on
            seq = torch.tensor([prompt + (ids[i] + lm.image_offset).tolist()])
            logits = lm(input_ids=seq).logits[0, len(prompt) - 1:-1][:, codes]
            total += torch.nn.functional.cross_entropy(logits.float(), ids[i], reduction="sum").item()
    assert drawing_nll(lm, ids, captions, batch_size=2) == pytest.approx(total / 96, rel=1e-5)
    # the drawing depends on the caption: other captions, other loss; one caption for all: order is moot
    assert drawing_nll(lm, ids.roll(1, dims=0), captions) != pytest.approx(total / 96, rel=1e-3)
    same = ["a red cat on a blue background"] * 3
    assert drawing_nll(lm, ids.roll(1, dims=0), same) == pytest.approx(drawing_nll(lm, ids, same), rel=1e-5)


def test_row_init_options_start_training_from_the_captions(llama, ids_dir):
    from seedtok.train.lm import _row_init

    data = load_ids(ids_dir)
    assert _row_init(lm_config(llama, image_row_init="mean"), data) == {}
    start = _row_init(lm_config(llama, image_row_init="codebook"), data)
    assert set(start) == {"codebook"} and start["codebook"].shape[0] == data.codebook_size
    start = _row_init(lm_config(llama, image_row_init="captions"), data)
    assert start["captioned_ids"][1] == data.captions and torch.equal(start["captioned_ids"][0], data.ids)
    lm = SeedLM.build(lm_config(llama), **start)
    only_codebook = SeedLM.build(lm_config(llama), codebook=start["codebook"])
    rows = lambda m: m.model.get_input_embeddings()(torch.arange(m.image_offset, m.image_offset + 64)).detach()
    used = torch.zeros(64, dtype=torch.bool)
    used[data.ids.unique()] = True
    assert not torch.allclose(rows(lm)[used], rows(only_codebook)[used])
    torch.testing.assert_close(rows(lm)[~used], rows(only_codebook)[~used])
    with pytest.raises(ConfigError, match="image_row_init"):
        _row_init(lm_config(llama, image_row_init="words"), data)


# ------------------------------------------------------------------------------------------ text replay, warm start
def test_text_replay_texts_come_from_the_base_lm_and_are_cached(llama, tmp_path):
    from seedtok.train.lm import REPLAY_OPENINGS, cached_replay_texts, replay_texts

    lm = SeedLM.build(lm_config(llama, text_replay_size=5))
    texts = replay_texts(lm, 5, seed=0, max_new_tokens=6, batch_size=2, progress=False)
    assert len(texts) == 5 and all(t.startswith(o) for t, o in zip(texts, REPLAY_OPENINGS))
    assert any(len(t) > len(o) for t, o in zip(texts, REPLAY_OPENINGS))  # continued, not just the openings
    perturb(lm)  # a trained adapter does not change what the base LM writes
    assert replay_texts(lm, 5, seed=0, max_new_tokens=6, batch_size=2, progress=False) == texts
    assert replay_texts(lm, 5, seed=1, max_new_tokens=6, batch_size=2, progress=False) != texts
    first = cached_replay_texts(lm, tmp_path, progress=False)
    (cached,) = tmp_path.glob("replay-*.json")
    cached.write_text(json.dumps(["from the cache"] * 5))
    assert len(first) == 5 and cached_replay_texts(lm, tmp_path, progress=False) == ["from the cache"] * 5


def test_text_replay_share_and_labels(llama, ids_dir):
    ids = load_ids(ids_dir)
    plain = LMData(SeedLM.build(lm_config(llama)), ids, seed=0)
    replay = ["the river was cold", "bread is made from flour"]
    lm = SeedLM.build(lm_config(llama, text_replay_fraction=0.5))
    data = LMData(lm, ids, seed=0, replay=replay)
    texts = {tuple(lm.encode([(t, True)])[0]) for t in replay}
    drawn = [data.sequence(i % len(data), i) for i in range(200)]
    replayed = [(s, l) for s, l in drawn if tuple(s) in texts]
    assert 70 <= len(replayed) <= 130  # about half
    start = len(lm.bos_ids)
    assert all(s[start:] == l[start:] for s, l in replayed)  # loss on every token of a replayed text
    assert not any(tuple(s) in texts for s, _ in (plain.sequence(i % len(data), i) for i in range(50)))
    with pytest.raises(ConfigError, match="replay texts"):
        LMData(lm, ids)


def test_warm_start_continues_a_trained_lm(llama, ids_dir, tmp_path):
    from seedtok.train.lm import warm_start

    cfg = lm_config(llama)
    trained = SeedLM.build(cfg)
    perturb(trained)
    trained.save_pretrained(tmp_path / "trained")
    lm = warm_start(tmp_path / "trained", lm_config(llama, instruct_fraction=0.0))
    assert lm.config.instruct_fraction == 0.0  # the run's mix
    for (name, a), (_, b) in zip(trained.trainable_named_parameters(), lm.trainable_named_parameters()):
        assert torch.equal(a, b) and b.requires_grad, name
    with pytest.raises(ConfigError, match="lora_r 4 != 8"):
        warm_start(tmp_path / "trained", lm_config(llama, lora_r=8))
    result = train_lm((lm_config(llama), lm_recipe("micro")), data=ids_dir, out=tmp_path / "run",
                      init=tmp_path / "trained", progress=False)
    assert result.steps == 6
    moved = SeedLM.from_pretrained(tmp_path / "run" / "final")
    fresh = dict(SeedLM.build(cfg).trainable_named_parameters())
    for name, p in moved.trainable_named_parameters():  # training went on from the trained weights
        t = dict(trained.trainable_named_parameters())[name]
        assert (p - t).abs().max() < (t - fresh[name]).abs().max(), name


def test_quick_run_writes_few_replay_texts(llama, ids_dir, tmp_path):
    from seedtok.train.lm import QUICK_REPLAY

    cfg = lm_config(llama, text_replay_fraction=0.5, text_replay_size=QUICK_REPLAY + 8)
    recipe = dataclasses.replace(lm_recipe("micro"), steps=2)
    train_lm((cfg, recipe), data=ids_dir, out=tmp_path / "run", quick=True, progress=False)
    (cached,) = (tmp_path / "cache").glob("replay-*.json")
    assert len(json.loads(cached.read_text())) == QUICK_REPLAY
    assert SeedLM.from_pretrained(tmp_path / "run" / "final").config.text_replay_size == QUICK_REPLAY


def test_lm_speed_benchmark_compares_against_its_baselines(llama, tmp_path, capsys):
    """benchmarks/lm_speed.py on a micro LM: both baselines run, and the fast paths give the same results."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import lm_speed

    lm = SeedLM.build(lm_config(llama))
    perturb(lm)
    lm.save_pretrained(tmp_path / "lm")
    report = lm_speed.main(["--model", str(tmp_path / "lm"), "--batches", "1,2", "--rounds", "1",
                            "--json-out", str(tmp_path / "speed.json")])
    assert [g["batch"] for g in report["generation"]] == [1, 2]
    assert all(g["same_tokens"] for g in report["generation"])
    train = report["training"]
    assert train["batch"] == 16 and 0 < train["labelled"] < train["positions"]
    assert abs(train["loss_labelled_only"] - train["loss_full"]) < 1e-4
    assert json.loads((tmp_path / "speed.json").read_text())["generation"][1]["new_tokens"] == 32
    table = capsys.readouterr().out
    assert "no cache (baseline)" in table and "every position (baseline)" in table
