"""The one training loop every stage shares, on accelerate.

AdamW with LAVIS's weight-decay exclusions (no decay on biases, norms and other <2-d parameters), linear
warm-up then cosine decay, gradient clipping, mixed precision where the device has it, a progress bar with
loss and samples/s, JSONL logs, atomic periodic checkpoints, and ``resume`` that continues exactly: the data
order is a pure function of (seed, samples seen), and the optimizer, scheduler and RNG state are restored.

A stage is a ``Task``: which parameters train, how a batch becomes a loss.

Several processes (``torchrun`` / ``accelerate launch``, see docs/scaling.md) train data-parallel, with DDP's
semantics: rank 0's initial weights are broadcast, every rank draws its own share of each global batch,
gradients are averaged (bucketed all-reduce) before every step, so all ranks hold identical weights, which each
checkpoint verifies (a digest per rank, ``ranks_in_sync`` in the log). Losses and metrics are averaged over
ranks, counts (``corrupt_skipped``) summed; only rank 0 writes logs and checkpoints. The data position is the
number of samples seen, not the step, so a run resumes on a different number of processes where the data
stream left off. A task with ``wraps_model = True`` (the LM stage: the whole forward is ``model(...)``) is
instead handed to accelerate's FSDP or DeepSpeed engine when the launch config asks for one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write_text

LATEST = "latest"
STATE_NAME = "trainer_state.pt"


@dataclass
class TrainConfig:
    steps: int = 1000
    # length of the lr schedule (warm-up + cosine); None: ``steps``. Larger: the run stops before its cosine
    # ends (the rest of the schedule is never used), so a longer run's first steps are reproduced exactly
    schedule_steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    # "auto" (`auto_mixed_precision`): bf16 on a GPU or CPU that computes in it natively, else fp32; or "no" /
    # "bf16" / "fp16"
    mixed_precision: str = "auto"
    checkpoint_every: int = 200
    keep_checkpoints: int = 1
    log_every: int = 10
    seed: int = 0
    # data
    data: str = "emoji:train:20000"  # see seedtok.data.open_source
    cache_features: bool = False  # run the frozen image backbone once per image and keep its output
    augment: bool = False  # SPEC stage 1: RandomResizedCrop(scale 0.5-1) + horizontal flip
    # streaming tar shards (seedtok.data.stream) instead of reading the data into memory; resume approximate
    streaming: bool = False
    shuffle_buffer: int = 1000
    resampled: bool = True  # draw shards with replacement per (rank, worker): no epoch boundaries
    num_workers: int = 0  # DataLoader worker processes decoding the stream, per rank
    gradient_checkpointing: bool = False  # LM stage: recompute activations in backward (memory for time)
    # tokenizer stage 2's named loss additions (seedtok.train.tokenizer), 0 = the paper's loss
    retrieval_weight: float = 0.0
    last_query_weight: float = 0.0
    caption_weight: float = 0.0
    # stage 2's generation objective: "mse" (the paper's) or "standardized" (MSE after z-scoring every teacher
    # dimension by the training data's statistics); + ``generation_contrastive_weight`` x InfoNCE between
    # standardised generation and teacher embeddings of the global batch. ``train_parts="generation"``
    # retrains only the generation branch of an ``--init`` stage-2 model: its ids stay exactly the same.
    # The image decoder's ``train_parts="coarse"`` trains a new coarse head on an ``--init`` decoder's UNet.
    generation_loss: str = "mse"
    generation_contrastive_weight: float = 0.0
    train_parts: str = "all"
    # per-parameter learning-rate multipliers: {substring of a parameter name: factor}, the first match wins
    # (e.g. the LM's {"lora_": 0.2}: the adapter moves slower than the new token rows, so the base language
    # drifts less while the image rows still learn fast)
    lr_scales: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def read_run_file(path: Path, what: str = "preset name or config") -> dict[str, Any]:
    """A run config file, JSON or YAML, as a dict with a ``model`` entry (``what`` it may be, for the error)."""
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is one clear message
        raise ConfigError(f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError(f"{path} needs a 'model' entry ({what})")
    return data


def with_overrides(base: TrainConfig, train: dict[str, Any]) -> TrainConfig:
    """``base`` with the fields a run file's ``train`` section sets (its keys are validated)."""
    overrides = TrainConfig.from_dict(train)
    return replace(base, **{k: getattr(overrides, k) for k in train})


