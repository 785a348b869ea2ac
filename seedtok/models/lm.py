"""``SeedLM``: an off-the-shelf causal LM that reads and writes SEED image ids (stage 3, SPEC §3).

    text + image ids  ->  any transformers causal LM + `<img>` `<img_00000>`... `</img>` + LoRA  ->  text | ids

Everything about how an image sits in text lives here and is used by training and inference alike:

* the image span ``<img>`` + one ``<img_{id:05d}>`` per code + ``</img>`` (`image_span`);
* the vocabulary layout: code i is LM id ``image_offset + i`` -- appended after the base vocabulary, or pinned
  with ``image_id_shift`` (SEED-LLaMA: 32000 + i), so a released SEED-LLaMA folder runs with our tokenizer;
* the prompt formats (`PROMPT_FORMATS`: plain, Vicuna ``USER:``/``ASSISTANT:``, LLaMA-2 ``[INST]``, ChatML);
* the training sequences (`SeedLM.caption_sequence`, `SeedLM.instruction_sequence`) and their loss masks.

Sequences are built as id lists segment by segment (text segments tokenized without special tokens, image
ids mapped directly), never by tokenizing a string full of image tokens: exact, and fast.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from ..config import LM_PRESETS, LMConfig, lm_preset, resolve_dtype
from ..errors import CheckpointError, ConfigError, IdsError
from ..fileio import atomic_write, atomic_write_folder, cache_dir

IMG_BEGIN = "<img>"
IMG_END = "</img>"
IMG_TOKEN = "<img_{:05d}>"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MERGED_CONFIG_NAME = "seedlm.json"  # beside a merged (plain transformers) folder
IGNORE = -100  # label of positions without loss
BUNDLED = {"tiny": Path(__file__).resolve().parent.parent / "weights" / "tiny-lm"}
CAPTION_QUESTION = "Describe the image."


# ------------------------------------------------------------------------------------------ prompt formats
@dataclass(frozen=True)
class PromptFormat:
    """A one-turn chat template: ``user`` wraps the prompt (``{prompt}`` = image span + question); the answer
    follows ``answer_prefix`` and ends with the LM's end-of-sequence token."""

    name: str
    user: str
    answer_prefix: str = ""

    def split(self) -> tuple[str, str]:
        before, _, after = self.user.partition("{prompt}")
        return before, after


PROMPT_FORMATS = {
    "plain": PromptFormat("plain", "{prompt}\n"),
    "vicuna": PromptFormat("vicuna", "USER: {prompt}\nASSISTANT:", " "),  # SEED-LLaMA 8B
    "llama2": PromptFormat("llama2", "[INST] {prompt} [/INST]", " "),  # SEED-LLaMA 14B (LLaMA-2 chat)
    "chatml": PromptFormat("chatml", "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"),
}


def prompt_format(name: str) -> PromptFormat:
    try:
        return PROMPT_FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown prompt format {name!r}; choose one of {', '.join(PROMPT_FORMATS)}") from None


def image_span(ids: Iterable[int]) -> str:
    """Image ids -> their text form ``<img><img_00012>...</img>`` (SPEC §3)."""
    return IMG_BEGIN + "".join(IMG_TOKEN.format(int(i)) for i in ids) + IMG_END


_SPAN_TOKEN = re.compile(r"<img_(\d{5}|[1-9]\d{5,})>")  # canonical: IMG_TOKEN.format(i)


def parse_image_span(text: str) -> list[int]:
    """The inverse of `image_span`: ``<img><img_00012>...</img>`` -> ``[12, ...]``. Anything else in the text
    (a missing ``<img>`` / ``</img>``, stray characters between the tokens) is an `IdsError`."""
    if not (isinstance(text, str) and text.startswith(IMG_BEGIN) and text.endswith(IMG_END)):
        raise IdsError(f"not an image span (expected {IMG_BEGIN}<img_NNNNN>...{IMG_END}): {str(text)[:60]!r}")
    body = text[len(IMG_BEGIN):len(text) - len(IMG_END)]
    ids, pos = [], 0
    for match in _SPAN_TOKEN.finditer(body):
        if match.start() != pos:
            break
        ids.append(int(match.group(1)))
        pos = match.end()
    if pos != len(body):
        raise IdsError(f"unexpected text in an image span at character {len(IMG_BEGIN) + pos}: "
                       f"{body[pos:pos + 20]!r}")
    return ids


