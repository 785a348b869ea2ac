"""The same image gives the same ids: across runs (a fresh interpreter), batch sizes 1 and 8, and torch thread
counts 1 and 2 on the CPU; for the micro preset and the bundled tiny tokenizer."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from seedtok import SeedTokenizer
from seedtok.models.tokenizer import BUNDLED

PRESETS = ["micro", pytest.param("tiny", marks=[  # ~20 s on a busy 2-core machine: `make test-slow`
    pytest.mark.slow, pytest.mark.skipif(not (BUNDLED["tiny"] / "config.json").is_file(), reason="no tiny weights")])]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("det")
    from seedtok.data.emoji import EmojiWorld

    images = list(photos) + [EmojiWorld("test", 0)[i].image for i in range(3)]
    rng = np.random.default_rng(5)
    images += [Image.fromarray(rng.integers(0, 256, (40 + i, 30, 3), dtype=np.uint8)) for i in range(2)]
    paths = []
    for i, image in enumerate(images):  # 12 images: batch 8 gives a full and a partial batch
        paths.append(root / f"{i:02d}.png")
        image.save(paths[-1])
    return [str(p) for p in paths]


def encode_with(tokenizer, paths, batch_size, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return tokenizer.encode(paths, batch_size=batch_size)
    finally:
        torch.set_num_threads(before)


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from seedtok import SeedTokenizer
    torch.set_num_threads(2)
    paths = json.loads(sys.argv[2])
    print(json.dumps(SeedTokenizer.from_pretrained(sys.argv[1]).encode(paths, batch_size=8).tolist()))
""")


@pytest.mark.parametrize("name", PRESETS)
def test_ids_are_identical_across_runs_batch_sizes_and_threads(image_files, name):
    tokenizer = SeedTokenizer.from_pretrained(name)
    reference = encode_with(tokenizer, image_files, batch_size=1, threads=1)
    assert reference.shape == (len(image_files), 32)
    assert len({tuple(r) for r in reference.tolist()}) > len(image_files) // 2  # not a constant map
    for batch_size in (1, 8):
        for threads in (1, 2):
            assert torch.equal(encode_with(tokenizer, image_files, batch_size, threads), reference), \
                (batch_size, threads)
    # a second run: a fresh interpreter that builds (micro) or loads (tiny) the model again
    result = subprocess.run([sys.executable, "-c", SCRIPT, name, json.dumps(image_files)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == reference.tolist()
