"""Interrupted training, for real: `seedtok train tokenizer` in a subprocess killed with SIGTERM / SIGKILL while
it trains, or while it writes a checkpoint; `--resume` then ends with weights identical to an uninterrupted
run, and the previous checkpoint stays loadable. (test_train.py covers the in-process `stop_after` resume.)"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from seedtok import SeedTokenizer
from seedtok.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, EVERY = 120, 10
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_config(folder: Path, steps=STEPS, every=EVERY) -> Path:
    path = folder / "run.json"
    path.write_text(json.dumps({"model": "micro", "train": {"1": {
        "steps": steps, "checkpoint_every": every, "batch_size": 4, "data": "emoji:train:32", "log_every": 5}}}))
    return path


def train_args(config, out, *extra):
    return ["train", "tokenizer", "--stage", "1", "--config", str(config), "--out", str(out), *extra]


def weights(folder):
    return SeedTokenizer.from_pretrained(folder).state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def latest_step(out: Path) -> int:
    try:
        return int((out / "latest").read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final weights (in-process)."""
    root = tmp_path_factory.mktemp("full")
    config = write_config(root)
    assert main(train_args(config, root / "out")) == 0
    return weights(root / "out" / "final")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killed_mid_run_resumes_to_identical_weights(tmp_path, reference, sig, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "seedtok.cli", *train_args(config, out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while latest_step(out) < 2 * EVERY and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    if sig == "SIGTERM":  # handled: one line, status 143, temporary checkpoint folders cleaned up
        assert proc.returncode == 143, err
        assert "seedtok: terminated\n" in err and "Traceback" not in err  # (tqdm may redraw its bar after)
        assert not list(out.glob(".tmp-*"))
    else:
        assert proc.returncode == -signal.SIGKILL
    stopped_at = latest_step(out)
    assert 2 * EVERY <= stopped_at < STEPS and not (out / "final").exists()
    SeedTokenizer.from_pretrained(out / f"ckpt-{stopped_at:07d}" / "model")  # the last checkpoint loads
    assert main(train_args(config, out, "--resume")) == 0
    assert f"trained {STEPS} steps" in capsys.readouterr().out
    assert_same_weights(weights(out / "final"), reference)


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    import torch

    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):  # the 2nd checkpoint's trainer state: half written, then the signal
        calls[0] += 1
        if calls[0] == 2:
            with open(f, "wb") as handle:
                handle.write(b"PK\\x03\\x04 half a zip")
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
            time.sleep(30)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
    from seedtok.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, reference, sig, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "out"
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE)
    result = subprocess.run([sys.executable, str(script), sig, *train_args(config, out)], env=ENV,
                            capture_output=True, text=True, timeout=180)
    assert (out / "latest").read_text().strip() == f"ckpt-{EVERY:07d}"  # still the first checkpoint
    leftovers = list(out.glob(".tmp-*"))
    if sig == "SIGTERM":
        assert result.returncode == 143, result.stderr
        assert leftovers == []  # cleaned up on the way out
    else:
        assert result.returncode == -signal.SIGKILL
        assert [p.name for p in leftovers] == [f".tmp-ckpt-{2 * EVERY:07d}"]  # half-written, never pointed to
    assert not (out / f"ckpt-{2 * EVERY:07d}").exists()
    first = SeedTokenizer.from_pretrained(out / f"ckpt-{EVERY:07d}" / "model")
    assert torch.load(out / f"ckpt-{EVERY:07d}" / "trainer_state.pt", weights_only=True)["step"] == EVERY
    assert first.num_tokens == 32
    assert main(train_args(config, out, "--resume")) == 0
    capsys.readouterr()
    assert_same_weights(weights(out / "final"), reference)
    assert not list(out.glob(".tmp-*"))  # the next save at that step replaced the leftover
