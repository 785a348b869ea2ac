"""Distributed training on CPU: 2 processes, gloo, launched with torchrun exactly as docs/scaling.md does on a
cluster (there: more processes per node, more nodes, the paper configs). Marker ``distributed``."""

import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from seedtok.data.sources import open_source
from seedtok.data.stream import ShardStream, loader
from seedtok.train.loop import BatchOrder

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd, timeout) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*map(str, cmd)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def torchrun(*args, timeout=240) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGS`` on CPU (one thread per process)."""
    return _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", _free_port(), *args], timeout)


def accelerate_launch(config, *args, timeout=240) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file CONFIG --num_processes 2 ARGS`` on CPU, fp32."""
    return _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", ROOT / config,
                    "--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
                    "--main_process_port", _free_port(), *args], timeout)


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_stage1_on_two_ranks(tmp_path):
    torchrun("tests/distributed_worker.py", "tokenizer", tmp_path)
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2] and all(r["exit"] == 0 for r in results)
    # gathered negatives: the same loss and gradients as one process on the whole global batch
    for r in results:
        c = r["contrastive"]
        assert abs(c["loss_distributed"] - c["loss_single"]) < 1e-5 and c["grad_err"] < 1e-5, c
    # one epoch (64 samples, 4 steps x 2 ranks x 8): every sample exactly once over both ranks
    drawn = [i for r in results for batch in r["drawn"] for i in batch]
    assert sorted(drawn) == list(range(64))
    # identical weights on both ranks, and the same as what rank 0 saved
    a, b = (load_file(str(tmp_path / f"weights-{r}.safetensors")) for r in range(2))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    run = tmp_path / "run"
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 4 and logs[-1]["samples_seen"] == 64 and logs[-1]["ranks_in_sync"] is True
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-0000004", "final", "latest", "log.jsonl"]  # no temp
    saved = load_file(str(run / "final" / "model.safetensors"))
    assert torch.equal(saved["qformer.query_tokens"], a["qformer.query_tokens"])

    # resume on another world size (here 1): the data continue from the samples seen, not the step
    from seedtok import SeedTokenizer, preset
    from seedtok.train import load_run_config
    from seedtok.train.data import TokenizerData
    from seedtok.train.loop import Trainer
    from seedtok.train.tokenizer import Stage1

    _, cfg = load_run_config("micro", 1)
    model = SeedTokenizer(preset("micro"))
    data = TokenizerData(model, open_source(cfg.data), 1, cfg.data, progress=False)
    trainer = Trainer(cfg, model, Stage1(), data, run, progress=False)
    assert trainer.resume() and trainer.step == 4 and trainer.samples_seen == 64
    two_ranks_next = [BatchOrder(64, 8, cfg.seed, rank=r, world_size=2).indices(4) for r in range(2)]
    assert trainer.order.indices_at(64) == two_ranks_next[0]  # one rank takes the stream where two left it
    assert trainer.order.indices_at(72) == two_ranks_next[1]
    trainer.fit(stop_after=1)
    assert trainer.step == 5 and trainer.samples_seen == 72


def test_batch_order_is_defined_by_samples_seen():
    # world sizes 2 then 1 (after 3 global batches) give the same stream as world size 1 throughout
    one = BatchOrder(40, 4, seed=1, epoch_samples=32)
    stream = [i for p in range(0, 96, 4) for i in one.indices_at(p)]
    two = [BatchOrder(40, 2, seed=1, rank=r, world_size=2, epoch_samples=32) for r in range(2)]
    mixed = [i for p in range(0, 12, 4) for r in two for i in r.indices_at(p)]
    mixed += [i for p in range(12, 96, 4) for i in one.indices_at(p)]
    assert mixed == stream
    assert sorted(stream[:32]) == sorted(set(stream[:32])) and len(set(stream[32:64])) == 32