class Task(Protocol):
    """One training stage."""

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (frozen parts stay in eval: no dropout where nothing learns)."""

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...


class BatchOrder:
    """Which samples make the global batch at stream position ``position`` (samples seen so far).

    The stream is a sequence of epochs; epoch e is a permutation of the dataset seeded by (seed, e), of which
    the first ``epoch_samples`` are used (by default the largest multiple of the global batch: the last
    partial batch is dropped, as before). The global batch at ``position`` is the next ``batch_size *
    world_size`` samples of the stream, rank r taking slice r. Resuming at a position replays exactly what an
    uninterrupted run sees from there on; resuming with another world size (``epoch_samples`` kept from the
    first run, see Trainer) continues the same stream without gaps or repeats -- a batch may then straddle
    an epoch boundary."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 epoch_samples: int | None = None):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ConfigError(f"dataset has {num_samples} samples, fewer than one batch ({global_batch})")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.global_batch = rank, world_size, global_batch
        self.epoch_samples = epoch_samples or (num_samples // global_batch) * global_batch
        if not 0 < self.epoch_samples <= num_samples:
            raise ConfigError(f"epoch_samples {self.epoch_samples} out of range for {num_samples} samples")
        self._epoch, self._order = -1, None

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_samples // self.global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:  # consecutive batches share an epoch: one permutation per epoch
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_samples, generator=generator)
        return self._order

    def indices_at(self, position: int) -> list[int]:
        start = position + self.rank * self.batch_size
        out: list[int] = []
        for p in range(start, start + self.batch_size):
            epoch, offset = divmod(p, self.epoch_samples)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def indices(self, step: int) -> list[int]:
        """The batch of ``step`` for a run that kept this world size throughout."""
        return self.indices_at(step * self.global_batch)