class Image_:  # noqa: N801 - a marker type, reads as "an image segment"
    """An image segment of a sequence: its tokenizer ids."""

    __slots__ = ("ids",)

    def __init__(self, ids):
        self.ids = [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]


Segment = tuple[object, bool]  # (str | Image_ | "eos"/"bos" marker, counts in the loss)


# ------------------------------------------------------------------------------------------ base models
def converted_gguf(name: str, progress: bool = True) -> Path:
    """A registry-shipped GGUF base (seedtok.assets), dequantised once into a transformers folder in the
    cache (fp32; ~0.5 GB for SmolLM2-135M). Written under a temporary name and renamed when complete."""
    from ..assets import resolve

    gguf = resolve(name)
    folder = cache_dir() / "lm" / f"{name}-{gguf.stat().st_size}"
    if (folder / ".complete").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"seedtok: converting {gguf.name} once into {folder} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain fp32: drop the GGUF quantizer marks so save_pretrained writes a
    # normal folder (transformers refuses to serialise a "quantized" model otherwise).
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.quantization_config = None

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / ".complete").write_text(gguf.name)

    # another process may have finished the same conversion first: keep its folder
    return atomic_write_folder(folder, write, keep_existing=lambda f: (f / ".complete").is_file())


def base_folder(spec: str, relative_to: Path | None = None) -> Path:
    """A base-model spec (asset name or folder; relative folders are resolved against ``relative_to``)."""
    from ..assets import ASSETS

    if spec in ASSETS and ASSETS[spec][2].endswith(".gguf"):
        return converted_gguf(spec)
    path = Path(spec).expanduser()
    if not path.is_absolute() and relative_to is not None and (relative_to / path).exists():
        path = relative_to / path
    if not (path / "config.json").is_file():
        raise CheckpointError(f"base LM {spec!r} is neither a registry asset nor a transformers model folder")
    return path


