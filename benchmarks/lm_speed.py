"""SeedLM speed: generated tokens/s with the KV cache against without it, and a training step with the output
layer at the labelled tokens only against at every position.

    .venv/bin/python benchmarks/lm_speed.py [--model tiny] [--batches 1,8] [--rounds 3] [--threads N]
                                            [--json-out benchmarks/results/lm-speed.json]

What it measures (CPU; ``--model``: the tiny preset, SmolLM2-135M-Instruct + the bundled adapter, or any
SeedLM folder):
1. Drawing: ``generate_ids`` in image mode for the tokenizer's 32 tokens (the draw defaults: temperature 1,
   top-p 0.5) on ``--batches`` prompts, with the KV cache (``use_cache=True``, what `draw` does) and without
   it (the named baseline: the whole sequence again at every step). Tokens/s = prompts x 32 / seconds; the
   two are timed in alternation, ``--rounds`` rounds after one warm-up each, best round kept; they must give
   the same tokens (checked, printed).
2. Training: one forward + backward of a batch of 16 in tiny's mix (3 replay texts, 5 questions, 5 image ->
   caption without labels on the leading image, 3 caption -> image; random codes), with ``labelled_logits_only``
   (what `seedtok train lm` does) against the full output layer (the baseline). Samples/s from the best
   round; the two losses, without dropout, must agree.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.dirname(_HERE))  # the repo root, if not installed

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from decode import format_table, timed  # noqa: E402  (benchmarks/decode.py)
from seedtok.fileio import atomic_write_text  # noqa: E402

CAPTIONS = ("a red apple on a blue background", "a grinning face on a yellow background",
            "a black cat on a white background", "a rocket on a purple background", "a sun on a green background",
            "a heart on a pink background", "a clock on an orange background", "a dog on a gray background")


def training_batch(lm, seed: int = 0) -> dict:
    from seedtok.train.lm import REPLAY_OPENINGS

    g = torch.Generator().manual_seed(seed)
    n = lm.num_image_tokens

    def codes():
        return torch.randint(0, lm.config.codebook_size, (n,), generator=g)

    seqs = [lm.encode([(f"{REPLAY_OPENINGS[i]} was quiet that day, and most people stayed at home to rest.", True)])
            for i in range(3)]
    seqs += [lm.instruction_sequence(codes(), "What colour is the background?", "blue") for _ in range(5)]
    seqs += [lm.caption_sequence(codes(), CAPTIONS[i], True, label_image=False) for i in range(5)]
    seqs += [lm.caption_sequence(codes(), CAPTIONS[i], False) for i in range(3)]
    return lm.collate(seqs, lm.config.max_length)


def bench_generation(lm, batch: int, rounds: int) -> dict:
    prompts = [lm.draw_prompt(CAPTIONS[i % len(CAPTIONS)]) for i in range(batch)]
    n = lm.num_image_tokens
    kw = dict(temperature=lm.config.temperature, top_p=lm.config.top_p, seed=0)
    modes = {"KV cache": lambda: lm.generate_ids(prompts, n, "image", use_cache=True, **kw),
             "no cache (baseline)": lambda: lm.generate_ids(prompts, n, "image", use_cache=False, **kw)}
    outputs = {m: fn() for m, fn in modes.items()}  # warm-up
    times = {m: [] for m in modes}
    for _ in range(rounds):
        for m, fn in modes.items():
            times[m].append(timed(fn)[0])
    same = outputs["KV cache"] == outputs["no cache (baseline)"]
    return {"batch": batch, "new_tokens": n, "same_tokens": same,
            "modes": {m: {"times_s": t, "best_s": min(t), "tokens_per_s": batch * n / min(t)} for m, t in times.items()}}


def bench_training(lm, rounds: int) -> dict:
    batch = training_batch(lm)
    params = [p.requires_grad_(True) for _, p in lm.trainable_named_parameters()]

    def step(only: bool):
        out = lm(**batch, labelled_logits_only=only)
        torch.autograd.grad(out.loss, params)
        return out

    lm.eval()  # the losses compared without dropout
    with torch.no_grad():
        losses = {only: float(lm(**batch, labelled_logits_only=only).loss) for only in (True, False)}
    lm.train()
    modes = {"labelled tokens only": lambda: step(True), "every position (baseline)": lambda: step(False)}
    for fn in modes.values():  # warm-up
        fn()
    times = {m: [] for m in modes}
    for _ in range(rounds):
        for m, fn in modes.items():
            times[m].append(timed(fn)[0])
    lm.eval()
    rows = len(batch["input_ids"])
    return {"batch": rows, "positions": int(batch["labels"].numel()),
            "labelled": int((batch["labels"][:, 1:] != -100).sum()),
            "loss_labelled_only": losses[True], "loss_full": losses[False],
            "modes": {m: {"times_s": t, "best_s": min(t), "samples_per_s": rows / min(t)} for m, t in times.items()}}


def render(report: dict) -> str:
    env = report["env"]
    out = [f"seedtok LM speed  |  model {report['model']}, torch {env['torch']}, transformers {env['transformers']}, "
           f"{env['threads']} torch threads, {env['cpu']}, load average {env['loadavg_before']:.2f} before / "
           f"{env['loadavg_after']:.2f} after ({env['cpus']} CPUs); modes timed in alternation, {report['rounds']} "
           f"rounds after 1 warm-up, best round", ""]
    rows = []
    for res in report["generation"]:
        base = res["modes"]["no cache (baseline)"]["tokens_per_s"]
        for m, r in res["modes"].items():
            rows.append([f"draw {res['new_tokens']} image tokens", str(res["batch"]), m,
                         f"{r['tokens_per_s']:.1f} tok/s", f"{r['tokens_per_s'] / base:.2f}"])
    tr = report["training"]
    base = tr["modes"]["every position (baseline)"]["samples_per_s"]
    for m, r in tr["modes"].items():
        rows.append(["train step (forward + backward)", str(tr["batch"]), m, f"{r['samples_per_s']:.2f} samples/s",
                     f"{r['samples_per_s'] / base:.2f}"])
    out.append(format_table(["work", "batch", "mode", "speed", "x baseline"], rows, right={1, 3, 4}))
    out.append("")
    same = all(r["same_tokens"] for r in report["generation"])
    out.append(f"cache and no cache drew the same tokens: {same}; training batch: {tr['labelled']} labelled of "
               f"{tr['positions']} positions, loss {tr['loss_labelled_only']:.5f} (labelled only) vs "
               f"{tr['loss_full']:.5f} (full)")
    out.append(f"total run time {report['total_s']:.0f}s")
    return "\n".join(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="an LM preset or SeedLM folder")
    p.add_argument("--batches", default="1,8", help="comma-separated drawing batch sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--json-out", default=os.path.join(_HERE, "results", "lm-speed.json"),
                   help="also write the results as JSON here ('' for none)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    from seedtok.models.lm import SeedLM

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "loadavg_before": os.getloadavg()[0]}
    lm = SeedLM.from_pretrained(args.model)
    lm.eval()
    generation = []
    for b in (int(s) for s in args.batches.split(",") if s.strip()):
        print(f"[draw, batch {b}] ...", file=sys.stderr, flush=True)
        generation.append(bench_generation(lm, b, args.rounds))
    print("[train step] ...", file=sys.stderr, flush=True)
    training = bench_training(lm, args.rounds)
    env["loadavg_after"] = os.getloadavg()[0]
    report = {"model": args.model, "rounds": args.rounds, "env": env, "generation": generation,
              "training": training, "total_s": time.perf_counter() - start}
    print(render(report))
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
