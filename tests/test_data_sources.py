"""Data sources and the dataset writer: CaptionFolder, WebDatasetShards, KarpathyCaptions, write_dataset."""

import io
import json
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from seedtok.data import (CaptionFolder, DataError, EmojiWorld, KarpathyCaptions, Sample, WebDatasetShards,
                          write_dataset)
from seedtok.errors import ImageError, SeedtokError


@pytest.fixture(scope="module")
def samples():
    return list(EmojiWorld("train", seed=11).take(12))


def _png(color=(10, 200, 30), size=(8, 6), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ------------------------------------------------------------------------------------------------ writer
def test_folder_roundtrip(tmp_path, samples):
    out = tmp_path / "emoji-folder"
    assert write_dataset(samples, out, format="folder") == 12
    assert (out / "images" / "000000.png").is_file() and (out / "images" / "000011.png").is_file()
    lines = (out / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 12
    first = json.loads(lines[0])
    assert first["image"] == "images/000000.png" and first["caption"] == samples[0].caption
    assert first["emoji"] == samples[0].meta["emoji"]
    ds = CaptionFolder(out)
    assert len(ds) == 12
    for original, back in zip(samples, ds):
        assert back.caption == original.caption
        assert np.array_equal(np.asarray(back.image), np.asarray(original.image))
        assert back.meta == original.meta
    assert ds[-1].caption == samples[-1].caption and ds.image_path(3) == out / "images" / "000003.png"
    # a folder re-writes as it is (its meta does not repeat the reserved keys)
    write_dataset(ds, tmp_path / "copy")
    assert [s.caption for s in CaptionFolder(tmp_path / "copy")] == [s.caption for s in samples]
    assert _leftovers(tmp_path, "emoji-folder") == []


def test_wds_roundtrip_and_layout(tmp_path, samples):
    out = tmp_path / "emoji-wds"
    assert write_dataset(iter(samples), out, format="wds", shard_size=5, progress=True, total=12) == 12
    shards = sorted(p.name for p in out.iterdir())
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(out / "shard-000001.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000005.png", "000005.txt", "000005.json"] and len(names) == 15
        assert tar.extractfile("000005.txt").read().decode() == samples[5].caption
        assert json.loads(tar.extractfile("000005.json").read())["key"] == "000005"
    for source in (str(out / "shard-*.tar"), out, str(out / "shard-{000000..000002}.tar"),
                   [out / s for s in shards]):
        ds = WebDatasetShards(source)
        back = list(ds)
        assert ds.skipped == 0 and len(back) == 12
        for original, b in zip(samples, back):
            assert b.caption == original.caption
            assert np.array_equal(np.asarray(b.image), np.asarray(original.image))
            assert {k: b.meta[k] for k in original.meta} == original.meta
    assert _leftovers(tmp_path, "emoji-wds") == []


def test_write_is_atomic_on_interruption(tmp_path, samples):
    def broken():
        yield from samples[:7]
        raise KeyboardInterrupt

    for fmt in ("folder", "wds"):
        out = tmp_path / f"broken-{fmt}"
        with pytest.raises(KeyboardInterrupt):
            write_dataset(broken(), out, format=fmt, shard_size=3)
        assert not out.exists()
        assert _leftovers(tmp_path, out.name) == []


def test_write_refuses_existing_output_unless_overwrite(tmp_path, samples):
    out = tmp_path / "ds"
    write_dataset(samples[:2], out)
    with pytest.raises(DataError):
        write_dataset(samples[:3], out)
    assert len(CaptionFolder(out)) == 2
    write_dataset(samples[:3], out, overwrite=True)
    assert len(CaptionFolder(out)) == 3
    assert _leftovers(tmp_path, "ds") == []
    with pytest.raises(DataError):
        write_dataset(samples, tmp_path / "x", format="parquet")
    with pytest.raises(DataError):  # reserved key in meta
        write_dataset([Sample(samples[0].image, "c", {"image": "a.png"})], tmp_path / "y")
    assert not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------------ CaptionFolder
def _folder(tmp_path, lines):
    root = tmp_path / "folder"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (5, 4), (1, 2, 3)).save(root / "img" / "a.png")
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_caption_folder_extra_keys_and_lazy_loading(tmp_path):
    root = _folder(tmp_path, ['{"image": "img/a.png", "caption": "a dot", "source": "x", "id": 3}', "",
                              '{"image": "img/missing.png", "caption": "gone"}'])
    ds = CaptionFolder(root)
    assert len(ds) == 2  # the blank line is ignored
    s = ds[0]
    assert s.caption == "a dot" and s.meta == {"source": "x", "id": 3}
    assert ds[np.int64(0)].caption == "a dot"
    assert s.image.mode == "RGB" and s.image.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageError):  # loaded lazily: only this index fails
        ds[1]
    with pytest.raises(IndexError):
        ds[2]