def load_base(spec: str, dtype=None, relative_to: Path | None = None):
    """(model, tokenizer) of a base LM spec."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = base_folder(spec, relative_to)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=resolve_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load base LM from {folder}: {exc}") from None
    return model, tokenizer


def lora_target_modules(model: nn.Module) -> list[str]:
    """The names of every Linear inside the decoder blocks, as the model calls them: LLaMA / Qwen / SmolLM2
    q/k/v/o_proj + gate/up/down_proj; OPT q/k/v/out_proj + fc1/fc2 (SPEC §3's attention and MLP projections)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"{type(model).__name__}: no decoder block list found for LoRA")
    blocks = max(lists, key=lambda m: len(m))
    linear_types: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style projections

        linear_types += (Conv1D,)
    except ImportError:  # pragma: no cover
        pass
    names = sorted({name.rsplit(".", 1)[-1] for name, m in blocks.named_modules() if isinstance(m, linear_types)})
    if not names:
        raise ConfigError(f"{type(model).__name__}: no Linear layers in its decoder blocks")
    return names


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name.rsplit(".", 1)[-1]
    raise ConfigError("embedding layer not found")


# ------------------------------------------------------------------------------------------ sampling
def sample_next(logits: torch.Tensor, generators: Sequence[torch.Generator], temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """One token per row of ``logits`` [B, V] (fp32; disallowed entries already -inf). temperature <= 0 is
    greedy. Each row draws from its own generator, so a row's result does not depend on the batch."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the best token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])


def _returned_cache(out):
    """The KV cache a forward returned, under the name of the installed transformers (``cache`` or
    ``past_key_values``)."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


# ------------------------------------------------------------------------------------------ the model
class SeedLM(nn.Module):
    """A causal LM with image tokens and (optionally) a LoRA adapter.

    Build with `build` (fresh adapter on a base), load with `from_pretrained` (our checkpoint folder, a merged
    folder, a plain transformers folder such as a SEED-LLaMA release, or the ``tiny`` preset)."""

    def __init__(self, config: LMConfig, model: nn.Module, tokenizer, stored: Sequence[str]):
        super().__init__()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self._stored = list(stored)
        vocab = tokenizer.get_vocab()
        self.begin_id, self.end_id = vocab[IMG_BEGIN], vocab[IMG_END]
        self.image_offset = vocab[IMG_TOKEN.format(0)]
        self.format = prompt_format(config.prompt_format)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ConfigError("the base tokenizer has no end-of-sequence token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        bos = tokenizer.bos_token_id
        add_bos = config.add_bos
        if add_bos is None:  # as the tokenizer does by default (LLaMA: yes; SmolLM2, OPT's GPT-2 BPE: varies)
            add_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.bos_ids = [bos] if add_bos and bos is not None else []
        self._image_tokenizer = None
        self._text_ids = lru_cache(maxsize=65536)(self._tokenize)

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def build(cls, config: LMConfig, base=None, relative_to: Path | None = None, seed: int = 0,
              codebook: torch.Tensor | None = None, captioned_ids: tuple | None = None) -> "SeedLM":
        """Base LM (``base=(model, tokenizer)`` or ``config.base``) + image tokens + a fresh LoRA adapter.
        ``codebook`` ([codebook_size, code_dim]): start the code tokens' rows from it (`codebook_rows`).
        ``captioned_ids`` ((ids [N, T], N captions)): start them from the captions of the images that use each
        code (`caption_rows`; codes no image uses keep their codebook or mean start)."""
        model, tokenizer = base if base is not None else load_base(config.base, config.dtype, relative_to)
        offset = extend_vocabulary(tokenizer, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the new rows' random init is reproducible
            if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
                model.resize_token_embeddings(len(tokenizer))
        if codebook is not None and tuple(codebook.shape[:1]) != (config.codebook_size,):
            raise ConfigError(f"a codebook of {codebook.shape[0]} codes cannot start the rows of "
                              f"{config.codebook_size} image tokens")
        if codebook is not None or captioned_ids is not None:
            with torch.no_grad():
                weight = model.get_input_embeddings().weight
                first_new = min([offset] + tokenizer.convert_tokens_to_ids([IMG_BEGIN, IMG_END]))
                base_rows = weight[:first_new]  # the base vocabulary's rows
                rows = (codebook_rows(codebook, base_rows, seed) if codebook is not None
                        else weight[offset:offset + config.codebook_size].float().clone())
                if captioned_ids is not None:
                    ids, captions = captioned_ids
                    texts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
                    from_captions, used = caption_rows(ids, texts, base_rows, config.codebook_size)
                    rows[used] = from_captions[used]
                weight[offset:offset + config.codebook_size] = rows.to(weight.dtype)
        new_ids = [offset + i for i in range(config.codebook_size)]
        new_ids += [tokenizer.convert_tokens_to_ids(t) for t in (IMG_BEGIN, IMG_END)]
        stored: list[str] = []
        if config.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            embed = _module_name(model, model.get_input_embeddings())
            head_module = model.get_output_embeddings()
            tied = head_module is not None and head_module.weight is model.get_input_embeddings().weight
            tokens = None
            modules_to_save = None
            if config.full_embeddings:
                modules_to_save = [embed] + ([] if tied or head_module is None else [_module_name(model, head_module)])
            elif config.train_new_rows:
                tokens = {embed: sorted(new_ids)}
                if not tied and head_module is not None:
                    tokens[_module_name(model, head_module)] = sorted(new_ids)
            targets = list(config.lora_targets) if config.lora_targets else lora_target_modules(model)
            peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                     target_modules=targets, trainable_token_indices=tokens,
                                     modules_to_save=modules_to_save, bias="none")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # LoRA A matrices: reproducible
                model = get_peft_model(model, peft_config)
            for name, param in model.named_parameters():
                if param.requires_grad or (config.full_embeddings and "norm" in name.lower()):
                    stored.append(name)
        model.eval()
        return cls(config, model, tokenizer, stored)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype=None, device: str | torch.device = "cpu",
                        tokenizer: str | None = None, prompt_format: str | None = None) -> "SeedLM":
        """Our checkpoint folder (config.json + model.safetensors), a merged folder (+ seedlm.json), a plain
        transformers folder whose tokenizer has the image tokens (SEED-LLaMA), or a preset with bundled
        weights. ``tokenizer`` / ``prompt_format`` override the config's."""
        from safetensors.torch import load_file

        name = str(name_or_path)
        path = Path(name_or_path)
        if name in LM_PRESETS:
            if name not in BUNDLED or not (BUNDLED[name] / CONFIG_NAME).is_file():
                raise CheckpointError(f"LM preset {name!r} has no bundled weights; train them with "
                                      f"`seedtok train lm --config {name}` or give a checkpoint folder")
            path = BUNDLED[name]
        if not path.is_dir():
            raise CheckpointError(f"no LM checkpoint folder or preset named {name!r} (presets: "
                                  f"{', '.join(LM_PRESETS)})")
        state = None
        if (path / CONFIG_NAME).is_file() and _is_seedlm_config(path / CONFIG_NAME):
            config = LMConfig.from_json_file(path / CONFIG_NAME)
            state = path / WEIGHTS_NAME
        elif (path / MERGED_CONFIG_NAME).is_file():
            config = LMConfig.from_json_file(path / MERGED_CONFIG_NAME)
            config.base, config.lora_r = str(path), 0
        elif (path / "config.json").is_file():
            config = LMConfig(name=path.name, base=str(path), lora_r=0)
            config.codebook_size = _count_image_tokens(path)
            config.image_id_shift = None
        else:
            raise CheckpointError(f"{path} is not an LM checkpoint folder (no config.json)")
        if tokenizer:
            config.tokenizer = tokenizer
        if prompt_format:
            config.prompt_format = prompt_format
        if dtype:
            config.dtype = str(dtype).replace("torch.", "")
        lm = cls.build(config, relative_to=path)
        if state is not None:
            if not state.is_file():
                raise CheckpointError(f"missing weights file {state}")
            try:
                tensors = load_file(str(state))
            except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
                raise CheckpointError(f"cannot read {state} as safetensors: {exc}") from None
            lm.load_state_dict_checked(tensors)
        return lm.to(device).eval()

    # ------------------------------------------------------------------------------------------ state
    def stored_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the adapter, the new token rows (or the full embeddings and norms)."""
        params = dict(self.model.named_parameters())
        return {name: params[name] for name in self._stored}

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        params = dict(self.model.named_parameters())
        return [(name, params[name]) for name in self._stored]

    def load_state_dict_checked(self, state: dict[str, torch.Tensor]) -> None:
        own = self.stored_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"LM checkpoint does not match its config ({self.config.name}): "
                                  f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                                  f"{unexpected[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                if value.shape != own[key].shape:
                    raise CheckpointError(f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, "
                                          f"model {tuple(own[key].shape)}")
                own[key].copy_(value.to(own[key].dtype))

    def save_pretrained(self, folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> Path:
        """``config.json`` (LMConfig) + ``model.safetensors`` (adapter + new rows), each written atomically.
        Reloading rebuilds the base, extends its vocabulary the same way, then fills these tensors."""
        cast = resolve_dtype(dtype) if dtype else None
        return self._write(folder, {k: (v.to(cast) if cast else v) for k, v in self.stored_state_dict().items()})

    def save_pretrained_from(self, state_dict: dict[str, torch.Tensor], folder: str | os.PathLike) -> Path:
        """`save_pretrained` with the weights taken from ``state_dict`` (this module's full state dict, as
        FSDP / DeepSpeed gather it). The module itself is not read: under FSDP its parameters are shards and
        its wrapped submodules are renamed (``..._fsdp_wrapped_module...``)."""
        missing = [n for n in self._stored if f"model.{n}" not in state_dict]
        if missing:
            raise CheckpointError(f"the gathered state dict lacks {len(missing)} stored keys, e.g. {missing[:3]}")
        return self._write(folder, {n: state_dict[f"model.{n}"] for n in self._stored})

    def _write(self, folder: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(self.config.to_json()))
        return folder

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the base model's activations in backward (non-reentrant: works with frozen inputs and
        LoRA, no input-grad hook needed)."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False

    def fuse(self) -> "SeedLM":
        """Fold the adapter into the base weights in place for faster inference (about 2x on CPU: no
        per-forward LoRA and row-copy work); `adapter_disabled` still gives the base LM (peft unmerges)."""
        if hasattr(self.model, "merge_adapter"):
            self.model.merge_adapter()
        return self

    def merged(self) -> nn.Module:
        """A plain transformers model with the adapter and new rows folded in (a copy; self is unchanged)."""
        import copy

        model = copy.deepcopy(self.model)
        return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model

    def save_merged(self, folder: str | os.PathLike) -> Path:
        """Fold the adapter in and write a transformers folder (+ tokenizer + ``seedlm.json``), loadable by
        `from_pretrained` and by plain transformers."""
        def write(tmp: Path) -> None:
            self.merged().save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            config = LMConfig.from_dict(self.config.to_dict())
            config.base, config.lora_r = ".", 0
            (tmp / MERGED_CONFIG_NAME).write_text(config.to_json())

        return atomic_write_folder(folder, write)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def image_tokenizer(self):
        """The SeedTokenizer named by ``config.tokenizer`` (loaded on first use; assignable)."""
        if self._image_tokenizer is None:
            from .tokenizer import SeedTokenizer

            self._image_tokenizer = SeedTokenizer.from_pretrained(self.config.tokenizer)
            self._check_image_tokenizer(self._image_tokenizer)
        return self._image_tokenizer

    @image_tokenizer.setter
    def image_tokenizer(self, value) -> None:
        self._check_image_tokenizer(value)
        self._image_tokenizer = value

    def _check_image_tokenizer(self, tok) -> None:
        if tok.num_tokens != self.num_image_tokens or tok.codebook_size != self.config.codebook_size:
            raise ConfigError(f"image tokenizer gives {tok.num_tokens} ids in [0, {tok.codebook_size}) but the LM "
                              f"expects {self.num_image_tokens} in [0, {self.config.codebook_size})")

    def image_token_ids(self) -> torch.Tensor:
        """LM ids of the code tokens, [codebook_size]."""
        return torch.arange(self.image_offset, self.image_offset + self.config.codebook_size)

    def new_token_ids(self) -> list[int]:
        return self.image_token_ids().tolist() + [self.begin_id, self.end_id]

    # ------------------------------------------------------------------------------------------ sequences
    def _tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    def check_image_ids(self, ids) -> list[int]:
        ids = torch.as_tensor(ids)
        if ids.dtype.is_floating_point or ids.ndim != 1 or ids.numel() != self.num_image_tokens:
            raise IdsError(f"expected {self.num_image_tokens} integer image ids, got shape {tuple(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.config.codebook_size:
            raise IdsError(f"image ids must lie in [0, {self.config.codebook_size})")
        return ids.tolist()

    def encode_segments(self, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
        """Segments -> (input ids, labels); labels are the ids where the segment counts in the loss, else -100."""
        ids: list[int] = []
        labels: list[int] = []
        for part, target in segments:
            if isinstance(part, Image_):
                piece = [self.begin_id] + [self.image_offset + i for i in self.check_image_ids(part.ids)] + [self.end_id]
            elif part == "<eos>":
                piece = [self.eos_id]
            else:
                piece = list(self._text_ids(part))
            ids += piece
            labels += piece if target else [IGNORE] * len(piece)
        return ids, labels

    def encode(self, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
        """`encode_segments` with the beginning-of-sequence token first when the LM uses one."""
        ids, labels = self.encode_segments(segments)
        return self.bos_ids + ids, [IGNORE] * len(self.bos_ids) + labels

    def caption_sequence(self, image_ids, caption: str, image_first: bool, label_image: bool = True
                         ) -> tuple[list[int], list[int]]:
        """Pre-training sample (SPEC §3): image then caption, or caption then image; loss on every token
        (``label_image=False``: not on the image span)."""
        image: Segment = (Image_(image_ids), label_image)
        parts: list[Segment] = [image, (caption, True)] if image_first else [(caption, True), image]
        return self.encode(parts + [("<eos>", True)])

    def instruction_prompt(self, question: str, image_ids=None) -> list[Segment]:
        before, after = self.format.split()
        parts: list[Segment] = [(before, False)]
        if image_ids is not None:
            parts.append((Image_(image_ids), False))
        return parts + [(question, False), (after, False)]

    def instruction_sequence(self, image_ids, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Instruction sample: the formatted question (with the image) then the answer; loss on the answer
        (and its end-of-sequence token) only."""
        parts = self.instruction_prompt(question, image_ids)
        parts += [(self.format.answer_prefix + answer, True), ("<eos>", True)]
        return self.encode(parts)

    def collate(self, sequences: Sequence[tuple[list[int], list[int]]], max_length: int | None = None
                ) -> dict[str, torch.Tensor]:
        """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
        max_length = max_length or self.config.max_length
        seqs = [(ids[:max_length], labels[:max_length]) for ids, labels in sequences]
        length = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for row, (ids, lab) in enumerate(seqs):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(lab)] = torch.tensor(lab)
            mask[row, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def forward(self, input_ids, attention_mask=None, labels=None, labelled_logits_only: bool = False, **kwargs):
        """The wrapped LM's forward. ``labelled_logits_only`` (training): the same loss (mean next-token cross
        entropy over the labelled tokens), but the output layer runs only at the positions that predict a
        labelled token (transformers' boolean ``logits_to_keep``); ``logits`` is then [labelled tokens, vocab].
        The output layer over the whole vocabulary is a large share of a small model's step, and pad, prompt
        and unlabelled image positions need none of it."""
        if not (labelled_logits_only and labels is not None and self._keeps_logits_by_mask()):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        targets = labels[:, 1:]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = targets != IGNORE
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **kwargs)
        out.loss = nn.functional.cross_entropy(out.logits.float(), targets[keep[:, :-1]])
        return out

    def _base_forward_arguments(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return inspect.signature(base.forward).parameters

    def _keeps_logits_by_mask(self) -> bool:
        # every transformers causal LM that slices with `slice_logits_to_keep` takes a boolean mask
        return "logits_to_keep" in self._base_forward_arguments()

    def _cache_argument(self) -> str:
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40)
        return "cache" if "cache" in self._base_forward_arguments() else "past_key_values"

    # ------------------------------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, mode: str = "text",
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                     use_cache: bool = True) -> list[list[int]]:
        """Continue each prompt (lists of LM ids), batched with left padding and a KV cache.

        ``mode="text"``: image tokens are never emitted; a row stops at end-of-sequence. ``mode="image"``:
        only code tokens are admitted, for exactly ``max_new_tokens`` steps. Row i samples with seed
        ``seed + i`` (its own generator), so a batch gives what each prompt gives alone with that seed.
        ``use_cache=False`` runs the whole sequence again at every step instead (the baseline of
        benchmarks/lm_speed.py; same tokens)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt needs at least one token")
        device = self.device
        batch, length = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, length - len(p):] = torch.tensor(list(p))
            mask[row, length - len(p):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        vocab = self.model.get_output_embeddings().weight.shape[0] if self.model.get_output_embeddings() is not None \
            else len(self.tokenizer)
        allowed = torch.zeros(vocab, dtype=torch.bool)
        if mode == "image":
            allowed[self.image_token_ids()] = True
        elif mode == "text":
            allowed[:len(self.tokenizer)] = True
            allowed[self.new_token_ids()] = False
        else:
            raise ConfigError(f"unknown generation mode {mode!r}")
        bias = torch.zeros(vocab).masked_fill(~allowed, float("-inf")).to(device)
        generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(batch)]
        cache_arg = self._cache_argument()
        last = {"logits_to_keep": 1} if self._keeps_logits_by_mask() else {}  # the next token's logits only
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=use_cache,
                         **last)
        past, logits = _returned_cache(out), out.logits[:, -1]
        last_pos = positions[:, -1]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        result: list[list[int]] = [[] for _ in range(batch)]
        for step in range(max_new_tokens):
            scores = logits.float()[:, :vocab] + bias
            token = sample_next(scores, generators, temperature, top_p, top_k)
            for row in range(batch):
                if not done[row]:
                    result[row].append(int(token[row]))
            if mode == "text":
                done |= token == self.eos_id
                if bool(done.all()):
                    break
                token = token.masked_fill(done, self.pad_id)
            if step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
            last_pos = last_pos + 1
            if use_cache:
                out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                                 use_cache=True, **{cache_arg: past}, **last)
                past, logits = _returned_cache(out), out.logits[:, -1]
            else:
                input_ids = torch.cat([input_ids, token[:, None]], dim=1)
                positions = torch.cat([positions, last_pos[:, None]], dim=1)
                out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                 **last)
                logits = out.logits[:, -1]
        return result

    def _decode_text(self, ids: list[int]) -> str:
        ids = [i for i in ids if i != self.eos_id]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _image_ids(self, images) -> torch.Tensor:
        """Images (PIL / paths / arrays) or ids [B, N] -> ids [B, N]."""
        if torch.is_tensor(images) and not images.is_floating_point():
            ids = images if images.ndim == 2 else images[None]
            return torch.stack([torch.tensor(self.check_image_ids(row)) for row in ids])
        if not isinstance(images, (list, tuple)):
            images = [images]
        return self.image_tokenizer.encode(list(images)).cpu()

    def caption(self, images, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                top_k: int = 0, seed: int = 0) -> list[str]:
        """Images (or their ids [B, N]) -> captions: the image span, then the LM continues in text."""
        ids = self._image_ids(images)
        prompts = [self.encode([(Image_(row), False)])[0] for row in ids]
        out = self.generate_ids(prompts, max_new_tokens, "text", temperature, top_p, top_k, seed)
        return [self._decode_text(o) for o in out]

    def ask(self, images, questions: str | Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
            top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[str]:
        """Answer a question about each image in the model's prompt format."""
        ids = self._image_ids(images)
        if isinstance(questions, str):
            questions = [questions] * len(ids)
        if len(questions) != len(ids):
            raise ConfigError(f"{len(ids)} images but {len(questions)} questions")
        prompts = [self.encode(self.instruction_prompt(q, row) + [(self.format.answer_prefix, False)])[0]
                   for row, q in zip(ids, questions)]
        out = self.generate_ids(prompts, max_new_tokens, "text", temperature, top_p, top_k, seed)
        return [self._decode_text(o) for o in out]

    def chat_reply(self, text: str, image_ids: Sequence | None = None, max_new_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[int]:
        """One instruction turn; returns the generated LM ids (text mode)."""
        prompt = self.encode(self.instruction_prompt(text, image_ids) + [(self.format.answer_prefix, False)])[0]
        return self.generate_ids([prompt], max_new_tokens, "text", temperature, top_p, top_k, seed)[0]

    def draw_prompt(self, prompt: str, instruct: bool = False) -> list[int]:
        """The LM ids that make the model draw: the prompt (plain, or in the chat format), then ``<img>``."""
        if instruct:
            segments = self.instruction_prompt(prompt) + [(self.format.answer_prefix, False)]
        else:
            segments = [(prompt, False)]
        return self.encode(segments)[0] + [self.begin_id]

    def draw(self, prompts: str | Sequence[str], temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, seed: int = 0, instruct: bool = False) -> torch.Tensor:
        """Text -> image ids [B, num_image_tokens]: ``<img>`` is forced, then only code tokens are admitted for
        exactly the tokenizer's token count (``</img>`` follows by construction). Sampling defaults: the
        config's (SPEC §3: temperature 1.0, top-p 0.5)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        cfg = self.config
        out = self.generate_ids([self.draw_prompt(p, instruct) for p in prompts], self.num_image_tokens, "image",
                                cfg.temperature if temperature is None else temperature,
                                cfg.top_p if top_p is None else top_p, cfg.top_k if top_k is None else top_k, seed)
        return torch.tensor(out, dtype=torch.long) - self.image_offset

    def draw_images(self, prompts, **kwargs) -> list:
        """Text -> PIL images through the image tokenizer's decoder (`SeedTokenizer.decode`)."""
        ids = self.draw(prompts, **kwargs)
        tok = self.image_tokenizer
        if not hasattr(tok, "decode"):
            raise CheckpointError("this image tokenizer has no image decoder (SeedTokenizer.decode); "
                                  "use draw() for the ids")
        return tok.decode(ids)

    # ------------------------------------------------------------------------------------------ text
    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the base LM alone (LoRA and the new rows off)."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        else:
            yield

    @torch.inference_mode()
    def perplexity(self, texts: Sequence[str], base: bool = False) -> float:
        """Token-level perplexity of plain texts (with the adapter, or with ``base=True`` without it)."""
        total, count = 0.0, 0
        ctx = self.adapter_disabled() if base else contextlib.nullcontext()
        with ctx:
            for text in texts:
                ids, labels = self.encode([(text, True)])
                batch = self.collate([(ids, labels)], max_length=10_000)
                out = self.model(input_ids=batch["input_ids"].to(self.device),
                                 attention_mask=batch["attention_mask"].to(self.device))
                # the base vocabulary only: text never continues with an image token, and the numbers stay
                # comparable with the base LM's (whose new rows are untrained)
                logits = out.logits[0, :-1, :min(self.new_token_ids())].float()
                target = batch["labels"][0, 1:].to(self.device)
                keep = target != IGNORE
                nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
                total, count = total + nll.item(), count + int(keep.sum())
        return float(torch.exp(torch.tensor(total / max(1, count))))


# ------------------------------------------------------------------------------------------ vocabulary
def codebook_rows(codebook: torch.Tensor, base_rows: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Initial LM rows [K, H] for K code tokens from the image tokenizer's codebook [K, d]: the centred code
    vectors through a fixed random orthonormal projection d -> H (seeded), scaled so their mean distance from
    the base rows' mean equals the base rows' mean spread, around that mean. Distances between codes are kept
    (up to one scale), so the LM sees distinct codes from the first step."""
    codes = codebook.detach().float()
    codes = codes - codes.mean(dim=0)
    codes = codes / codes.norm(dim=1).mean().clamp(min=1e-12)
    base = base_rows.detach().float()
    mean = base.mean(dim=0)
    spread = (base - mean).norm(dim=1).mean()
    generator = torch.Generator().manual_seed(seed)
    projection = torch.linalg.qr(torch.randn(base.shape[1], codes.shape[1], generator=generator))[0]  # [H, d]
    return mean + spread * codes @ projection.t()


def caption_rows(ids: torch.Tensor, captions: Sequence[Sequence[int]], base_rows: torch.Tensor,
                 codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial LM rows [K, H] for K code tokens from captioned training images (``ids`` [N, T], ``captions``:
    N lists of base-vocabulary token ids), and a [K] mask of the codes any image uses.

    Each image's caption becomes the mean of its tokens' base rows; each code, the mean of that over the
    images that use it (counted once per position), minus the mean over all images: what sets the captions of
    its images apart (for a code mostly seen on pink scenes, the direction of " pink"). Scaled so the mean
    distance from the base rows' mean equals the base rows' mean spread, around that mean. Why: with rows that
    only keep the codebook's geometry (`codebook_rows`), the LM must discover what each of the 1,024 codes
    means before it can read; these rows already point where the words of their images lie."""
    base = base_rows.detach().float()
    mean = base.mean(dim=0)
    spread = (base - mean).norm(dim=1).mean()
    per_image = torch.stack([base[list(c)].mean(dim=0) if len(c) else mean for c in captions])  # [N, H]
    ids = torch.as_tensor(ids, dtype=torch.long)
    sums = torch.zeros(codebook_size, base.shape[1])
    counts = torch.zeros(codebook_size)
    for position in range(ids.shape[1]):
        sums.index_add_(0, ids[:, position], per_image)
        counts.index_add_(0, ids[:, position], torch.ones(len(ids)))
    used = counts > 0
    offsets = torch.zeros_like(sums)
    offsets[used] = sums[used] / counts[used, None] - per_image.mean(dim=0)
    scale = offsets[used].norm(dim=1).mean().clamp(min=1e-12) if used.any() else torch.tensor(1.0)
    return mean + spread * offsets / scale, used


def extend_vocabulary(tokenizer, config: LMConfig) -> int:
    """Make sure the tokenizer has ``<img>``, ``</img>`` and ``<img_00000>``... with the codes on consecutive
    ids; returns the id of code 0. Tokens already there (a SEED-LLaMA tokenizer) are checked, not re-added."""
    from tokenizers import AddedToken

    names = [IMG_TOKEN.format(i) for i in range(config.codebook_size)]
    vocab = tokenizer.get_vocab()
    present = [n in vocab for n in names[:1] + names[-1:]] + [t in vocab for t in (IMG_BEGIN, IMG_END)]

    def token(text):
        return AddedToken(text, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)

    if not any(present):
        if config.image_id_shift is None:
            tokenizer.add_tokens([token(IMG_BEGIN), token(IMG_END)] + [token(n) for n in names], special_tokens=True)
        else:
            if len(tokenizer) != config.image_id_shift:
                raise ConfigError(f"image_id_shift {config.image_id_shift} needs a base vocabulary of exactly that "
                                  f"size; this tokenizer has {len(tokenizer)}")
            tokenizer.add_tokens([token(n) for n in names] + [token(IMG_BEGIN), token(IMG_END)], special_tokens=True)
        vocab = tokenizer.get_vocab()
    elif not all(present):
        raise ConfigError("the tokenizer has some but not all of the image tokens (<img>, </img>, <img_00000>...)")
    offset = vocab[names[0]]
    if any(vocab.get(n) != offset + i for i, n in enumerate(names)):
        raise ConfigError(f"the tokenizer's {len(names)} image tokens are not on consecutive ids")
    if config.image_id_shift is not None and offset != config.image_id_shift:
        raise ConfigError(f"code 0 sits at LM id {offset}, expected image_id_shift {config.image_id_shift}")
    return offset


def _count_image_tokens(folder: Path) -> int:
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    count = 0
    while IMG_TOKEN.format(count) in vocab:
        count += 1
    if count == 0:
        raise CheckpointError(f"{folder} is a transformers folder without image tokens; train an adapter on it "
                              f"(LMConfig base={str(folder)!r}) instead")
    return count


def _is_seedlm_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("kind") == "seedlm"
    except (OSError, ValueError, AttributeError):
        return False


__all__ = ["CAPTION_QUESTION", "IMG_BEGIN", "IMG_END", "IMG_TOKEN", "PROMPT_FORMATS", "LMConfig", "PromptFormat",
           "SeedLM", "converted_gguf", "extend_vocabulary", "image_span", "lm_preset", "lora_target_modules",
           "parse_image_span", "prompt_format", "sample_next"]
