"""One rank of the distributed tests (tests/test_distributed.py), launched by torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py tokenizer OUT

``tokenizer``: (1) the contrastive loss with negatives gathered from both ranks against the single-process
loss on the same global batch, gradients included; (2) tokenizer stage 1 through the CLI entry
(``seedtok train tokenizer``, the command docs/scaling.md scales up), recording which samples each rank
draws; every rank then saves its trainable weights. Results go to OUT/result-RANK.json.

``fsdp`` / ``deepspeed``, launched by ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (or
deepspeed-zero2.yaml): the LM stage through the CLI entry (``seedtok train lm``), first as accelerate runs it
on CPUs (data-parallel, with a warning), then on accelerate's engine (`engine_on_cpu`), then resumed from that
run's middle checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def contrastive_check(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from seedtok.train.tokenizer import contrastive_loss

    per_rank, dim = 4, 16
    g = torch.Generator().manual_seed(0)  # the same global batch on every rank
    images = F.normalize(torch.randn(per_rank * world, dim, generator=g), dim=-1)
    texts = F.normalize(torch.randn(per_rank * world, dim, generator=g), dim=-1)
    temp = torch.tensor(0.07)
    # single process, whole global batch
    gi, gt = images.clone().requires_grad_(), texts.clone().requires_grad_()
    # (contrastive_loss gathers whenever a process group exists: the one-process reference is written out)
    logits = gi @ gt.t() / temp
    labels = torch.arange(len(gi))
    single = (F.cross_entropy(logits, labels, label_smoothing=0.1)
              + F.cross_entropy(logits.t(), labels, label_smoothing=0.1)) / 2
    single.backward()
    # distributed: each rank its slice; the Trainer averages losses and gradients over ranks
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    li, lt = images[part].clone().requires_grad_(), texts[part].clone().requires_grad_()
    local = contrastive_loss(li, lt, temp, rank)
    local.backward()
    mean = local.detach().clone()
    dist.all_reduce(mean)
    mean /= world
    grad_err = max((li.grad / world - gi.grad[part]).abs().max().item(),
                   (lt.grad / world - gt.grad[part]).abs().max().item())
    return {"loss_distributed": mean.item(), "loss_single": single.item(), "grad_err": grad_err}


def tokenizer(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from seedtok.cli import main
    from seedtok.train import data as train_data

    from seedtok.train.loop import process_state

    state = process_state()
    rank, world = state.process_index, state.num_processes
    result = {"rank": rank, "world": world, "contrastive": contrastive_check(rank, world)}
    drawn: list[list[int]] = []
    original = train_data.TokenizerData.batch

    def recording(self, indices, step=0):
        drawn.append(list(indices))
        return original(self, indices, step)

    train_data.TokenizerData.batch = recording
    run = out / "run"
    code = main(["train", "tokenizer", "--stage", "1", "--config", "micro", "--out", str(run), "--steps", "4"])
    result["exit"] = code
    result["drawn"] = drawn
    # every rank's own weights: the ones its trainer ended with
    weights = {k: v.contiguous() for k, v in _last_model.state_dict().items()} if _last_model else {}
    save_file(weights, str(out / f"weights-{rank}.safetensors"))
    (out / f"result-{rank}.json").write_text(json.dumps(result))
    dist.barrier()


def engine_on_cpu(kind: str) -> None:
    """Have every Accelerator made from now on run accelerate's FSDP (``kind`` "fsdp") or DeepSpeed
    ("deepspeed") engine on this CPU process group, with the launch config's plugin.

    accelerate enables both for accelerator devices only (``AcceleratorState``: MULTI_CPU never becomes FSDP
    or DEEPSPEED), so here the state is set by hand, as accelerate sets it on GPUs. The device is ``cpu``,
    not accelerate's ``cpu:0`` (FSDP1: "Inconsistent compute device and `device_id` on rank 0: cpu vs
    cpu:0"). FSDP1 needs two more CPU-only adjustments, since it assumes a GPU:
    * full model state dicts (accelerate gathers them with offload_to_cpu=True): FSDP1's ``to_cpu`` is
      skipped for weights already on the CPU, where it frees their storage and the gather then reads freed
      memory (a SIGSEGV, or rank 0's shards in the saved weights), pytorch/pytorch#188989;
    * full optimizer state dicts are gathered without offload_to_cpu: FSDP1 then skips its copy, trusting
      ``.cpu()`` to make one, which on a CPU returns the gather buffer that the next state fills (the saved
      ``exp_avg`` held ``exp_avg_sq``).
    DeepSpeed picks its own CPU accelerator (gloo) when there is no GPU."""
    import contextlib
    import os

    import accelerate
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    original_init = accelerate.Accelerator.__init__
    wanted = {"fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}[kind]

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        state = self.state
        if state.distributed_type != DistributedType.MULTI_CPU:
            return
        assert os.environ.get(f"ACCELERATE_USE_{wanted.name}") == "true", f"launch with a {kind} config"
        for shared in (state._shared_state, PartialState._shared_state):  # later states copy these
            shared.update(distributed_type=wanted, device=torch.device("cpu"))
        if kind == "fsdp":
            from torch.distributed.fsdp import FullOptimStateDictConfig

            state.fsdp_plugin = FullyShardedDataParallelPlugin(  # the rest from the launch config
                optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True))
        else:
            plugin = DeepSpeedPlugin()  # from the launch config
            plugin.set_mixed_precision(state._mixed_precision)
            plugin.select(_from_accelerator_state=True)
            state.deepspeed_plugins = plugin

    accelerate.Accelerator.__init__ = init
    if kind == "fsdp":
        from torch.distributed.fsdp._flat_param import FlatParamHandle

        original_to_cpu = FlatParamHandle.to_cpu

        def to_cpu(self):
            if self.flat_param.device.type == "cpu":
                return contextlib.nullcontext()
            return original_to_cpu(self)

        FlatParamHandle.to_cpu = to_cpu


def engine_runs(kind: str, out: Path) -> None:
    """``seedtok train lm`` under the FSDP or DeepSpeed launch config: as accelerate runs it on CPUs
    (data-parallel: OUT/ddp), then on the engine (OUT/KIND), then resumed from that run's step-2 checkpoint
    (OUT/resumed). OUT holds lm.yaml and ids/."""
    import shutil
    import warnings

    import torch.distributed as dist

    from seedtok.cli import main
    from seedtok.train.loop import process_state

    rank = process_state().process_index
    args = ["train", "lm", "--config", str(out / "lm.yaml"), "--data", str(out / "ids")]
    result = {}

    def run(name, *extra):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main([*args, "--out", str(out / name), *extra])
        engine = _last_trainer.engine
        result[name] = {"exit": code, "distributed_type": str(_last_trainer.accelerator.distributed_type),
                        "engine": type(engine).__name__,
                        "fsdp_units": sum(type(m).__name__ == "FullyShardedDataParallel" for m in engine.modules()),
                        "warnings": [str(w.message) for w in caught if "launch config asks" in str(w.message)]}

    run("ddp")  # what accelerate does with the config on CPUs
    engine_on_cpu(kind)
    run(kind)
    # the run as if stopped after its step-2 checkpoint, then resumed
    resumed = out / "resumed"
    if rank == 0:
        shutil.copytree(out / kind, resumed)
        shutil.rmtree(resumed / "final")
        shutil.rmtree(resumed / "ckpt-0000004")
        (resumed / "latest").write_text("ckpt-0000002")
        log = (resumed / "log.jsonl").read_text().splitlines()
        (resumed / "log.jsonl").write_text("\n".join(log[:2]) + "\n")
    dist.barrier()
    run("resumed", "--resume")
    (out / f"result-{rank}.json").write_text(json.dumps(result))
    dist.barrier()


_last_model = None
_last_trainer = None


def _capture_model() -> None:
    """Keep a handle on the model and trainer each rank trains (the CLI does not return them)."""
    from seedtok.train import loop

    original = loop.Trainer.__init__

    def init(self, cfg, model, *args, **kwargs):
        global _last_model, _last_trainer
        _last_model, _last_trainer = model, self
        original(self, cfg, model, *args, **kwargs)

    loop.Trainer.__init__ = init


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    _capture_model()
    if mode in ("fsdp", "deepspeed"):
        engine_runs(mode, folder)
    else:
        {"tokenizer": tokenizer}[mode](folder)