def process_state():
    """accelerate's view of this process (rank, world size, device), the same one the Trainer's Accelerator
    gets. On a machine without CUDA it must be asked for CPU explicitly, or a ``torchrun`` launch on CPUs
    (gloo) would look like one process."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def parameter_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float, lr: float | None = None,
                     lr_scales: dict[str, float] | None = None) -> list[dict]:
    """LAVIS's rule: no weight decay on biases, norms and parameters with fewer than 2 dimensions. With
    ``lr_scales`` ({name substring: factor}, first match wins), parameters are also grouped by their learning
    rate ``lr * factor``; the decay group and the no-decay group at factor 1 always come first."""
    lr_scales = lr_scales or {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for name, param in named:
        skip = param.ndim < 2 or "bias" in name or "norm" in name.lower() or "ln_" in name
        scale = next((float(f) for key, f in lr_scales.items() if key in name), 1.0)
        groups.setdefault((not skip, scale), []).append(param)
    out = []
    for (decay, scale), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if lr is not None:
            group["lr"] = lr * scale
        elif scale != 1.0:
            raise ValueError("lr_scales needs the base lr")
        out.append(group)
    return out


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at ``step``: linear warm-up from warmup_start_lr, then cosine to min_lr at
    ``schedule_steps`` (default: ``steps``)."""
    if step < cfg.warmup_steps:
        start = cfg.warmup_start_lr / cfg.lr
        return start + (1.0 - start) * step / cfg.warmup_steps
    span = max(1, (cfg.schedule_steps or cfg.steps) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    out_dir: Path
    history: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the CLI; a resumed run that was already finished trained nothing and has no loss."""
        if math.isnan(self.final_loss):
            return f"the run had already finished its {self.steps} steps"
        return f"trained {self.steps} steps in {self.seconds / 60:.1f} min, final loss {self.final_loss:.4f}"


def _forget_other_precision(mixed: str) -> None:
    """Let one process train twice with different precisions (a notebook, a test session).

    accelerate keeps one process-wide ``AcceleratorState`` and refuses a second ``Accelerator`` with another
    ``mixed_precision``; in a single process nothing else holds that state, so it is cleared. Launched
    multi-process runs (``WORLD_SIZE`` > 1) keep it: there the launcher set it up and one run owns the process.
    """
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and held != mixed and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()


def auto_mixed_precision() -> str:
    """"bf16" where the hardware computes in it natively (a CUDA GPU that supports it; a CPU with AMX or
    AVX512-BF16), else "no". Why the CPU check: autocast to bf16 on a CPU without those units is emulated, and a
    tiny-decoder training step there (AMD EPYC, AVX2) took 66 s instead of 3 s in fp32, where on a CPU with
    AMX bf16 is ~3x faster than fp32."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 arithmetic units (AMX-BF16 or AVX512-BF16), from /proc/cpuinfo's flags
    (False where that file is missing: other systems train in fp32 unless told otherwise)."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class Trainer:
    """Runs a Task on a dataset for ``cfg.steps`` steps. The dataset is map-style (``len`` + ``batch(indices,
    step) -> dict of tensors``: exact resume) or streaming (``stream(batch_size, rank, world_size, seed,
    start) -> iterator of batch dicts``: approximate resume, see `seedtok.data.stream`)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, task: Task, dataset, out_dir: str | os.PathLike,
                 progress: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        self.cfg, self.model, self.task, self.dataset = cfg, model, task, dataset
        self.out_dir = Path(out_dir)
        self.progress = progress
        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = auto_mixed_precision()
        _forget_other_precision(mixed)
        self.accelerator = acc = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        self.world_size, self.rank = acc.num_processes, acc.process_index
        torch.manual_seed(cfg.seed)  # dropout draws from the global RNG: start every run from the same state
        named = task.trainable_parameters(model)
        for param in model.parameters():
            param.requires_grad_(False)
        for _, param in named:
            param.requires_grad_(True)
        self.model = model.to(acc.device)
        # FSDP / DeepSpeed own the model (sharding, their own gradient reduction); only tasks whose whole
        # forward is model(...) can be wrapped. Everything else trains as below.
        self.wrapped = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        asked = [n for n in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{n}", "").lower() == "true"]
        if asked and not self.wrapped:  # accelerate turns FSDP / DeepSpeed on for accelerator devices only
            import warnings

            warnings.warn(f"the launch config asks for {asked[0]}, but accelerate runs {acc.distributed_type} on "
                          f"{acc.device}: training data-parallel instead", stacklevel=2)
        if self.wrapped and not getattr(task, "wraps_model", False):
            raise ConfigError(f"{type(task).__name__} trains data-parallel only (its loss calls parts of the "
                              f"model); launch it with configs/accelerate/ddp.yaml, not {acc.distributed_type}")
        schedule = lambda step: lr_factor(step, cfg)  # noqa: E731
        groups_of = lambda named: parameter_groups(named, cfg.weight_decay, cfg.lr, cfg.lr_scales)  # noqa: E731
        if not self.wrapped:
            # The model is not wrapped in DDP: tasks call its parts (vision, qformer, ...) directly, which DDP's
            # forward hooks would not see. DDP's two duties are done explicitly: broadcast rank 0's initial
            # weights (here) and average gradients (_average_gradients).
            self._broadcast(p for _, p in named)
            self.engine = self.model
            optimizer = torch.optim.AdamW(groups_of(named), lr=cfg.lr, betas=cfg.betas)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            self.optimizer, self.scheduler = acc.prepare(optimizer, scheduler)
        elif acc.distributed_type == DistributedType.FSDP:
            # FSDP: wrap first, then build the optimizer on the wrapped (flattened) parameters
            self.engine = acc.prepare(self.model)
            named = [(n, p) for n, p in self.engine.named_parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(groups_of(named), lr=cfg.lr, betas=cfg.betas)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            self.optimizer, self.scheduler = acc.prepare(optimizer, scheduler)
        else:  # DeepSpeed: model, optimizer and scheduler go in together
            # no DataLoader is prepared (the Trainer draws its own batches), so DeepSpeed learns the
            # per-GPU batch here instead
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
            # DeepSpeed drops empty parameter groups from the optimizer; the scheduler, made before, would keep
            # one lr per group and fail at its first step (e.g. LoRA + new rows: no <2-d parameter trains)
            groups = [g for g in groups_of(named) if g["params"]]
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            self.engine, self.optimizer, self.scheduler = acc.prepare(self.model, optimizer, scheduler)
        self.trainable = [p for _, p in named]
        self.streaming = hasattr(dataset, "stream")
        self.order = None if self.streaming else BatchOrder(len(dataset), cfg.batch_size, cfg.seed, self.rank,
                                                            self.world_size)
        self.step, self.samples_seen, self.corrupt_skipped = 0, 0, 0
        self._batches = None

    # ------------------------------------------------------------------------------------------ state
    def resume(self) -> bool:
        """Load the latest checkpoint in out_dir, if any. Returns whether one was found. The run may resume
        on another number of processes: the data continue from the samples seen (the per-rank batch size is
        the config's, so the global batch changes with the world size)."""
        folder = latest_checkpoint(self.out_dir)
        if folder is None:
            return False
        from safetensors.torch import load_file

        model = self.model
        # wrapped: the weights come with the engine state below (FSDP: the module is sharded)
        if not self.wrapped and hasattr(model, "load_checkpoint"):  # own folder layout (the image decoder)
            model.load_checkpoint(folder / "model")
        elif not self.wrapped:
            try:
                weights = load_file(str(folder / "model" / "model.safetensors"))
            except Exception as exc:  # noqa: BLE001 - a missing or truncated file is one clear error
                raise CheckpointError(f"cannot read the weights of checkpoint {folder}: {exc}") from None
            model.load_state_dict_checked(weights)
        try:
            state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable state is one clear error
            raise CheckpointError(f"cannot read trainer state in {folder}: {exc}") from None
        if self.wrapped:  # the engine's own model, optimizer and scheduler state, written by every rank
            self.accelerator.load_state(str(folder / "engine"))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        old_world = int(state.get("world_size", 1))
        # checkpoints from before samples were counted: the position is step x the global batch of then
        self.samples_seen = int(state.get("samples_seen", self.step * self.cfg.batch_size * old_world))
        self.corrupt_skipped = int(state.get("corrupt_skipped", 0))
        if self.order is not None:
            # the epoch length of the first run keeps the stream the same under another world size
            epoch_samples = int(state.get("epoch_samples", 0)) or None
            if epoch_samples is None and old_world != self.world_size:
                epoch_samples = (len(self.dataset) // (self.cfg.batch_size * old_world)) * self.cfg.batch_size * old_world
            self.order = BatchOrder(len(self.dataset), self.cfg.batch_size, self.cfg.seed, self.rank,
                                    self.world_size, epoch_samples)
        self._batches = None
        return True

    def _state(self) -> dict:
        state = {"step": self.step, "samples_seen": self.samples_seen, "world_size": self.world_size,
                 "corrupt_skipped": self.corrupt_skipped, "rng": torch.get_rng_state(),
                 "train_config": json.dumps(asdict(self.cfg))}
        if self.order is not None:
            state["epoch_samples"] = self.order.epoch_samples
        if not self.wrapped:
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def save_checkpoint(self) -> Path | None:
        """Write ckpt-<step>/ under a temp name, rename it, then point ``latest`` at it (atomic replace).
        A kill at any moment leaves the previous checkpoint intact and pointed to. Rank 0 writes; with an
        FSDP / DeepSpeed engine every rank first writes its shard of the engine state into the temp folder."""
        acc = self.accelerator
        final = self.out_dir / f"ckpt-{self.step:07d}"
        tmp = self.out_dir / f".tmp-ckpt-{self.step:07d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        state_dict = None
        if self.wrapped:
            acc.save_state(str(tmp / "engine"))  # collective: every rank writes its part
            state_dict = acc.get_state_dict(self.engine)  # collective: the full weights, on rank 0
        acc.wait_for_everyone()
        if acc.is_main_process:
            try:
                if state_dict is not None and hasattr(self.model, "save_pretrained_from"):
                    self.model.save_pretrained_from(state_dict, tmp / "model")
                else:
                    self.model.save_pretrained(tmp / "model")
                torch.save(self._state(), tmp / STATE_NAME)
            except BaseException:  # interrupted (Ctrl-C, SIGTERM via the CLI) or failed: no half-written folder
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(self.out_dir / LATEST, final.name)
            for old in sorted(self.out_dir.glob("ckpt-*"))[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()  # no rank runs ahead (and e.g. resumes) before the checkpoint is complete
        return final if acc.is_main_process else None

    def save_model(self, folder: str | os.PathLike) -> None:
        """The trained weights as ``model.save_pretrained`` writes them, on rank 0. Collective: under FSDP /
        DeepSpeed every rank takes part in gathering the full weights."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.engine) if self.wrapped else None
        if acc.is_main_process:
            if state_dict is not None and hasattr(self.model, "save_pretrained_from"):
                self.model.save_pretrained_from(state_dict, folder)
            else:
                self.model.save_pretrained(folder)
        acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------ collectives
    def _broadcast(self, params) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for param in params:
                dist.broadcast(param.data, src=0)

    def _average_gradients(self, bucket_bytes: int = 25 * 2**20) -> None:
        """All-reduce the gradients in buckets of ~25 MB (DDP's default): one collective per bucket, not
        per parameter."""
        if self.world_size == 1 or self.wrapped:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for param in self.trainable:
            if param.grad is None:  # a part unused this step still takes part in the collective
                param.grad = torch.zeros_like(param)
        buckets: dict[tuple, list[list[torch.Tensor]]] = {}
        for param in self.trainable:
            key = (param.grad.dtype, param.grad.device)
            group = buckets.setdefault(key, [[]])
            if group[-1] and sum(g.numel() * g.element_size() for g in group[-1]) >= bucket_bytes:
                group.append([])
            group[-1].append(param.grad)
        for groups in buckets.values():
            for grads in groups:
                flat = _flatten_dense_tensors(grads)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat.div_(self.world_size)
                for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                    grad.copy_(synced)

    def _reduce_metrics(self, metrics: dict) -> dict:
        """Numbers averaged over ranks (the same keys on every rank); anything else as rank 0 has it."""
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.world_size == 1 or not numeric:
            return metrics
        values = torch.tensor(list(numeric.values()), dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return {**metrics, **dict(zip(numeric, values.tolist()))}

    def _sum_over_ranks(self, value: int) -> int:
        if self.world_size == 1:
            return value
        total = self.accelerator.reduce(torch.tensor([value], dtype=torch.float64, device=self.accelerator.device),
                                        reduction="sum")
        return int(total.item())

    def ranks_in_sync(self) -> bool:
        """Whether every rank holds bit-identical trainable weights (a digest per rank, gathered). True with
        one process, and with FSDP / DeepSpeed (sharded: nothing to compare)."""
        if self.world_size == 1 or self.wrapped:
            return True
        import hashlib

        digest = hashlib.sha256()
        for param in self.trainable:
            digest.update(param.detach().float().cpu().numpy().tobytes())
        value = int.from_bytes(digest.digest()[:7], "little")  # fits in int64 exactly
        gathered = self.accelerator.gather(torch.tensor([value], dtype=torch.int64, device=self.accelerator.device))
        return bool((gathered == gathered[0]).all())

    # ------------------------------------------------------------------------------------------- loop
    def _next_batch(self) -> dict:
        if self.streaming:
            if self._batches is None:
                self._batches = iter(self.dataset.stream(self.cfg.batch_size, self.rank, self.world_size,
                                                         self.cfg.seed, self.samples_seen))
            batch = dict(next(self._batches))
            corrupt = batch.pop("corrupt", 0)
            self._corrupt_local += int(corrupt)
            return batch
        return self.dataset.batch(self.order.indices_at(self.samples_seen), self.step)

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to cfg.steps (or stop early after ``stop_after`` more steps, for tests)."""
        cfg, acc = self.cfg, self.accelerator
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / "log.jsonl"
        bar = None
        if self.progress and acc.is_main_process:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        start, seen, history, loss_value = time.time(), 0, [], float("nan")
        self._corrupt_local = 0
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        self.task.train_mode(self.model)
        while self.step < end:
            batch = self._next_batch()
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with acc.autocast():
                loss, metrics = self.task.loss(self.engine, batch)
            self.optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            self._average_gradients()
            if cfg.grad_clip:
                acc.clip_grad_norm_(self.engine.parameters() if self.wrapped else self.trainable, cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.samples_seen += cfg.batch_size * self.world_size
            seen += cfg.batch_size * self.world_size
            loss_value = acc.reduce(loss.detach().float(), reduction="mean").item()
            rate = seen / max(1e-9, time.time() - start)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{rate:.1f}")
            checkpoint = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
            if self.step % cfg.log_every == 0 or self.step == end or checkpoint:
                record = {"step": self.step, "loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
                          "samples_per_s": rate, "samples_seen": self.samples_seen, **self._reduce_metrics(metrics)}
                if self.streaming:
                    record["corrupt_skipped"] = self.corrupt_skipped + self._sum_over_ranks(self._corrupt_local)
                if checkpoint and self.world_size > 1:
                    record["ranks_in_sync"] = self.ranks_in_sync()
                history.append(record)
                if acc.is_main_process:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                if record.get("ranks_in_sync") is False:
                    raise CheckpointError(f"step {self.step}: the ranks' weights differ (a collective was missed "
                                          f"or a rank computed differently); not writing a checkpoint")
            if checkpoint:
                if self.streaming:  # the running total goes into the checkpoint
                    self.corrupt_skipped += self._sum_over_ranks(self._corrupt_local)
                    self._corrupt_local = 0
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        self.model.eval()
        return TrainResult(steps=self.step, final_loss=loss_value, seconds=time.time() - start,
                           out_dir=self.out_dir, history=history)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    pointer = Path(out_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = Path(out_dir) / pointer.read_text().strip()
    if not (folder / STATE_NAME).is_file():
        raise CheckpointError(f"{pointer} points to {folder}, which is not a complete checkpoint")
    return folder
