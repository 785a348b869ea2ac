"""Official SEED checkpoints -> our modules: the key map, the loader and its report.

Supported inputs (SPEC, ``reference/official_seed_keys.txt``):
- SEED-2: ``seed_quantizer.pt`` (flat state dict, no ViT) plus LAVIS ``eva_vit_g.pth`` (the ViT keys without
  the ``visual_encoder.`` prefix), or one state dict that already holds the ``visual_encoder.*`` keys.
- SEED-1: ``causal_qformer.pth`` then ``seed_tokenizer.pth`` (LAVIS ``{"model": state_dict}`` files), each
  holding only what its stage trained; later files override earlier ones.

Files are read with ``torch.load(weights_only=True)``: no arbitrary unpickling. Unexpected keys (the released
SEED-2 file has 146, e.g. the stage-1 text branch) are summarised and ignored; a shape mismatch is an error
naming the key and both shapes; missing keys are reported by part and, with ``strict``, are an error.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .config import TokenizerConfig, preset
from .errors import CheckpointError

# (our prefix, official prefix): first match wins.
_PREFIXES = [
    ("vision.model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision.model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision.model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
    ("vision.model.encoder.layers.", "visual_encoder.blocks."),
    ("vision.ln_vision.", "ln_vision."),
    ("qformer.query_tokens", "query_tokens"),
    ("qformer.vision_proj.", "vision_proj."),
    ("qformer.text_proj.", "text_proj."),
    ("qformer.temp", "temp"),
    ("qformer.", "Qformer.bert."),
    ("quantizer.embedding.", "quantize.embedding."),
    ("quantizer.", ""),
    ("detokenizer.reverse_qformer.query_tokens", "reverse_tokens"),
    ("detokenizer.reverse_qformer.", "Reverse_Qformer.bert."),
    ("detokenizer.", ""),
]
# Inside a ViT block: transformers' Blip2 names -> EVA's.
_VIT_BLOCK = [(".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."), (".self_attn.qkv.", ".attn.qkv."),
              (".self_attn.projection.", ".attn.proj.")]
# Buffers the reference saves that we compute instead (position ids): ignored on load, emitted on export.
_POSITION_IDS = ("Qformer.bert.embeddings.position_ids", "Reverse_Qformer.bert.embeddings.position_ids")


@dataclass(frozen=True)
class _Target:
    key: str  # our state-dict key
    part: str | None = None  # "q" / "v": a slice of EVA's qkv bias (k is a fixed zero)


def official_name(our_key: str) -> list[str]:
    """Our state-dict key -> the official key(s). The ViT's fused qkv bias is two official keys."""
    for ours, theirs in _PREFIXES:
        if our_key.startswith(ours):
            name = theirs + our_key[len(ours):]
            break
    else:
        raise KeyError(our_key)
    if name.startswith("visual_encoder.blocks."):
        for a, b in _VIT_BLOCK:
            name = name.replace(a, b)
        if name.endswith(".attn.qkv.bias"):
            stem = name[: -len("qkv.bias")]
            return [stem + "q_bias", stem + "v_bias"]
    return [name]


def official_key_map(model: torch.nn.Module) -> dict[str, _Target]:
    """official key -> where it goes in ``model``."""
    mapping: dict[str, _Target] = {}
    for key in model.state_dict():
        names = official_name(key)
        if len(names) == 1:
            mapping[names[0]] = _Target(key)
        else:
            mapping[names[0]] = _Target(key, "q")
            mapping[names[1]] = _Target(key, "v")
    return mapping


def to_official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the official names and layout (inverse of the loader)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        names = official_name(key)
        if len(names) == 1:
            out[names[0]] = value
        else:
            dim = value.shape[0] // 3
            out[names[0]], out[names[1]] = value[:dim], value[2 * dim:]
    for name in _POSITION_IDS:
        prefix = name[: -len("bert.embeddings.position_ids")]
        if any(k.startswith(prefix) for k in out):
            max_pos = getattr(model.config.qformer, "max_position_embeddings", 512)
            out[name] = torch.arange(max_pos, device=next(iter(out.values())).device)[None]
    return out


