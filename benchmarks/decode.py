"""Decode-speed benchmark: batched image decoding against one image at a time (the reference's way).

    .venv/bin/python benchmarks/decode.py [--sizes micro,small] [--batch 16] [--steps 20] [--threads N]
                                          [--kinds seed2,tiny] [--json-out benchmarks/results/decode.json]

What it measures (CPU, tiny random diffusers pipelines of the SEED-2 architecture, random embeddings, so the
time is the pipeline's; the paper's SD 2.1 unCLIP is not needed):
1. images/s of ``Seed2UnCLIPDecoder.decode`` on ``--batch`` embeddings in one call (one seed per image), against
   the same decoder called once per image, and against the reference's call (the unCLIP pipeline called per
   image with the empty prompt encoded on every call, a fixed latent, guidance 10, noise level 0).
   The three are timed in alternation, ``--rounds`` rounds after one warm-up each; images/s from the best round.
   "x ref" is images/s over the reference call's (> 1: faster).
2. That batching changes nothing: the largest pixel difference between the batched and the one-at-a-time
   images (same seeds; float32 in [0, 1]).
Sizes: "micro" is the tests' pipeline (16x16 pixels, UNet widths 16/32); "small" a larger one (32x32 pixels,
UNet widths 32/64, 1024-d embeddings as SD 2.1 unCLIP's). Both are far from the real 865M-parameter UNet at
768x768, where a CPU is compute-bound and batching gains little; these show what batching removes: the
per-call overhead (Python, scheduler, text encoding, small kernels), which dominates on GPUs.
3. The tiny preset's own decoder (``--kinds tiny``, size "preset": the bundled trained decoder in
   seedtok/weights/tiny/decoder, or the same architecture randomly initialised when it is not there -- the
   speed is the same): images/s at batch ``--batch`` in one call and at batch 1 (one call per image, the
   named baseline: "x one-at-a-time"), with its own default guidance (2, so also 2 UNet rows per image).
``--kinds``: which decoders; ``--sizes`` applies to seed2 (tiny has one size).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

SIZES = {
    "micro": {"channels": (16, 32), "sample_size": 8, "embed_dim": 16, "text_dim": 32},
    "small": {"channels": (32, 64), "sample_size": 16, "embed_dim": 1024, "text_dim": 64},
}


def build_seed2(size: dict, steps: int):
    from seedtok.models.image_decoder import Seed2UnCLIPDecoder, build_random_pipeline, seed_unclip_pipeline_class

    stock = build_random_pipeline("seed2", **size)
    pipeline = seed_unclip_pipeline_class()(**stock.components)  # what from_pretrained gives, without the disk
    return Seed2UnCLIPDecoder(pipeline, num_inference_steps=steps)


def build_tiny(size: dict | None, steps: int):
    """The tiny preset's decoder: the bundled weights when present, else its architecture at random init."""
    from seedtok.models.image_decoder import TinyDecoder
    from seedtok.models.tokenizer import BUNDLED, DECODER_DIR

    folder = BUNDLED["tiny"] / DECODER_DIR
    if (folder / "model_index.json").is_file():
        decoder = TinyDecoder.from_pretrained(folder, num_inference_steps=steps)
        decoder.weights = "bundled"
    else:
        decoder = TinyDecoder.random("tiny", num_inference_steps=steps)
        decoder.weights = "random init (no bundled decoder)"
    return decoder


#: kind -> builder(size dict, steps) -> ImageDecoder. None: not available (reported as skipped).
BUILDERS = {"seed2": build_seed2, "tiny": build_tiny}
#: the sizes a kind runs at (None: all of --sizes)
KIND_SIZES = {"tiny": ["preset"]}


