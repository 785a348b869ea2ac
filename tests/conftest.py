import numpy as np
import pytest
import torch
from PIL import Image

from seedtok import SeedTokenizer


@pytest.fixture(scope="session")
def micro():
    return SeedTokenizer.from_pretrained("micro")


@pytest.fixture(scope="session")
def photos():
    """Real photos that scikit-image ships, plus a few odd ones."""
    import skimage.data

    images = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee()),
              Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.camera())]
    rng = np.random.default_rng(0)
    images += [Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)) for _ in range(3)]
    return images


def official_reference():
    """Sections of the reference key list: {section: {key: shape}}."""
    from pathlib import Path

    sections, current = {}, None
    names = {"# SEED-2": "seed2", "# SEED-1": "seed1", "# Stage-1": "stage1", "# Stage-2": "stage2"}
    for line in (Path(__file__).parent / "data" / "official_seed_keys.txt").read_text().splitlines():
        for prefix, name in names.items():
            if line.startswith(prefix):
                current = name
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        sections.setdefault(current, {})[key] = tuple(int(v) for v in shape.strip("[]").split(",") if v.strip())
    return sections


@pytest.fixture(scope="session")
def reference_keys():
    return official_reference()


def torch_seed(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (micro diffusion models and servers: threads only add
    overhead), restoring the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