def official_parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts per part under the official layout (buffers excluded)."""
    groups = Counter()
    for name, value in to_official_state_dict(model).items():
        if name in _POSITION_IDS:
            continue
        groups[_official_group(name)] += value.numel()
    counts = {g: groups[g] for g in ("vision_encoder", "ln_vision", "qformer", "quantizer", "detokenizer") if g in groups}
    counts["total"] = sum(groups.values())
    return counts


def _official_group(name: str) -> str:
    if name.startswith("visual_encoder."):
        return "vision_encoder"
    if name.startswith("ln_vision."):
        return "ln_vision"
    if name.startswith(("Qformer.", "query_tokens", "vision_proj.", "text_proj.", "temp")):
        return "qformer"
    if name.startswith(("quantize.", "encode_task_layer.")):
        return "quantizer"
    return "detokenizer"


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class LoadReport:
    version: str
    files: list[str]
    loaded: int = 0
    missing: dict[str, list[str]] = field(default_factory=dict)  # part -> official keys
    unexpected: dict[str, int] = field(default_factory=dict)  # key pattern -> count
    ignored: list[str] = field(default_factory=list)  # recomputed buffers (position ids)

    @property
    def num_missing(self) -> int:
        return sum(len(v) for v in self.missing.values())

    @property
    def num_unexpected(self) -> int:
        return sum(self.unexpected.values())

    def summary(self) -> str:
        lines = [f"official {self.version} checkpoint from {', '.join(self.files)}",
                 f"  loaded {self.loaded} tensors"]
        if self.missing:
            lines.append(f"  missing {self.num_missing} keys:")
            lines += [f"    {part}: {len(keys)} (e.g. {keys[0]})" for part, keys in self.missing.items()]
        else:
            lines.append("  missing 0 keys")
        if self.unexpected:
            lines.append(f"  ignored {self.num_unexpected} unexpected keys:")
            lines += [f"    {pattern} x{n}" for pattern, n in self.unexpected.items()]
        if self.ignored:
            lines.append(f"  recomputed buffers (not loaded): {', '.join(self.ignored)}")
        return "\n".join(lines)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One official file -> flat {key: tensor}. LAVIS ``{"model": ...}`` wrappers are unwrapped and a bare EVA
    ViT file (``eva_vit_g.pth``) gets the ``visual_encoder.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing to load {path}: it holds more than tensors ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {_first_line(exc)}") from None
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        state = {"visual_encoder." + k: v for k, v in state.items()}
    return state


def infer_version(keys: Sequence[str]) -> str:
    """``reverse_tokens`` (the 77-query reverse Q-Former) means SEED-1; otherwise SEED-2."""
    keys = set(keys)
    return "seed1" if "reverse_tokens" in keys and "image_down.0.weight" not in keys else "seed2"


def load_official(cls, paths: Sequence[str | os.PathLike], version: str | None = None, strict: bool = True,
                  config: TokenizerConfig | None = None):
    """Build ``cls`` (SeedTokenizer) from official files; the report is on ``model.load_report``."""
    if not paths:
        raise CheckpointError("no checkpoint files given")
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(read_checkpoint(path))
    version = version or infer_version(list(state))
    if version not in ("seed1", "seed2"):
        raise CheckpointError(f"unknown official version {version!r}; use seed1 or seed2")
    model = cls.empty(config or preset(version))  # weights not in the files stay zero (and are reported)
    report = LoadReport(version=version, files=[str(p) for p in paths])
    mapping = official_key_map(model)
    own = model.state_dict()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, tensor in state.items():
            if name in _POSITION_IDS:
                report.ignored.append(name)
                continue
            target = mapping.get(name)
            if target is None:
                unexpected.append(name)
                continue
            dest = own[target.key]
            if target.part is not None:  # q / v slice of the fused qkv bias
                dim = dest.shape[0] // 3
                dest = dest[:dim] if target.part == "q" else dest[2 * dim:]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise CheckpointError(f"shape mismatch for {name} (-> {target.key}): checkpoint "
                                      f"{tuple(tensor.shape)}, model {tuple(dest.shape)}")
            dest.copy_(tensor.to(dest.dtype))  # EVA's k bias slice is never written: it stays zero
            report.loaded += 1
    for name, target in mapping.items():
        if name not in state:
            report.missing.setdefault(target.key.split(".")[0], []).append(name)
    report.unexpected = dict(sorted(Counter(_pattern(k) for k in unexpected).items()))
    model.load_report = report
    if strict and report.missing:
        hint = " (the ViT is not in seed_quantizer.pt: pass LAVIS eva_vit_g.pth too)" if "vision" in report.missing else ""
        parts = ", ".join(f"{part}: {len(keys)}" for part, keys in report.missing.items())
        raise CheckpointError(f"official {version} checkpoint is missing {report.num_missing} keys ({parts}){hint}")
    return model


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", key)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
