"""The bad-input table: every kind of bad (or merely odd) input, through the three front doors.

* Python API: a typed `seedtok.errors` exception (never a bare OSError / TypeError / PIL error), or it works;
* CLI (`seedtok.cli.main`, in-process; one row set also as a subprocess): one line on stderr, exit status 2, no
  traceback, and no output file left behind;
* web API (FastAPI's TestClient): a 4xx JSON ``{"error": ...}``.

Odd but legal inputs (1x1, 24 MP, animated GIF, 16-bit PNG, CMYK JPEG) must encode. The micro preset keeps it
fast (random weights: the ids mean nothing, but they are deterministic, so "same ids" is checkable).
"""

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from seedtok import SeedTokenizer
from seedtok.cli import main
from seedtok.data.sources import DataError, open_source
from seedtok.errors import CheckpointError, ConfigError, IdsError, ImageError, ImageTooLargeError, SeedtokError

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ inputs
def png_header_only(width, height) -> bytes:
    """A PNG whose header claims width x height RGB pixels over one tiny IDAT: a decompression-bomb stand-in."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def encoded(image, fmt, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
RED, BLUE = Image.new("RGB", (32, 32), (230, 20, 20)), Image.new("RGB", (32, 32), (20, 20, 230))
GRADIENT16 = (np.arange(40 * 56, dtype=np.uint32).reshape(40, 56) * 29 % 65536).astype(np.uint16)


def _animated_gif() -> bytes:
    buf = io.BytesIO()
    RED.save(buf, format="GIF", save_all=True, append_images=[BLUE], duration=100, loop=0)
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    return encoded(NOISE.convert("CMYK"), "JPEG", quality=95)


def _large_jpeg() -> bytes:  # 24 MP: large but legal (a modern phone photo)
    y, x = np.mgrid[0:4000, 0:6000]
    array = np.stack([(x // 24) % 256, (y // 16) % 256, ((x + y) // 40) % 256], axis=-1).astype(np.uint8)
    return encoded(Image.fromarray(array), "JPEG", quality=70)


# name -> bytes; None: the file is not created (missing)
BAD = {
    "missing.png": None,
    "empty.png": b"",
    "empty.jpg": b"",
    "truncated.png": encoded(NOISE, "PNG")[:300],
    "truncated.jpg": encoded(NOISE, "JPEG")[:400],
    "corrupt.png": png_header_only(8, 8),  # a valid header over garbage pixel data
    "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
    "text.png": b"hello, this is not an image\n",
    "pdf.jpg": b"%PDF-1.4\n1 0 obj << >> endobj\n",
    "script.gif": b"#!/bin/sh\necho hi\n",
    "bomb.png": png_header_only(60_000, 60_000),  # 3.6e9 pixels claimed in ~70 bytes: PIL's DecompressionBombError
    "bomb-warn.png": png_header_only(9_500, 9_500),  # 90 MP: over MAX_IMAGE_PIXELS, under PIL's error threshold
}
TOO_LARGE = ("bomb.png", "bomb-warn.png")
GOOD = {
    "one-pixel.png": lambda: encoded(Image.new("RGB", (1, 1), (9, 200, 40)), "PNG"),
    "large.jpg": _large_jpeg,
    "animated.gif": _animated_gif,
    "sixteen-bit.png": lambda: encoded(Image.fromarray(GRADIENT16), "PNG"),
    "cmyk.jpg": _cmyk_jpeg,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    for name, data in BAD.items():
        if data is not None:
            (root / name).write_bytes(data)
    for name, make in GOOD.items():
        (root / name).write_bytes(make())
    (root / "a-directory.png").mkdir()
    return root


def is_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------------ Python API
@pytest.mark.parametrize("name", [*BAD, "a-directory.png"])
def test_api_bad_image_files_raise_image_errors(micro, files, name):
    expected = ImageTooLargeError if name in TOO_LARGE else ImageError
    start = time.perf_counter()
    with pytest.raises(expected) as info:
        micro.encode(files / name)
    assert time.perf_counter() - start < 10, "must fail fast (no decode of a bomb)"
    assert "\n" not in str(info.value) and str(info.value)


def test_api_unreadable_file_is_an_image_error(micro, tmp_path, monkeypatch):
    path = tmp_path / "secret.png"
    path.write_bytes(encoded(RED, "PNG"))
    path.chmod(0)
    if is_root():  # root reads files whatever their mode: give it the error the OS gives everyone else
        real_open = Image.open

        def refuse(fp, *args, **kwargs):
            if str(fp) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(fp, *args, **kwargs)

        monkeypatch.setattr(Image, "open", refuse)
    try:
        with pytest.raises(ImageError, match="cannot read|permission"):
            micro.encode(path)
    finally:
        path.chmod(0o644)


def test_api_pixel_limit_follows_pil_max_image_pixels(micro, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    Image.new("RGB", (100, 100)).save(tmp_path / "at.png")
    Image.new("RGB", (101, 100)).save(tmp_path / "over.png")
    assert micro.encode(tmp_path / "at.png").shape == (1, 32)
    with pytest.raises(ImageTooLargeError, match="101x100"):
        micro.encode(tmp_path / "over.png")
    with pytest.raises(ImageTooLargeError):  # the same guard for dataset shards' image bytes
        from seedtok.data.sources import decode_image_bytes

        decode_image_bytes((tmp_path / "over.png").read_bytes())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's way to switch the guard off
    assert micro.encode(tmp_path / "over.png").shape == (1, 32)


@pytest.mark.parametrize("name", list(GOOD))
def test_api_odd_but_legal_images_encode(micro, files, name):
    ids = micro.encode(files / name)
    assert ids.shape == (1, 32) and ids.dtype == torch.long


def test_animated_gif_uses_the_first_frame(micro, files):
    first = micro.encode(files / "animated.gif")
    assert torch.equal(first, micro.encode(RED))
    assert not torch.equal(first, micro.encode(BLUE))


def test_sixteen_bit_png_is_scaled_not_clipped(micro, files):
    with Image.open(files / "sixteen-bit.png") as im:
        assert im.mode.startswith("I;16")  # the file really is 16-bit
    eight = Image.fromarray((GRADIENT16 >> 8).astype(np.uint8))
    assert torch.equal(micro.encode(files / "sixteen-bit.png"), micro.encode(eight))
    assert not torch.equal(micro.encode(eight), micro.encode(Image.new("L", eight.size, 255)))


def test_cmyk_jpeg_encodes_as_its_rgb_conversion(micro, files):
    with Image.open(files / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        rgb = im.convert("RGB")
    assert torch.equal(micro.encode(files / "cmyk.jpg"), micro.encode(rgb))


@pytest.mark.parametrize("ids, match", [
    ([[0] * 31], "expected 32 ids"),
    ([[0] * 33], "expected 32 ids"),
    ([[0] * 32, [0] * 31], None),  # ragged rows: not even a tensor
    ([], "expected 32 ids"),
    ([[64] + [0] * 31], r"\[0, 64\)"),
    ([[2**40] + [0] * 31], r"\[0, 64\)"),
    ([[-1] + [0] * 31], r"\[0, 64\)"),
    ([[0.0] * 32], "integers"),
    ([[True] * 32], "integers"),
    ("1,2,3", None),
    ([["a"] * 32], None),
], ids=["31", "33", "ragged", "empty", "64", "huge", "negative", "float", "bool", "str", "str-list"])
def test_api_bad_ids_raise_ids_errors(micro, ids, match):
    with pytest.raises(IdsError, match=match):
        micro.decode_embeddings(ids)


@pytest.mark.parametrize("text, match", [("", "no ids"), ("1,2,x", "'x'"), ("1.5 2", "'1.5'"),
                                         ("0x10", "'0x10'"), ("[1, 2", None)])
def test_parse_ids_rejects_non_integers(text, match):
    from seedtok.models.tokenizer import parse_ids

    if match is None:
        assert parse_ids(text) == [1, 2]  # brackets are optional decoration
        return
    with pytest.raises(IdsError, match=match):
        parse_ids(text)


# ------------------------------------------------------------------------------------------------ checkpoints
class _Evil:
    """Unpickling this would create the marker file (code execution)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, micro):
    """Folders that look like checkpoints but are not right: name -> folder."""
    root = tmp_path_factory.mktemp("ckpts")
    good = micro.save_pretrained(root / "good")
    weights = (good / "model.safetensors").read_bytes()
    config = (good / "config.json").read_text()

    def folder(name, weights_bytes=weights, config_text=config):
        path = root / name
        path.mkdir()
        if weights_bytes is not None:
            (path / "model.safetensors").write_bytes(weights_bytes)
        if config_text is not None:
            (path / "config.json").write_text(config_text)
        return path

    other = SeedTokenizer.from_pretrained("micro-seed1").save_pretrained(root / "other-src")
    marker = root / "pwned"
    out = {
        "other-preset": folder("other-preset", (other / "model.safetensors").read_bytes()),
        "truncated": folder("truncated", weights[: len(weights) // 2]),
        "header-only": folder("header-only", weights[:8]),
        "empty-weights": folder("empty-weights", b""),
        "pickle": folder("pickle", pickle.dumps({"qformer.query_tokens": _Evil(str(marker))})),
        "torch-save": folder("torch-save", b""),
        "no-weights": folder("no-weights", None),
        "config-not-json": folder("config-not-json", config_text="{not json"),
        "config-not-object": folder("config-not-object", config_text="[1, 2]"),
        "config-bad-type": folder("config-bad-type", config_text=json.dumps({**json.loads(config), "num_tokens": "x"})),
        "config-unknown-key": folder("config-unknown-key", config_text=json.dumps({**json.loads(config), "evil": 1})),
        "no-config": folder("no-config", config_text=None),
    }
    torch.save(micro.state_dict(), out["torch-save"] / "model.safetensors")  # a pickle zip under the wrong name
    return out, marker


CHECKPOINT_ROWS = ["other-preset", "truncated", "header-only", "empty-weights", "pickle", "torch-save", "no-weights",
                   "config-not-json", "config-not-object", "config-bad-type", "config-unknown-key", "no-config"]


@pytest.mark.parametrize("name", CHECKPOINT_ROWS)
def test_api_bad_checkpoints_raise_typed_errors(checkpoints, name):
    folders, marker = checkpoints
    with pytest.raises((CheckpointError, ConfigError)) as info:
        SeedTokenizer.from_pretrained(folders[name])
    assert "\n" not in str(info.value)
    assert not marker.exists(), "a pickle in the checkpoint was executed"


# ------------------------------------------------------------------------------------------------ datasets
def _dataset(root, captions: bytes, image=True):
    root.mkdir(parents=True)
    if image:
        RED.save(root / "a.png")
    (root / "captions.jsonl").write_bytes(captions)
    return root


DATASETS = {
    "empty": (b"", "no samples"),
    "blank-lines": (b"\n\n  \n", "no samples"),
    "broken-json": (b'{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "capt\n', "line 2"),
    "not-utf8": (b'{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": "\xff\xfe"}\n', "line 2"),
    "nul-path": (b'{"image": "a\\u0000.png", "caption": "x"}\n', "line 1"),
    "escaping-path": (b'{"image": "../../etc/passwd", "caption": "x"}\n', "escapes"),
    "absolute-path": (b'{"image": "/etc/passwd", "caption": "x"}\n', "absolute"),
    "deep-json": (b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 1"),
    "caption-not-string": (b'{"image": "a.png", "caption": null}\n', "string"),
}


@pytest.mark.parametrize("name", list(DATASETS))
def test_api_bad_datasets_raise_data_errors(tmp_path, name):
    captions, match = DATASETS[name]
    root = _dataset(tmp_path / name, captions)
    with pytest.raises(DataError, match=match):
        open_source(root)


def test_api_dataset_without_captions_file_or_folder(tmp_path):
    with pytest.raises(DataError):
        open_source(tmp_path)
    with pytest.raises(DataError):
        open_source(tmp_path / "nowhere")
    with pytest.raises(DataError):
        open_source("emoji:train:x")


# ------------------------------------------------------------------------------------------------ CLI
def _run_cli(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_cli_error(code, err, match=""):
    assert code == 2, err
    assert err.startswith("seedtok: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert match.lower() in err.lower(), err


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("name", [*BAD, "a-directory.png"])
def test_cli_tokenize_bad_images(files, capsys, name):
    before = listing(files)
    code, out, err = _run_cli(capsys, ["tokenize", str(files / name), "--model", "micro", "--json"])
    assert_cli_error(code, err, "too large" if name in TOO_LARGE else "")
    assert out == ""
    assert listing(files) == before  # nothing written beside the inputs


def test_cli_tokenize_stops_at_the_first_bad_image_in_a_batch(files, capsys):
    code, out, err = _run_cli(capsys, ["tokenize", str(files / "one-pixel.png"), str(files / "text.png"),
                                       "--model", "micro", "--batch-size", "8"])
    assert_cli_error(code, err, "text.png")


@pytest.mark.parametrize("name", list(GOOD))
def test_cli_tokenize_odd_but_legal_images(micro, files, capsys, name):
    code, out, err = _run_cli(capsys, ["tokenize", str(files / name), "--model", "micro", "--json"])
    assert code == 0, err
    assert json.loads(out)["ids"] == micro.encode(files / name)[0].tolist()


@pytest.mark.parametrize("ids, match", [("1,2,x", "integers"), ("1.5," * 31 + "1.5", "integers"), ("", "no ids"),
                                        (",".join(["0"] * 31), "expected 32 ids"),
                                        (",".join(["64"] * 32), "[0, 64)"),
                                        (",".join(["-1"] * 32), "[0, 64)"),
                                        (",".join(["99999999999999999999"] * 32), "integers")],
                         ids=["letter", "float", "empty", "count", "range", "negative", "overflow"])
def test_cli_detokenize_bad_ids_write_nothing(tmp_path, capsys, ids, match):
    out = tmp_path / "out" / "image.png"
    code, _, err = _run_cli(capsys, ["detokenize", "--model", "micro", f"--ids={ids}", "-o", str(out)])
    assert_cli_error(code, err, match)
    assert listing(tmp_path) == []


def test_cli_detokenize_without_a_decoder_writes_nothing(tmp_path, capsys):
    code, _, err = _run_cli(capsys, ["detokenize", "--model", "micro", "--ids", ",".join(["1"] * 32),
                                     "-o", str(tmp_path / "x.png")])
    assert_cli_error(code, err, "no image decoder")
    assert listing(tmp_path) == []


@pytest.fixture(scope="module")
def micro_with_decoder(tmp_path_factory, micro):
    from seedtok.models.image_decoder import TinyDecoder

    folder = micro.save_pretrained(tmp_path_factory.mktemp("withdec") / "tok")
    TinyDecoder.random("micro").save_pretrained(folder / "decoder")
    return folder


def test_cli_reconstruct_with_a_bad_input_writes_nothing(micro_with_decoder, files, tmp_path, capsys):
    out = tmp_path / "recon"
    code, _, err = _run_cli(capsys, ["reconstruct", str(files / "one-pixel.png"), str(files / "truncated.png"),
                                     "--model", str(micro_with_decoder), "--batch-size", "1", "-o", str(out),
                                     "--grid", str(tmp_path / "grid.png"), "--steps", "1"])
    assert_cli_error(code, err, "truncated.png")
    assert listing(tmp_path) == []  # not even the first, good image's reconstruction


@pytest.mark.parametrize("name", CHECKPOINT_ROWS)
def test_cli_bad_checkpoints(checkpoints, capsys, files, name):
    folders, marker = checkpoints
    code, out, err = _run_cli(capsys, ["tokenize", str(files / "one-pixel.png"), "--model", str(folders[name])])
    assert_cli_error(code, err)
    assert out == "" and not marker.exists()


@pytest.mark.parametrize("name", ["empty", "broken-json", "not-utf8", "escaping-path"])
def test_cli_eval_bad_datasets_write_no_results(tmp_path, capsys, name):
    captions, match = DATASETS[name]
    root = _dataset(tmp_path / "data", captions)
    result = tmp_path / "results" / "eval.json"
    code, _, err = _run_cli(capsys, ["eval", "tokenizer", "--model", "micro", "--data", str(root),
                                     "--json", str(result)])
    assert_cli_error(code, err, match)
    assert not (tmp_path / "results").exists()


def test_cli_train_with_a_bad_config_writes_no_run(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"model": "micro", "train": {"1": {"stepz": 3}}}')
    out = tmp_path / "run"
    code, _, err = _run_cli(capsys, ["train", "tokenizer", "--stage", "1", "--config", str(tmp_path / "run.json"),
                                     "--out", str(out)])
    assert_cli_error(code, err, "stepz")
    assert not out.exists()


def test_cli_subprocess_bomb_and_truncated_fail_fast_without_traceback(files):
    """The real entry point, in a fresh interpreter: a decompression bomb does not hang or exhaust memory."""
    for name in ("bomb.png", "bomb-warn.png", "truncated.jpg"):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "seedtok.cli", "tokenize", str(files / name), "--model",
                                 "micro"], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("seedtok: error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert time.perf_counter() - start < 100


# ------------------------------------------------------------------------------------------------ web API
@pytest.fixture(scope="module")
def web():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from seedtok.web import Engine, create_app

    engine = Engine(SeedTokenizer.from_pretrained("micro"), None, lm_reason="no LM in this test")
    with TestClient(create_app(engine)) as client:
        yield client


@pytest.fixture(scope="module")
def small_web():
    """Small limits: 100 kB bodies, 10,000 pixels."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from seedtok.web import Engine, create_app

    engine = Engine(SeedTokenizer.from_pretrained("micro"), None, lm_reason="no LM in this test")
    with TestClient(create_app(engine, max_upload_bytes=100_000, max_pixels=10_000)) as client:
        yield client


def assert_json_error(response, status, match=""):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in body["error"] and "\n" not in body["error"]
    assert match.lower() in body["error"].lower(), body["error"]


def _upload(data, name="x.png"):
    return {"image": (name, data, "application/octet-stream")}


@pytest.mark.parametrize("name", [n for n in BAD if BAD[n] is not None])
def test_web_bad_uploads_are_4xx_json(web, name):
    status = 413 if name in TOO_LARGE else 400
    assert_json_error(web.post("/api/tokenize", files=_upload(BAD[name], name)), status)


@pytest.mark.parametrize("name", list(GOOD))
def test_web_odd_but_legal_uploads_work(micro, web, files, name):
    r = web.post("/api/tokenize", files=_upload((files / name).read_bytes(), name))
    assert r.status_code == 200, r.text
    assert r.json()["ids"] == micro.encode(files / name)[0].tolist()


def test_web_missing_upload_and_wrong_field(web):
    assert_json_error(web.post("/api/tokenize", data={"x": "1"}), 422, "image")
    assert_json_error(web.post("/api/tokenize", files={"file": ("x.png", encoded(RED, "PNG"), "image/png")}),
                      422, "image")


@pytest.mark.parametrize("ids, status, match", [
    ("1,2,x", 422, "integers"), ("", 400, "exactly one"), (" , ", 422, "no ids"), (",".join(["0"] * 31), 422, "expected 32 ids"),
    (",".join(["64"] * 32), 422, "[0, 64)"), (",".join(["-5"] * 32), 422, "[0, 64)"),
    (",".join(["1e3"] * 32), 422, "integers"),
], ids=["letter", "empty", "commas", "count", "range", "negative", "float"])
def test_web_bad_ids_form(web, ids, status, match):
    assert_json_error(web.post("/api/caption", data={"ids": ids}), status, match)


@pytest.mark.parametrize("body, match", [({"ids": ["a"] * 32}, "ids"), ({"ids": [0.5] * 32}, "ids"),
                                         ({"ids": "1,2"}, "ids"), ({}, "ids"), ({"ids": [0] * 32, "seed": -1}, "seed")])
def test_web_bad_ids_json(web, body, match):
    assert_json_error(web.post("/api/detokenize", json=body), 422, match)


def test_web_size_limits(small_web):
    big = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)), "PNG")
    assert len(big) > 100_000
    assert_json_error(small_web.post("/api/tokenize", files=_upload(big)), 413, "too large")
    assert_json_error(small_web.post("/api/tokenize", files=_upload(encoded(Image.new("RGB", (101, 100)), "PNG"))),
                      413, "101x100")
    assert small_web.post("/api/tokenize", files=_upload(encoded(Image.new("RGB", (100, 100)), "PNG"))).status_code == 200
    assert_json_error(small_web.post("/api/draw", json={"prompt": "x" * 100_001}), 413, "too large")
    assert_json_error(small_web.post("/api/ask", data={"ids": "1", "question": "x" * 301}), 422, "question")


def test_web_bad_content_length_header(small_web):
    r = small_web.post("/api/tokenize", content=b"abc", headers={"content-length": "abc",
                                                                   "content-type": "application/octet-stream"})
    assert r.status_code in (400, 422), r.text


def test_all_errors_are_seedtok_errors():
    """The typed errors the table relies on share one base (the CLI and the web app catch it)."""
    for kind in (CheckpointError, ConfigError, IdsError, ImageError, ImageTooLargeError, DataError):
        assert issubclass(kind, SeedtokError)
    assert issubclass(ImageTooLargeError, ImageError)