# ------------------------------------------------------------------------------------------ LM
def test_lm_stage_on_two_ranks_via_the_cli(tmp_path, micro):
    from seedtok.data.ids import extract_ids
    from test_lm import lm_config, make_base  # noqa: E402 - tests folder on sys.path

    base = make_base("llama", tmp_path / "llama")
    ids = tmp_path / "ids"
    extract_ids(micro, open_source("emoji:train:16"), ids, shard_size=8, progress=False)
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(lm_config(base)).items()}
    config = tmp_path / "lm.yaml"
    config.write_text(yaml.safe_dump({"model": model, "train": {
        "steps": 4, "batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "weight_decay": 0.0,
        "betas": [0.9, 0.95], "checkpoint_every": 2, "log_every": 1, "mixed_precision": "no",
        "gradient_checkpointing": True}}))
    proc = torchrun("-m", "seedtok.cli", "train", "lm", "--config", config, "--data", ids, "--out",
                    tmp_path / "run")
    assert proc.stdout.count("trained 4 steps") == 2
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and logs[-1]["samples_seen"] == 32
    assert [r.get("ranks_in_sync") for r in logs] == [None, True, None, True]
    from seedtok.models.lm import SeedLM

    SeedLM.from_pretrained(tmp_path / "run" / "final")


def _lm_stage_under_engine(tmp_path, micro, kind, config, *launch_args):
    """configs/accelerate/CONFIG with the LM stage on 2 CPU processes. accelerate runs FSDP / DeepSpeed configs
    on CPUs as plain data-parallel (the Trainer warns); the worker then puts accelerate's engine on the CPU
    process group (distributed_worker.engine_on_cpu) to run the Trainer's engine path: wrapping the LoRA model,
    the optimizer on the engine's parameters, gathered checkpoints, the engine state and --resume. Returns
    each rank's result (tests/distributed_worker.py: engine_runs)."""
    from seedtok.data.ids import extract_ids
    from seedtok.models.lm import SeedLM
    from test_lm import lm_config, make_base  # noqa: E402 - tests folder on sys.path

    base = make_base("llama", tmp_path / "llama")
    extract_ids(micro, open_source("emoji:train:16"), tmp_path / "ids", shard_size=8, progress=False)
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(lm_config(base)).items()}
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump({"model": model, "train": {
        "steps": 4, "batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "weight_decay": 0.0,
        "betas": [0.9, 0.95], "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1,
        "mixed_precision": "no", "gradient_checkpointing": True}}))  # as configs/seed-llama-8b-lm.yaml
    accelerate_launch(f"configs/accelerate/{config}", *launch_args, "tests/distributed_worker.py", kind, tmp_path)
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert all(run["exit"] == 0 for run in result.values())
        ddp = result["ddp"]
        assert ddp["distributed_type"] == "DistributedType.MULTI_CPU" and ddp["fsdp_units"] == 0 and ddp["warnings"]
        for name in (kind, "resumed"):
            assert result[name]["distributed_type"] == f"DistributedType.{kind.upper()}", result[name]
            assert not result[name]["warnings"]
    logs = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("ddp", kind, "resumed")}
    engine = logs[kind]
    assert [r["step"] for r in engine] == [1, 2, 3, 4] and engine[-1]["samples_seen"] == 32
    assert all(math.isfinite(r["loss"]) for r in engine) and engine[-1]["loss"] < engine[0]["loss"]
    # the engine trains as the data-parallel path does: the same loss at every step, the same weights
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(engine, logs["ddp"])), (engine, logs["ddp"])
    run = tmp_path / kind
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-0000002", "ckpt-0000004", "final", "latest", "log.jsonl"]
    assert (run / "ckpt-0000004" / "engine").is_dir()
    final = load_file(str(run / "final" / "model.safetensors"))
    reference = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    assert final.keys() == reference.keys()
    for key, value in final.items():  # gathered whole (not rank 0's shard), as trained
        assert value.shape == reference[key].shape and torch.allclose(value, reference[key], atol=1e-4), key
        assert torch.equal(value, load_file(str(run / "ckpt-0000004" / "model" / "model.safetensors"))[key])
    middle = load_file(str(run / "ckpt-0000002" / "model" / "model.safetensors"))
    assert any(not torch.equal(middle[k], final[k]) for k in final)
    loaded = SeedLM.from_pretrained(run / "final")
    assert all(torch.equal(v, final[k]) for k, v in loaded.stored_state_dict().items())
    # --resume from step 2 (the engine's weights, optimizer, scheduler) continues as if never stopped
    resumed = logs["resumed"]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and resumed[-1]["samples_seen"] == 32
    assert all(abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(resumed[2:], engine[2:])), (resumed, engine)
    again = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.allclose(again[k], final[k], atol=1e-6) for k in final)
    return results


