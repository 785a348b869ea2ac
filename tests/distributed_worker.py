"""One rank of the distributed tests (tests/test_distributed.py), launched by torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py tokenizer OUT

``tokenizer``: (1) the contrastive loss with negatives gathered from both ranks against the single-process
loss on the same global batch, gradients included; (2) tokenizer stage 1 through the CLI entry
(``seedtok train tokenizer``, the command docs/scaling.md scales up), recording which samples each rank
draws; every rank then saves its trainable weights. Results go to OUT/result-RANK.json.
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


_last_model = None


def _capture_model() -> None:
    """Keep a handle on the model each rank trains (the CLI does not return it)."""
    from seedtok.train import loop

    original = loop.Trainer.__init__

    def init(self, cfg, model, *args, **kwargs):
        global _last_model
        _last_model = model
        original(self, cfg, model, *args, **kwargs)

    loop.Trainer.__init__ = init


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    _capture_model()
    {"tokenizer": tokenizer}[mode](folder)