def reference_call(decoder, steps: int):
    """The reference decoder's way: one pipeline call per image, a latent fixed at start-up, the prompt ""
    encoded on every call, guidance 10, noise level 0."""
    pipe = decoder.pipeline
    f = decoder.vae_scale_factor
    h, w = decoder.size
    latent = torch.randn(1, decoder.latent_channels, h // f, w // f, generator=torch.Generator().manual_seed(0))

    def run(embeddings):
        out = []
        for e in embeddings:
            out.extend(pipe(image_embeds=e[None], prompt="", guidance_scale=10.0, noise_level=0,
                            num_inference_steps=steps, latents=latent, output_type="np").images)
        return np.stack(out)

    return run


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(kind: str, size_name: str, args) -> dict:
    t0 = time.perf_counter()
    decoder = BUILDERS[kind](SIZES.get(size_name), args.steps)
    build_s = time.perf_counter() - t0
    n = args.batch
    emb = torch.randn(n, *decoder.embedding_shape, generator=torch.Generator().manual_seed(1))
    seeds = list(range(n))
    modes = {
        f"batched ({n} per call)": lambda: decoder.decode(emb, seed=seeds, output_type="np"),
        "one at a time (ours)" if kind == "seed2" else "batch 1 (one call per image)": lambda: np.concatenate(
            [decoder.decode(emb[i:i + 1], seed=[seeds[i]], output_type="np") for i in range(n)]),
    }
    if kind == "seed2":
        ref = reference_call(decoder, args.steps)
        modes["one at a time (reference call)"] = lambda: ref(emb)
    outputs, times = {}, {m: [] for m in modes}
    for m, fn in modes.items():  # warm-up
        outputs[m] = fn()
    for _ in range(args.rounds):  # alternation: every mode sees the same drift in the machine's speed
        for m, fn in modes.items():
            times[m].append(timed(fn)[0])
    names = list(modes)
    diff = float(np.abs(outputs[names[0]] - outputs[names[1]]).max())
    params = sum(p.numel() for p in decoder.pipeline.unet.parameters())
    return {"kind": kind, "size": size_name, "unet_params": params, "pixels": list(decoder.size),
            "weights": getattr(decoder, "weights", "random init"), "guidance_scale": decoder.guidance_scale,
            "embedding_shape": list(decoder.embedding_shape), "build_s": build_s,
            "max_abs_diff_batched_vs_single": diff,
            "modes": {m: {"times_s": t, "best_s": min(t), "images_per_s": n / min(t)} for m, t in times.items()}}


def format_table(header, rows, right) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render(report: dict) -> str:
    env = report["env"]
    out = [f"seedtok decode benchmark  |  torch {env['torch']}, diffusers {env['diffusers']}, {env['threads']} torch "
           f"threads, {env['cpu']}, load average {env['loadavg_before']:.2f} before / {env['loadavg_after']:.2f} "
           f"after ({env['cpus']} CPUs)",
           f"seed2: random tiny pipelines; tiny: the tiny preset's decoder; {report['steps']} steps, guidance 10 "
           f"(seed2) / 2 (tiny) (CFG: 2 UNet rows per image), batch "
           f"{report['batch']}; modes timed in alternation, {report['rounds']} rounds after 1 warm-up; img/s from "
           f"the best round", ""]
    header = ["decoder", "size", "UNet params", "pixels", "mode", "img/s", "ms/img", "x ref", "x one-at-a-time"]
    rows = []
    for res in report["results"]:
        if "skipped" in res:
            rows.append([res["kind"], res["size"], "-", "-", f"skipped: {res['skipped']}"] + ["-"] * 4)
            continue
        modes = res["modes"]
        ref = modes.get("one at a time (reference call)")
        ours1 = list(modes.values())[1]
        for m, r in modes.items():
            rows.append([res["kind"], res["size"], f"{res['unet_params'] / 1e6:.2f}M",
                         "x".join(map(str, res["pixels"])), m, f"{r['images_per_s']:.3g}",
                         f"{1000 / r['images_per_s']:.1f}",
                         f"{r['images_per_s'] / ref['images_per_s']:.2f}" if ref else "-",
                         f"{r['images_per_s'] / ours1['images_per_s']:.2f}"])
    out.append(format_table(header, rows, right={2, 5, 6, 7, 8}))
    out.append("")
    for res in report["results"]:
        if "skipped" not in res:
            out.append(f"[{res['kind']}/{res['size']}] batched vs one at a time, same seeds: max |pixel diff| "
                       f"{res['max_abs_diff_batched_vs_single']:.2e}; build {res['build_s']:.1f}s; weights "
                       f"{res['weights']}")
    out.append(f"total run time {report['total_s']:.0f}s")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default="seed2,tiny", help="comma-separated decoders (seed2, tiny)")
    p.add_argument("--sizes", default="micro,small", help=f"comma-separated pipeline sizes ({', '.join(SIZES)})")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="denoising steps (SEED-2: 20)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--json-out", default=os.path.join(_HERE, "results", "decode.json"),
                   help="also write the results as JSON here ('' for none)")
    args = p.parse_args(argv)
    args.kinds = [s.strip() for s in args.kinds.split(",") if s.strip()]
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for k in args.kinds:
        if k not in BUILDERS:
            p.error(f"unknown kind {k!r}; choose from {sorted(BUILDERS)}")
    for s in args.sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r}; choose from {sorted(SIZES)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*cannot be saved.*")
    import diffusers
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    start = time.perf_counter()
    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "loadavg_before": os.getloadavg()[0]}
    results = []
    for kind in args.kinds:
        for size in KIND_SIZES.get(kind, args.sizes):
            if BUILDERS[kind] is None:
                results.append({"kind": kind, "size": size, "skipped": "no builder yet"})
                continue
            print(f"[{kind}/{size}] ...", file=sys.stderr, flush=True)
            results.append(bench(kind, size, args))
    env["loadavg_after"] = os.getloadavg()[0]
    report = {"env": env, "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "results": results,
              "total_s": time.perf_counter() - start}
    print(render(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