def test_lm_stage_under_fsdp_on_two_ranks(tmp_path, micro):
    # sync_module_states needs an accelerator device; both ranks build the same seeded weights anyway
    results = _lm_stage_under_engine(tmp_path, micro, "fsdp", "fsdp.yaml", "--fsdp_sync_module_states", "false")
    for result in results:  # fsdp.yaml's policy: the root and one unit per LlamaDecoderLayer
        assert all(result[n]["engine"] == "FullyShardedDataParallel" for n in ("fsdp", "resumed"))
        assert result["fsdp"]["fsdp_units"] == result["resumed"]["fsdp_units"] == 3


def test_lm_stage_under_deepspeed_zero2_on_two_ranks(tmp_path, micro):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not a dependency: pip install deepspeed")
    results = _lm_stage_under_engine(tmp_path, micro, "deepspeed", "deepspeed-zero2.yaml")
    for result in results:
        assert all(result[n]["engine"] == "DeepSpeedEngine" for n in ("deepspeed", "resumed"))


def test_extract_ids_on_two_ranks_matches_one_process(tmp_path, micro):
    from seedtok.data.ids import extract_ids, load_ids

    torchrun("-m", "seedtok.cli", "extract-ids", "--data", "emoji:train:10", "--tokenizer", "micro",
             "--shard-size", "3", "--out", tmp_path / "dist")
    extract_ids(micro, open_source("emoji:train:10"), tmp_path / "one", source="emoji:train:10",
                tokenizer_name="micro", shard_size=3, progress=False)
    a, b = load_ids(tmp_path / "dist"), load_ids(tmp_path / "one")
    assert torch.equal(a.ids, b.ids) and a.captions == b.captions
    assert json.loads((tmp_path / "dist" / "index.json").read_text()) == \
        json.loads((tmp_path / "one" / "index.json").read_text())
    assert not list((tmp_path / "dist").glob(".*"))  # no temporary files left


# ------------------------------------------------------------------------------------------ streaming
def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 img2dataset-style shards of 5 good samples each, plus one corrupt image per shard."""
    folder = tmp_path_factory.mktemp("shards")
    samples = open_source("emoji:train:20")
    for shard in range(4):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            def add(name, data):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

            for i in range(5):
                n = shard * 5 + i
                add(f"{n:09d}.png", _png(samples[n].image))
                add(f"{n:09d}.txt", samples[n].caption.encode())
                if i == 2:
                    add(f"bad{shard:06d}.png", b"not a png at all")
                    add(f"bad{shard:06d}.txt", b"a corrupt sample")
    return folder


def test_stream_splits_by_node_and_worker_without_duplicates(shards):
    def keys(samples):
        return {"keys": [s.meta["key"] for s in samples]}

    seen, corrupt = [], 0
    for rank in range(2):
        stream = ShardStream(str(shards / "*.tar"), keys, batch_size=3, rank=rank, world_size=2, seed=0,
                             shuffle_buffer=4, resampled=False, epochs=1)
        for batch in loader(stream, num_workers=2):
            seen += batch["keys"]
            corrupt += int(batch["corrupt"])
    assert sorted(seen) == [f"{n:09d}" for n in range(20)]  # the dataset, exactly once
    assert corrupt == 4


def test_streaming_training_counts_corrupt_samples(tmp_path, shards):
    from seedtok.train import train_tokenizer

    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump({"model": "micro", "train": {"1": {
        "streaming": True, "data": str(shards / "{00000..00003}.tar"), "steps": 2, "batch_size": 4,
        "shuffle_buffer": 8, "resampled": True, "augment": True, "checkpoint_every": 2}}}))
    result = train_tokenizer(str(config), 1, out=tmp_path / "run", progress=False)
    assert result.steps == 2
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logs[-1]["corrupt_skipped"] >= 1 and logs[-1]["samples_seen"] == 8
