import json
import subprocess
import sys

import torch
from PIL import Image

from seedtok import SeedTokenizer
from seedtok.cli import main


def _images(tmp_path, photos, n=3):
    paths = []
    for i, image in enumerate(photos[:n]):
        path = tmp_path / f"img{i}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def test_tokenize_json_matches_the_api(tmp_path, photos, capsys, micro):
    paths = _images(tmp_path, photos)
    assert main(["tokenize", *paths, "--json", "--model", "micro", "--batch-size", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == paths
    assert torch.equal(torch.tensor([line["ids"] for line in lines]), micro.encode(paths))


def test_tokenize_plain_output(tmp_path, photos, capsys):
    paths = _images(tmp_path, photos, 1)
    assert main(["tokenize", *paths]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(paths[0] + ": ") and len(out.split(": ")[1].split()) == 32


def test_user_errors_exit_nonzero_with_one_line_and_no_traceback(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    for args in (["tokenize", str(tmp_path / "missing.png")], ["tokenize", str(tmp_path / "bad.png")],
                 ["tokenize", "x.png", "--model", str(tmp_path)], ["info", "no-such-model"]):
        result = subprocess.run([sys.executable, "-m", "seedtok.cli", *args], capture_output=True, text=True)
        assert result.returncode == 2, args
        assert result.stderr.startswith("seedtok: error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_info_reports_parameter_counts(capsys):
    assert main(["info", "seed2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["vision_encoder"] == 985_894_528
    assert info["parameters"]["total"] == 1_149_998_528
    assert info["codebook_size"] == 8192 and info["num_tokens"] == 32
    assert main(["info", "micro"]) == 0
    assert "codebook 64 x 8" in capsys.readouterr().out


def test_tokenize_a_saved_folder_with_bf16(tmp_path, photos, capsys, micro):
    micro.save_pretrained(tmp_path / "m")
    paths = _images(tmp_path, photos, 2)
    assert main(["tokenize", *paths, "--json", "--model", str(tmp_path / "m"), "--dtype", "bf16"]) == 0
    rows = [json.loads(line)["ids"] for line in capsys.readouterr().out.splitlines()]
    expected = SeedTokenizer.from_pretrained(tmp_path / "m", dtype="bf16").encode(paths)
    assert torch.equal(torch.tensor(rows), expected)


def test_export_fp16_folder_loads(tmp_path, capsys, micro):
    micro.save_pretrained(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "half")]) == 0
    assert "fp16" in capsys.readouterr().out
    half = SeedTokenizer.from_pretrained(tmp_path / "half")
    torch.testing.assert_close(half.qformer.query_tokens, micro.qformer.query_tokens, rtol=1e-3, atol=1e-3)


def test_info_tiny_counts_every_part(capsys):
    assert main(["info", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    parts = info["parameters"]
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert parts["vision_encoder"] > 3_000_000 and info["codebook_size"] == 1024
