"""The one training loop every stage shares, on accelerate.

AdamW with LAVIS's weight-decay exclusions (no decay on biases, norms and other <2-d parameters), linear
warm-up then cosine decay, gradient clipping, mixed precision where the device has it, a progress bar with
loss and samples/s, JSONL logs, atomic periodic checkpoints, and ``resume`` that continues exactly: the data
order is a pure function of (seed, step), and the optimizer, scheduler and RNG state are restored.

A stage is a ``Task``: which parameters train, how a batch becomes a loss.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
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
    batch_size: int = 64
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    mixed_precision: str = "auto"  # "auto": bf16 on a GPU that has it, else fp32; or "no" / "bf16" / "fp16"
    checkpoint_every: int = 200
    keep_checkpoints: int = 1
    log_every: int = 10
    seed: int = 0
    # data
    data: str = "emoji:train:20000"  # see seedtok.data.open_source
    cache_features: bool = False  # run the frozen image backbone once per image and keep its output
    augment: bool = False  # SPEC stage 1: RandomResizedCrop(scale 0.5-1) + horizontal flip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class Task(Protocol):
    """One training stage."""

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (frozen parts stay in eval: no dropout where nothing learns)."""

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...


class BatchOrder:
    """Which samples make batch ``step``: epoch-wise permutations seeded by (seed, epoch), cut into
    ``batch_size`` slices (last partial slice dropped), each rank taking its own share. Resuming at step s
    replays exactly the batches an uninterrupted run sees from s on."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ConfigError(f"dataset has {num_samples} samples, fewer than one batch ({global_batch})")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_samples // global_batch

    def indices(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.batches_per_epoch)
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        start = position * self.batch_size * self.world_size + self.rank * self.batch_size
        return order[start:start + self.batch_size].tolist()


def parameter_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """LAVIS's rule: no weight decay on biases, norms and parameters with fewer than 2 dimensions."""
    decay, no_decay = [], []
    for name, param in named:
        skip = param.ndim < 2 or "bias" in name or "norm" in name.lower() or "ln_" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at ``step``: linear warm-up from warmup_start_lr, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        start = cfg.warmup_start_lr / cfg.lr
        return start + (1.0 - start) * step / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
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


class Trainer:
    """Runs a Task on a dataset (``len`` + ``batch(indices) -> dict of tensors``) for ``cfg.steps`` steps."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, task: Task, dataset, out_dir: str | os.PathLike,
                 progress: bool = True):
        from accelerate import Accelerator

        self.cfg, self.model, self.task, self.dataset = cfg, model, task, dataset
        self.out_dir = Path(out_dir)
        self.progress = progress
        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
        torch.manual_seed(cfg.seed)  # dropout draws from the global RNG: start every run from the same state
        named = task.trainable_parameters(model)
        for param in model.parameters():
            param.requires_grad_(False)
        for _, param in named:
            param.requires_grad_(True)
        self.trainable = [p for _, p in named]
        optimizer = torch.optim.AdamW(parameter_groups(named, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
        # The model is not wrapped in DDP: tasks call its parts (vision, qformer, ...) directly, which DDP's
        # forward hooks would not see. Gradients are averaged across processes explicitly instead.
        self.model = model.to(self.accelerator.device)
        self.optimizer, self.scheduler = self.accelerator.prepare(optimizer, scheduler)
        self.order = BatchOrder(len(dataset), cfg.batch_size, cfg.seed, self.accelerator.process_index,
                                self.accelerator.num_processes)
        self.step = 0

    # ------------------------------------------------------------------------------------------ state
    def resume(self) -> bool:
        """Load the latest checkpoint in out_dir, if any. Returns whether one was found."""
        folder = latest_checkpoint(self.out_dir)
        if folder is None:
            return False
        from safetensors.torch import load_file

        model = self.model
        if hasattr(model, "load_checkpoint"):  # a model with its own folder layout (the image decoder)
            model.load_checkpoint(folder / "model")
        else:
            model.load_state_dict_checked(load_file(str(folder / "model" / "model.safetensors")))
        try:
            state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable state is one clear error
            raise CheckpointError(f"cannot read trainer state in {folder}: {exc}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        return True

    def save_checkpoint(self) -> Path | None:
        """Write ckpt-<step>/ under a temp name, rename it, then point ``latest`` at it (atomic replace).
        A kill at any moment leaves the previous checkpoint intact and pointed to."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        final = self.out_dir / f"ckpt-{self.step:07d}"
        tmp = self.out_dir / f".tmp-ckpt-{self.step:07d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp / "model")
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                    "train_config": json.dumps(asdict(self.cfg))}, tmp / STATE_NAME)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(self.out_dir / LATEST, final.name)
        for old in sorted(self.out_dir.glob("ckpt-*"))[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _average_gradients(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        import torch.distributed as dist

        for param in self.trainable:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(self.accelerator.num_processes)

    # ------------------------------------------------------------------------------------------- loop
    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to cfg.steps (or stop early after ``stop_after`` more steps, for tests)."""
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / "log.jsonl"
        bar = None
        if self.progress and self.accelerator.is_main_process:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        start, seen, history, loss_value = time.time(), 0, [], float("nan")
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        self.task.train_mode(self.model)
        while self.step < end:
            batch = self.dataset.batch(self.order.indices(self.step), self.step)
            batch = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with self.accelerator.autocast():
                loss, metrics = self.task.loss(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            self._average_gradients()
            if cfg.grad_clip:
                self.accelerator.clip_grad_norm_(self.trainable, cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            seen += cfg.batch_size * self.accelerator.num_processes
            loss_value = self.accelerator.reduce(loss.detach(), reduction="mean").item()
            rate = seen / max(1e-9, time.time() - start)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{rate:.1f}")
            if self.step % cfg.log_every == 0 or self.step == end:
                record = {"step": self.step, "loss": loss_value, "lr": self.scheduler.get_last_lr()[0],
                          "samples_per_s": rate, **metrics}
                history.append(record)
                if self.accelerator.is_main_process:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
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
