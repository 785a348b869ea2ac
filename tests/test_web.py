"""The web app over real HTTP (uvicorn on a loopback port, httpx as the client) and the demo report, on a micro
tokenizer with a random micro image decoder and a micro SeedLM (tiny random LLaMA, see test_lm)."""

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from seedtok import SeedLM, SeedTokenizer  # noqa: E402
from seedtok.cli import main  # noqa: E402
from seedtok.errors import ImageError  # noqa: E402
from seedtok.models.image_decoder import TinyDecoder  # noqa: E402
from seedtok.web import Engine, ServerThread, create_app, image_from_bytes  # noqa: E402
from seedtok.web.engine import ImageTooLargeError  # noqa: E402

from test_lm import lm_config, make_base  # noqa: E402

ABILITIES = ("tokenize", "detokenize", "reconstruct", "caption", "ask", "draw")


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: threads only add overhead


# ------------------------------------------------------------------------------------------------ fixtures
def micro_models(root):
    """A micro tokenizer folder with a random micro decoder, and a micro SeedLM reading its ids."""
    SeedTokenizer.from_pretrained("micro").save_pretrained(root / "tok")
    TinyDecoder.random("micro").save_pretrained(root / "tok" / "decoder")
    tokenizer = SeedTokenizer.from_pretrained(root / "tok")
    lm = SeedLM.build(lm_config(make_base("llama", root / "base")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapter: answers depend on the image
        for _, p in lm.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return tokenizer, lm


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return micro_models(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def engine(models):
    tokenizer, lm = models
    return Engine(tokenizer, lm, model_name="micro-test", lm_name="micro-lm")


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine)) as srv:
        yield srv


@pytest.fixture(scope="module")
def bare_server():
    """No image decoder, no LM, and small limits: 200 kB bodies, 10,000 pixels."""
    engine = Engine(SeedTokenizer.from_pretrained("micro"), None, lm_reason="LM preset 'tiny' has no bundled weights")
    with ServerThread(create_app(engine, max_upload_bytes=200_000, max_pixels=10_000)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def bare(bare_server):
    with httpx.Client(base_url=bare_server.url, timeout=60) as c:
        yield c


def scene(index=0):
    from seedtok.data.emoji import EmojiWorld

    return EmojiWorld("test", 0)[index].image


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def from_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def upload(image_bytes, name="x.png", kind="image/png"):
    return {"image": (name, image_bytes, kind)}


def png_header_only(width, height) -> bytes:
    """A PNG whose header claims width x height pixels, with one tiny IDAT: a decompression-bomb stand-in."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def assert_error(response, status, match=""):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert match.lower() in body["error"].lower(), body["error"]


# ------------------------------------------------------------------------------------------------ API
def test_info_and_openapi_schema(client):
    info = client.get("/api/info").json()
    assert info["model"] == "micro-test" and info["num_tokens"] == 32 and info["codebook_size"] == 64
    assert {a: v["available"] for a, v in info["abilities"].items()} == dict.fromkeys(ABILITIES, True)
    assert info["draw_images"] is True and info["max_upload_bytes"] == 10 * 2**20
    schema = client.get("/api/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for name in ABILITIES:
        assert f"/api/{name}" in schema["paths"], name
    assert "multipart/form-data" in schema["paths"]["/api/tokenize"]["post"]["requestBody"]["content"]
    assert "413" in schema["paths"]["/api/tokenize"]["post"]["responses"]


def test_tokenize_matches_the_library(client, engine):
    image = scene(0)
    r = client.post("/api/tokenize", files=upload(png(image)))
    assert r.status_code == 200, r.text
    assert r.json()["ids"] == engine.tokenizer.encode(image)[0].tolist()
    # a JPEG of another size and a grayscale GIF work too
    buf = io.BytesIO()
    image.resize((97, 61)).save(buf, format="JPEG")
    assert len(client.post("/api/tokenize", files=upload(buf.getvalue(), "x.jpg", "image/jpeg")).json()["ids"]) == 32
    buf = io.BytesIO()
    image.convert("L").save(buf, format="GIF")
    assert len(client.post("/api/tokenize", files=upload(buf.getvalue(), "x.gif", "image/gif")).json()["ids"]) == 32


def test_reconstruct_and_detokenize(client, engine):
    r = client.post("/api/reconstruct", files=upload(png(scene(1))))
    assert r.status_code == 200, r.text
    body = r.json()
    recon = from_data_url(body["image"])
    assert recon.size == (16, 16) and len(body["ids"]) == 32
    again = client.post("/api/detokenize", json={"ids": body["ids"]}).json()
    np.testing.assert_array_equal(np.asarray(from_data_url(again["image"])), np.asarray(recon))  # seed 0 both
    expected = engine.tokenizer.decode(torch.tensor([body["ids"]]), seed=0)[0]
    np.testing.assert_array_equal(np.asarray(recon), np.asarray(expected))


@pytest.mark.parametrize("ids, match", [([1] * 31, "expected 32 ids"), ([64] * 32, "[0, 64)"),
                                        ([-1] + [0] * 31, "[0, 64)")])
def test_detokenize_bad_ids(client, ids, match):
    assert_error(client.post("/api/detokenize", json={"ids": ids}), 422, match)


def test_schema_validation_errors_are_json(client):
    assert_error(client.post("/api/detokenize", json={"ids": ["a"] * 32}), 422, "ids")
    assert_error(client.post("/api/detokenize", json={"ids": [0] * 32, "seed": -1}), 422, "seed")
    assert_error(client.post("/api/detokenize", content=b"not json", headers={"content-type": "application/json"}),
                 422)
    assert_error(client.post("/api/tokenize", data={"x": "1"}), 422, "image")
    assert_error(client.post("/api/draw", json={"prompt": ""}), 422, "prompt")
    assert_error(client.post("/api/draw", json={"prompt": "x" * 301}), 422, "prompt")
    assert_error(client.get("/api/nothing"), 404)
    assert_error(client.get("/api/tokenize"), 405)


def test_caption_and_ask_from_image_or_ids(client, engine):
    image = scene(2)
    by_image = client.post("/api/caption", files=upload(png(image))).json()
    ids = by_image["ids"]
    by_ids = client.post("/api/caption", data={"ids": ",".join(map(str, ids))}).json()
    assert by_image == by_ids
    assert by_image["caption"] == engine.lm.caption(torch.tensor([ids]))[0]
    q = "what color is the background ?"
    answer = client.post("/api/ask", data={"ids": json.dumps(ids), "question": q}).json()
    assert answer["question"] == q and answer["answer"] == engine.lm.ask(torch.tensor([ids]), [q])[0]
    assert client.post("/api/ask", files=upload(png(image)), data={"question": q}).json() == answer
    assert_error(client.post("/api/ask", data={"ids": json.dumps(ids)}), 422, "question")
    assert_error(client.post("/api/ask", data={"ids": json.dumps(ids), "question": "   "}), 400, "empty")
    assert_error(client.post("/api/caption", files=upload(png(image)), data={"ids": json.dumps(ids)}), 400,
                 "exactly one")
    assert_error(client.post("/api/caption", data={}), 400, "exactly one")
    assert_error(client.post("/api/caption", data={"ids": "1,2,x"}), 422, "integers")
    assert_error(client.post("/api/caption", data={"ids": "1,2,3"}), 422, "expected 32 ids")


def test_draw(client, engine):
    r = client.post("/api/draw", json={"prompt": "a red apple", "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt"] == "a red apple" and len(body["ids"]) == 32 and all(0 <= i < 64 for i in body["ids"])
    assert body["ids"] == engine.lm.draw("a red apple", seed=3)[0].tolist()
    assert from_data_url(body["image"]).size == (16, 16)
    assert client.post("/api/draw", json={"prompt": "a red apple", "seed": 3}).json() == body  # deterministic


NOISE = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))


@pytest.mark.parametrize("data, match", [(b"", "empty"), (b"hello, not an image", "not an image"),
                                         (NOISE[:len(NOISE) // 2], "corrupt"), (b"%PDF-1.4 fake", "not an image")],
                         ids=["empty", "text", "truncated", "pdf"])
def test_bad_images_are_400(client, data, match):
    assert_error(client.post("/api/tokenize", files=upload(data)), 400, match)


def test_decompression_bomb_refused_before_decoding(client):
    bomb = png_header_only(60_000, 60_000)  # 3.6e9 pixels claimed in ~70 bytes
    assert_error(client.post("/api/tokenize", files=upload(bomb)), 413, "too large")
    with pytest.raises(ImageTooLargeError):
        image_from_bytes(bomb)
    with pytest.raises(ImageError):
        image_from_bytes(png_header_only(8, 8))  # a valid header over garbage pixels: corrupt, not a crash


def test_upload_limits(bare):
    big = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    data = png(Image.fromarray(big))
    assert len(data) > 200_000
    assert_error(bare.post("/api/tokenize", files=upload(data)), 413, "too large")

    def chunks():  # no Content-Length: counted while read
        for start in range(0, len(data), 16384):
            yield data[start:start + 16384]

    assert_error(bare.post("/api/tokenize", content=chunks(), headers={"content-type": "application/octet-stream"}),
                 413, "too large")
    assert_error(bare.post("/api/tokenize", files=upload(png(Image.new("RGB", (101, 100))))), 413, "pixels")
    assert bare.post("/api/tokenize", files=upload(png(Image.new("RGB", (100, 100))))).status_code == 200


def test_missing_weights_degrade_with_reasons(bare):
    info = bare.get("/api/info").json()
    abilities = info["abilities"]
    assert abilities["tokenize"] == {"available": True, "reason": None}
    for name in ("detokenize", "reconstruct"):
        assert not abilities[name]["available"] and "no image decoder" in abilities[name]["reason"]
    for name in ("caption", "ask", "draw"):
        assert abilities[name]["reason"] == "LM preset 'tiny' has no bundled weights"
    image = png(scene(0).resize((64, 64)))
    assert len(bare.post("/api/tokenize", files=upload(image)).json()["ids"]) == 32
    assert_error(bare.post("/api/reconstruct", files=upload(image)), 503, "reconstruct is unavailable: no image decoder")
    assert_error(bare.post("/api/detokenize", json={"ids": [0] * 32}), 503, "no image decoder")
    assert_error(bare.post("/api/caption", files=upload(image)), 503, "no bundled weights")
    assert_error(bare.post("/api/draw", json={"prompt": "a cat"}), 503, "draw is unavailable")


def test_concurrent_requests_are_serialised(server, engine, monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()
    encode = engine.tokenizer.encode
    generate = engine.lm.generate_ids

    def track(fn):
        def wrapped(*args, **kwargs):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                time.sleep(0.02)  # widen the window for overlap
                return fn(*args, **kwargs)
            finally:
                with lock:
                    active[0] -= 1
        return wrapped

    monkeypatch.setattr(engine.tokenizer, "encode", track(encode))
    monkeypatch.setattr(engine.lm, "generate_ids", track(generate))
    images = [png(scene(i)) for i in range(4)]
    expected = [encode(Image.open(io.BytesIO(b)))[0].tolist() for b in images]
    results, errors = {}, []

    def call(i):
        try:
            with httpx.Client(base_url=server.url, timeout=120) as c:
                if i < 8:
                    results[i] = c.post("/api/tokenize", files=upload(images[i % 4])).json()["ids"]
                else:
                    results[i] = c.post("/api/draw", json={"prompt": "a cat", "seed": 1}).json()["ids"]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert [results[i] for i in range(8)] == [expected[i % 4] for i in range(8)]
    assert results[8] == results[9] == results[10] and len(results[8]) == 32
    assert peak[0] == 1  # one model call at a time


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="file"', 'id="ids"', 'id="recon"', 'id="caption"', 'id="question"', 'id="prompt"',
                    'id="drawn"', "/static/app.js"):
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text  # offline: no CDN
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "/api/" in js.text
    assert client.get("/static/style.css").status_code == 200
    assert_error(client.get("/static/nothing.js"), 404)


# ------------------------------------------------------------------------------------------------ demo
def test_demo_report(engine, tmp_path):
    from seedtok.demo import run_demo, summary_table

    out = tmp_path / "demo"
    report = run_demo(engine, out, n_emoji=2, prompts=("a red apple", "a cat"), progress=False)
    assert [e.name for e in report.images] == ["emoji-0", "emoji-1", "astronaut", "coffee", "chelsea"]
    for e in report.images:
        assert len(e.ids) == 32 and e.caption is not None and e.answer is not None
        assert (out / e.input_file).is_file() and (out / e.recon_file).is_file()
    assert report.images[0].truth and report.images[2].truth is None
    assert all(len(d.ids) == 32 and (out / d.image_file).is_file() for d in report.drawings)
    page = report.index.read_text()
    assert "<h1>seedtok demo</h1>" in page and "unavailable:" not in page
    for e in report.images:
        assert e.recon_file in page and e.input_file in page
    assert json.loads((out / "report.json").read_text())["images"][0]["ids"] == report.images[0].ids
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {"index.html", "report.json"} | {e.input_file for e in report.images} | \
        {e.recon_file for e in report.images} | {d.image_file for d in report.drawings}
    assert set(tmp_path.iterdir()) == {out}  # nothing beside the output folder
    table = summary_table(report)
    assert "astronaut" in table and "a red apple" in table


def test_demo_without_decoder_or_lm(tmp_path):
    from seedtok.demo import run_demo

    engine = Engine(SeedTokenizer.from_pretrained("micro"), None, lm_reason="no LM here")
    report = run_demo(engine, tmp_path / "d", n_emoji=1, photos=False, progress=False)
    assert report.images[0].recon_file is None and report.images[0].caption is None
    assert len(report.images[0].ids) == 32 and report.drawings[0].ids == []
    page = report.index.read_text()
    assert "reconstruct unavailable: no image decoder" in page and "draw unavailable: no LM here" in page


def test_demo_cli(models, tmp_path, capsys):
    tok_folder = models[0].checkpoint_path
    assert main(["demo", "--model", str(tok_folder), "--lm", "none", "--emoji", "1", "--out",
                 str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "emoji-0" in out and "caption, ask, draw unavailable: no language model requested" in out
    assert f"report: {tmp_path / 'out' / 'index.html'}" in out
    assert (tmp_path / "out" / "images" / "emoji-0-recon.png").is_file()


def test_serve_cli_port_in_use(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", "micro", "--lm", "none"]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_pixel_limit_is_checked_before_decoding():
    data = png(Image.new("RGB", (300, 200)))
    with pytest.raises(ImageTooLargeError, match="300x200 pixels"):
        image_from_bytes(data, max_pixels=300 * 200 - 1)
    assert image_from_bytes(data, max_pixels=300 * 200).size == (300, 200)