@pytest.mark.parametrize("bad, needle", [
    ('{"image": "img/a.png", "caption": "x"', "invalid JSON"),
    ('{"image": "img/a.png"}', "'caption'"),
    ('{"caption": "x"}', "'image'"),
    ('["img/a.png", "x"]', "JSON object"),
    ('{"image": "img/a.png", "caption": 5}', "string"),
])
def test_caption_folder_bad_line_names_file_and_line(tmp_path, bad, needle):
    root = _folder(tmp_path, ['{"image": "img/a.png", "caption": "ok"}', bad])
    with pytest.raises(DataError) as info:
        CaptionFolder(root)
    message = str(info.value)
    assert str(root / "captions.jsonl") in message and "line 2" in message and needle in message
    assert isinstance(info.value, SeedtokError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("path", ["../outside.png", "img/../../outside.png", "/etc/passwd", "C:\\x.png",
                                  "..\\outside.png", ""])
def test_caption_folder_rejects_paths_escaping_root(tmp_path, path):
    root = _folder(tmp_path, [json.dumps({"image": path, "caption": "x"})])
    with pytest.raises(DataError) as info:
        CaptionFolder(root)
    assert "line 1" in str(info.value)


def test_caption_folder_missing(tmp_path):
    with pytest.raises(DataError):
        CaptionFolder(tmp_path / "nope")
    with pytest.raises(DataError):
        CaptionFolder(tmp_path)  # no captions.jsonl


# ------------------------------------------------------------------------------------------------ shards
def test_shards_skip_and_count_corrupt_samples(tmp_path):
    shard = _tar(tmp_path / "s-0.tar", [
        ("good1.png", _png((255, 0, 0))), ("good1.txt", b"first"), ("good1.json", b'{"url": "u1"}'),
        ("corrupt.png", b"\x89PNG\r\n\x1a\n not really a png"), ("corrupt.txt", b"broken"),
        ("nocap.jpg", _png(fmt="JPEG")),
        ("noimage.txt", b"orphan caption"),
        ("badjson.png", _png()), ("badjson.txt", b"x"), ("badjson.json", b"{nope"),
        ("empty.png", _png()), ("empty.txt", b"  \n"),
        ("dir/good2.jpg", _png((0, 0, 255), fmt="JPEG")), ("dir/good2.txt", "zwei \u00e9\n".encode()),
    ])
    ds = WebDatasetShards(shard)
    got = list(ds)
    assert [s.caption for s in got] == ["first", "zwei \u00e9"]
    assert ds.skipped == 5 and len(ds.skip_reasons) == 5
    assert got[0].meta == {"url": "u1", "key": "good1"} and got[1].meta == {"key": "dir/good2"}
    assert got[0].image.getpixel((0, 0)) == (255, 0, 0) and got[1].image.mode == "RGB"
    list(ds)
    assert ds.skipped == 5  # counted per pass, not accumulated


def test_truncated_shard_warns_and_continues(tmp_path):
    members = []
    for i in range(4):
        members += [(f"{i:03d}.png", _png((i, i, i), size=(64, 64))), (f"{i:03d}.txt", f"cap {i}".encode())]
    full = _tar(tmp_path / "a-0.tar", members).read_bytes()
    with tarfile.open(tmp_path / "a-0.tar") as tar:
        cut = tar.getmember("002.png").offset_data + 20  # in the middle of an image's bytes
    (tmp_path / "a-0.tar").write_bytes(full[:cut])
    _tar(tmp_path / "a-1.tar", [("x.png", _png()), ("x.txt", b"next shard")])
    ds = WebDatasetShards(str(tmp_path / "a-*.tar"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(ds)
    assert [s.caption for s in got] == ["cap 0", "cap 1", "next shard"]
    assert ds.bad_shards == 1 and ds.skipped == 1 and any("a-0.tar" in str(w.message) for w in caught)


def test_shards_not_found(tmp_path):
    with pytest.raises(DataError):
        WebDatasetShards(str(tmp_path / "none-*.tar"))
    with pytest.raises(DataError):
        WebDatasetShards(tmp_path / "missing.tar")


# ------------------------------------------------------------------------------------------------ Karpathy
def test_karpathy_captions(tmp_path):
    (tmp_path / "imgs" / "val2014").mkdir(parents=True)
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "imgs" / "val2014" / "a.jpg")
    Image.new("RGB", (4, 4), (7, 7, 7)).save(tmp_path / "imgs" / "c.png")
    split = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "imgid": 0,
         "sentences": [{"raw": "A dog runs. ", "tokens": ["a"]}, {"raw": "A brown dog."}]},
        {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "Train only."}]},
        {"filename": "c.png", "split": "test", "sentences": [{"raw": "Grey square."}]},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(split))
    ds = KarpathyCaptions(path, tmp_path / "imgs", split="test")
    assert ds.images() == [tmp_path / "imgs" / "val2014" / "a.jpg", tmp_path / "imgs" / "c.png"]
    assert ds.captions() == [(0, "A dog runs."), (0, "A brown dog."), (1, "Grey square.")]
    got = list(ds)
    assert len(ds) == 2 and [s.caption for s in got] == ["A dog runs.", "Grey square."]
    assert got[0].meta["captions"] == ["A dog runs.", "A brown dog."] and got[0].meta["imgid"] == 0
    assert got[1].image.getpixel((0, 0)) == (7, 7, 7)
    train = KarpathyCaptions(path, tmp_path / "imgs", split=("train", "restval"))
    assert train.captions() == [(0, "Train only.")]
    with pytest.raises(ImageError):  # b.jpg does not exist: lazy failure
        train[0]
    with pytest.raises(DataError):
        KarpathyCaptions(path, tmp_path / "imgs", split="val")
    path.write_text('{"images": [{"filename": "a.jpg", "split": "test", "sentences": []}]}')
    with pytest.raises(DataError):
        KarpathyCaptions(path, tmp_path / "imgs")
