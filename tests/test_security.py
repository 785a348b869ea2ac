"""Security properties (see SECURITY.md): loopback by default, no unpickling of user files, outputs stay in the
chosen folder, and size limits on what the server accepts."""

import ast
import json
import pickle
from pathlib import Path

import pytest

from seedtok.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "seedtok").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))


def test_serve_binds_loopback_by_default():
    args = _parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"
    assert args.max_upload_mb == 10.0
    import inspect

    from seedtok.web.server import ServerThread, serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(ServerThread).parameters["host"].default == "127.0.0.1"


def test_server_listens_only_on_loopback():
    pytest.importorskip("fastapi")
    from seedtok import SeedTokenizer
    from seedtok.web import Engine, ServerThread, create_app

    with ServerThread(create_app(Engine(SeedTokenizer.from_pretrained("micro"), None))) as server:
        assert server.sock.getsockname()[0] == "127.0.0.1"


def _calls(tree, module, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module:
            yield node


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    """No code in the package unpickles a file: every torch.load passes weights_only=True, and pickle.load(s),
    numpy's allow_pickle and torch.load without weights_only do not appear."""
    seen = 0
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree, "torch", "load"):
            seen += 1
            flag = _keyword(call, "weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}:{call.lineno}: torch.load " \
                "without weights_only=True"
        for name in ("load", "loads", "Unpickler"):
            assert not list(_calls(tree, "pickle", name)), f"{path}: pickle.{name}"
        for call in list(_calls(tree, "np", "load")) + list(_calls(tree, "numpy", "load")):
            flag = _keyword(call, "allow_pickle")
            assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), f"{path}:{call.lineno}"
    assert seen >= 2  # the official converter, the trainer state (and the EfficientNet weights)


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_trainer_state_pickle_with_code_is_refused(tmp_path):
    """A crafted trainer_state.pt (a pickle that runs code) in a run folder: --resume refuses it, runs nothing."""
    from seedtok.errors import CheckpointError
    from seedtok.train import train_tokenizer
    from seedtok.train.loop import STATE_NAME

    out = tmp_path / "run"
    train_tokenizer("micro", 1, out=out, steps=1, progress=False)
    marker = tmp_path / "pwned"
    ckpt = out / (out / "latest").read_text().strip()
    with open(ckpt / STATE_NAME, "wb") as f:
        pickle.dump({"step": _Marker(str(marker))}, f)
    with pytest.raises(CheckpointError, match="trainer state"):
        train_tokenizer("micro", 1, out=out, steps=2, resume=True, progress=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ output paths
@pytest.mark.parametrize("path", ["../escape.png", "a/../../escape.png", "/tmp/escape.png", "..\\escape.png",
                                  "C:\\escape.png", "\\\\server\\share\\x.png"])
def test_caption_paths_cannot_escape_the_dataset(tmp_path, path):
    from seedtok.data.sources import DataError, open_source

    root = tmp_path / "data"
    root.mkdir()
    (root / "captions.jsonl").write_text(json.dumps({"image": path, "caption": "x"}) + "\n")
    with pytest.raises(DataError):
        open_source(root)


def test_dataset_writer_names_files_by_index_not_by_meta(tmp_path):
    """Sample keys/meta from untrusted shards never become file names: a dataset re-written from shards with
    hostile keys stays inside its folder."""
    import io
    import tarfile

    from PIL import Image

    from seedtok.data.sources import WebDatasetShards
    from seedtok.data.writer import write_dataset

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format="PNG")
    members = [("../../evil.png", buf.getvalue()), ("../../evil.txt", b"a caption"),
               ("../../evil.json", json.dumps({"key": "../../../etc/x", "image": "/etc/passwd"}).encode())]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(WebDatasetShards(tmp_path / "s.tar"))
    assert len(samples) == 1
    out = tmp_path / "nested" / "out"
    for fmt in ("folder", "wds"):
        target = out / fmt
        samples[0].meta.pop("image", None)  # reserved by the folder layout
        write_dataset(samples, target, format=fmt)
        for p in tmp_path.rglob("*"):
            assert p == tmp_path / "s.tar" or out in p.parents or p in (out, tmp_path / "nested"), p
    assert not (tmp_path.parent / "evil.png").exists()


def test_reconstruct_output_names_are_stems_inside_the_output_folder():
    """`seedtok reconstruct -o DIR` names files by the input's stem (no directory part) inside DIR."""
    import seedtok.cli as cli

    source = Path(cli.__file__).read_text()
    assert 'args.out / (f"{stems[n]}.png"' in source and "Path(p).stem for p in args.images" in source
    assert Path("../../x.png").stem == "x" and Path("/etc/passwd").stem == "passwd"


# ------------------------------------------------------------------------------------------------ limits
def test_request_and_pixel_limits_are_configurable_and_on_by_default():
    pytest.importorskip("fastapi")
    from seedtok.web.app import MAX_UPLOAD_BYTES, BodyLimit, create_app
    from seedtok.web.engine import MAX_PIXELS, MAX_TEXT
    from seedtok import SeedTokenizer
    from seedtok.web import Engine

    assert MAX_UPLOAD_BYTES == 10 * 2**20 and MAX_PIXELS == 40_000_000 and MAX_TEXT == 300
    app = create_app(Engine(SeedTokenizer.from_pretrained("micro"), None))
    limits = [m for m in app.user_middleware if m.cls is BodyLimit]
    assert len(limits) == 1 and limits[0].kwargs["limit"] == MAX_UPLOAD_BYTES
