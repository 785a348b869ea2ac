import json

import pytest
import torch

from seedtok.cli import main
from seedtok.evaluate import codebook_health, recall_at_k
from seedtok.evaluate.tokenizer import generation_agreement


def test_recall_at_k_on_a_hand_checked_example():
    # 3 images, 3 captions; image 0 ranks caption 1 first, its own second
    image = torch.eye(3)
    text = torch.tensor([[0.5, 0.0, 0.0], [0.9, 0.0, 0.0], [0.0, 0.0, 1.0]])
    text[1, 1] = 0.1
    own = torch.arange(3)
    distinct = torch.eye(3, dtype=torch.bool)
    r = recall_at_k(image, text, own, distinct, ks=(1, 2))
    # i2t: image0 -> cap1 (wrong) then cap0: miss@1, hit@2; image1 -> cap1 first (0.1) hit; image2 hit
    assert r["i2t_r1"] == pytest.approx(200 / 3) and r["i2t_r2"] == pytest.approx(100)
    # t2i: cap0 -> image0 hit; cap1 -> image0 (0.9) miss, image1 second: hit@2; cap2 -> image2 hit
    assert r["t2i_r1"] == pytest.approx(200 / 3) and r["t2i_r2"] == pytest.approx(100)


def test_identical_caption_texts_count_as_the_same_caption():
    image = torch.eye(2)
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # each image prefers the other's caption
    own = torch.arange(2)
    assert recall_at_k(image, text, own, torch.eye(2, dtype=torch.bool), ks=(1,))["i2t_r1"] == 0
    same = torch.ones(2, 2, dtype=torch.bool)  # both captions read the same
    assert recall_at_k(image, text, own, same, ks=(1,))["i2t_r1"] == 100


def test_codebook_health():
    ids = torch.tensor([[0, 0, 1, 1]])
    h = codebook_health(ids, codebook_size=4)
    assert h["usage"] == 50 and h["dead"] == 2 and h["perplexity"] == pytest.approx(2.0)


def test_generation_agreement_on_a_hand_checked_example():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    exact = generation_agreement(teacher.clone(), teacher)
    assert exact["teacher_r1"] == 100 and exact["mse"] == 0 and exact["cosine"] == pytest.approx(1.0)
    swapped = generation_agreement(teacher[[1, 0, 2]], teacher)  # images 0 and 1 get each other's embedding
    assert swapped["teacher_r1"] == pytest.approx(100 / 3)
    assert swapped["mse"] == pytest.approx(((teacher[[1, 0, 2]] - teacher) ** 2).mean().item())
    z = (teacher - teacher.mean(0)) / teacher.std(0)
    assert swapped["standardized_mse"] == pytest.approx(((z[[1, 0, 2]] - z) ** 2).mean().item())


def test_cli_data_then_eval_on_micro(tmp_path, capsys):
    assert main(["data", "emoji", "--split", "test", "--n", "12", "--out", str(tmp_path / "test")]) == 0
    lines = (tmp_path / "test" / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["caption"].startswith("a")
    out = tmp_path / "eval.json"
    assert main(["eval", "tokenizer", "--model", "micro", "--data", str(tmp_path / "test"),
                 "--baseline", "micro", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["retrieval"]) == {"embeddings", "codes", "bidirectional"}
    for row in result["retrieval"].values():
        assert set(row) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
        assert 0 <= row["i2t_r1"] <= row["i2t_r5"] <= row["i2t_r10"] <= 100
    assert 0 < result["codebook"]["usage"] <= 100
    assert "codebook: usage" in capsys.readouterr().out
    assert 0 <= result["generation"]["teacher_r1"] <= 100  # micro's teacher is its encoder's pooled feature


def test_eval_reports_generation_agreement_for_a_pooled_teacher(tmp_path):
    from seedtok import SeedTokenizer, preset
    from seedtok.data.sources import open_source
    from seedtok.evaluate import evaluate_tokenizer

    model = SeedTokenizer(preset("micro")).eval()
    samples = open_source("emoji:test:6")
    result = evaluate_tokenizer(model, samples)
    images = [samples[i].image for i in range(6)]
    with torch.no_grad():
        teacher = model.vision.pooled_teacher(model.vision.features(model.preprocess(images)))
    expected = generation_agreement(model.decode_embeddings(model.encode(images)).float(), teacher.float())
    assert result["generation"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_cli_eval_on_a_karpathy_format_split(tmp_path, capsys):
    from PIL import Image

    images = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"im{i}.jpg")
        images.append({"filename": f"im{i}.jpg", "split": "test" if i else "train", "imgid": i,
                       "sentences": [{"raw": f"picture {i} version {k}"} for k in range(5)]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    out = tmp_path / "r.json"
    assert main(["eval", "tokenizer", "--model", "micro", "--karpathy", str(tmp_path / "dataset_flickr30k.json"),
                 "--image-root", str(tmp_path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 2 and result["num_captions"] == 10
    assert main(["eval", "tokenizer", "--model", "micro"]) == 2
    assert "exactly one of --data or --karpathy" in capsys.readouterr().err
