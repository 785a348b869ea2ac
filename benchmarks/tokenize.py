"""Encode-speed benchmark: ``SeedTokenizer.encode_pixels`` against transformers' BLIP-2 feature path.

    .venv/bin/python benchmarks/tokenize.py [--quick] [--presets micro,seed2] [--json-out PATH]

What it measures (CPU, random weights, preprocessed random pixels [B, 3, S, S] so the time is the model's):
1. images/s and peak memory of ``encode_pixels`` per preset, batch (1, 8) and dtype (fp32, bf16). Every setting
   gets one untimed warm-up call, then timed calls until ``--min-time`` seconds are spent (at least one, at most
   ``--max-reps``); images/s comes from the best (shortest) call. Memory: the process RSS read with psutil every
   ``--sample-ms`` in a background thread; "peak dRSS" is the highest RSS seen during the warm-up and timed calls
   minus the RSS just before the warm-up (after ``malloc_trim`` where glibc has it), in MiB. The weights are
   already resident then, so the delta is activations and workspace.
2. The baseline in the same run: ``transformers.Blip2Model.get_qformer_features`` of the same size (ViT,
   bidirectional Q-Former, 32 queries; a tiny OPT so the language model costs nothing), under inference_mode,
   SDPA attention, cast whole to bf16 for the bf16 rows (as ``set_dtype`` casts ours). "ours/base" is our
   images/s over the baseline's (> 1: we are faster).
3. Achieved GFLOP/s against a measured ceiling: the best of a few square matmuls (``--matmul-n``) in fp32 and in
   bf16. Encode FLOPs per image are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one image (plus
   a formula for the CPU flash-attention op, which torch does not count) and cross-checked against the
   analytic count from the config.
4. bf16 vs fp32 on the same inputs at the largest batch run: the share of ids that agree, and the speedup.

The file is named like the stdlib ``tokenize`` module; the lines below keep ``import tokenize`` elsewhere (torch
imports ``inspect``, which imports it) from finding this script.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(os.path.dirname(_HERE))  # the repo root, in case seedtok is not installed

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

from seedtok.config import TokenizerConfig, preset  # noqa: E402
from seedtok.models.tokenizer import SeedTokenizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 1024 * 1024
SPEC_SEED2_GFLOP = 530.0  # SEED SPEC: ~530 GFLOP per image for seed2 encode


# ------------------------------------------------------------------------------------------------ memory
def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc only) so RSS deltas start from a clean base."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Reads the process RSS every ``interval`` seconds in a daemon thread; ``peak`` is the highest seen."""

    def __init__(self, interval: float):
        self.interval = interval
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def rss() -> int:
    return psutil.Process().memory_info().rss


def free_memory() -> None:
    gc.collect()
    _malloc_trim()


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    times: list[float]
    warmup_s: float
    rss_before_mib: float
    peak_rss_mib: float
    result: object = field(default=None, repr=False)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def peak_delta_mib(self) -> float:
        return self.peak_rss_mib - self.rss_before_mib


def time_calls(fn, min_time: float, max_reps: int, sample_s: float) -> Timing:
    """One warm-up call, then timed calls until ``min_time`` seconds are spent (>= 1, <= max_reps)."""
    free_memory()
    before = rss()
    with RssSampler(sample_s) as sampler:
        t0 = time.perf_counter()
        fn()
        warmup = time.perf_counter() - t0
        times: list[float] = []
        result = None
        while not times or (sum(times) < min_time and len(times) < max_reps):
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
    return Timing(times=times, warmup_s=warmup, rss_before_mib=before / MIB, peak_rss_mib=sampler.peak / MIB,
                  result=result)


def matmul_ceiling(n: int, dtype: torch.dtype, reps: int) -> tuple[float, float]:
    """Best-of-``reps`` GFLOP/s of an n x n @ n x n matmul (after one warm-up), and that best time."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9, best


# ------------------------------------------------------------------------------------------------- FLOPs
def analytic_flops(cfg: TokenizerConfig) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one image's encode, from the config. Norms, softmax, GELU: not counted."""
    v, q = cfg.vision, cfg.qformer
    n, d, i = v.num_states, v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    vit_layer = (2 * n * d * 3 * d  # qkv
                 + 2 * n * n * d * 2  # q.k^T and attn.v
                 + 2 * n * d * d  # output projection
                 + 2 * 2 * n * d * i)  # MLP up + down
    patch_embed = 2 * patches * 3 * v.patch_size ** 2 * d
    vit = v.num_layers * vit_layer + patch_embed

    m, h, qi = q.num_queries, q.hidden_size, q.intermediate_size
    self_attn = 2 * m * h * 3 * h + 2 * m * m * h * 2 + 2 * m * h * h
    cross_attn = 2 * m * h * h + 2 * n * q.encoder_width * h * 2 + 2 * m * n * h * 2 + 2 * m * h * h
    ffn = 2 * 2 * m * h * qi
    n_cross = len(range(0, q.num_layers, q.cross_attention_every))
    qformer = q.num_layers * (self_attn + ffn) + n_cross * cross_attn

    c = cfg.quantizer
    quantizer = 2 * m * h * h + 2 * m * h * c.code_dim + 2 * m * c.code_dim * c.codebook_size
    return {"vit": vit, "qformer": qformer, "quantizer": quantizer, "total": vit + qformer + quantizer}


_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def counted_flops(module: torch.nn.Module, fn) -> tuple[float, float]:
    """FlopCounterMode over ``fn()``. Returns (total with the CPU flash-SDPA formula added, the part that
    formula added).

    The counter's module tracker hooks every module input that requires grad and fails on one without a
    grad_fn, which is what a view of a parameter (``query_tokens.expand``) is under inference_mode or no_grad;
    so the parameters are switched to requires_grad=False for the count, and restored after."""
    flags = {p: p.requires_grad for p in module.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False,
                                              custom_mapping={_CPU_SDPA: _cpu_sdpa_flop}) as counter:
            fn()
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    sdpa = counter.get_flop_counts().get("Global", {}).get(_CPU_SDPA, 0)
    return float(counter.get_total_flops()), float(sdpa)


# ----------------------------------------------------------------------------------------------- baseline
def blip2_config(cfg: TokenizerConfig):
    """transformers' Blip2Config of the same size as ``cfg``'s encode path, with a tiny OPT."""
    from transformers import Blip2Config

    v, q = cfg.vision, cfg.qformer
    return Blip2Config(
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                           num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                           image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                           qkv_bias=True, hidden_act="gelu"),
        qformer_config=dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
                            num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size,
                            encoder_hidden_size=q.encoder_width,
                            cross_attention_frequency=q.cross_attention_every,
                            layer_norm_eps=q.layer_norm_eps),
        text_config=dict(model_type="opt", num_hidden_layers=2, hidden_size=64, ffn_dim=128,
                         num_attention_heads=2, vocab_size=1000, word_embed_proj_dim=64),
        num_query_tokens=q.num_queries)


def build_blip2(cfg: TokenizerConfig):
    from transformers import Blip2Model

    config = blip2_config(cfg)
    try:
        model = Blip2Model._from_config(config, attn_implementation="sdpa")
    except (TypeError, ValueError, ImportError):
        model = Blip2Model(config)
    return model.eval()


# ----------------------------------------------------------------------------------------------- running
def random_pixels(cfg: TokenizerConfig, batch: int) -> torch.Tensor:
    """Uniform random "images" in [0, 1], normalised like the real preprocessing: [B, 3, S, S] fp32."""
    gen = torch.Generator().manual_seed(1234 + batch)
    s = cfg.image_size
    x = torch.rand(batch, 3, s, s, generator=gen)
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def settings(name: str, quick: bool, batches: list[int]) -> list[tuple[str, int]]:
    """(dtype, batch) in run order: fp32 first, then bf16 (one cast per model)."""
    out = []
    for dtype in DTYPES:
        for batch in batches:
            if quick and name == "seed2" and batch > 1:
                continue
            out.append((dtype, batch))
    return out


def profile_top(fn, label: str, top: int = 10) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return f"--- profile: {label} (top {top} ops by self CPU time)\n{table}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_preset(name: str, args, pixels: dict[int, torch.Tensor]) -> dict:
    cfg = preset(name)
    plan = settings(name, args.quick, args.batches)
    result: dict = {"preset": name, "image_size": cfg.image_size, "ours": {}, "baseline": {}, "flops": {}}
    sample_s = args.sample_ms / 1000.0
    mpx = {b: pixels[b] for _, b in plan}

    # ---- ours
    t0 = time.perf_counter()
    model = SeedTokenizer(preset(name)).eval()
    result["ours_build_s"] = time.perf_counter() - t0
    log(f"[{name}] built SeedTokenizer in {result['ours_build_s']:.1f}s")
    one = mpx[min(mpx)][:1]
    counted, sdpa = counted_flops(model, lambda: model(one))
    result["flops"].update(counted=counted, counted_sdpa_part=sdpa, analytic=analytic_flops(cfg))
    ids: dict[tuple[str, int], torch.Tensor] = {}
    current = "fp32"
    for dtype, batch in plan:
        if dtype != current:
            model.set_dtype(dtype)
            current = dtype
        x = mpx[batch]
        t = time_calls(lambda: model.encode_pixels(x), args.min_time, args.max_reps, sample_s)
        ids[(dtype, batch)] = t.result
        result["ours"][f"{dtype}/b{batch}"] = _timing_dict(t, batch)
        log(f"[{name}] ours {dtype} b{batch}: best {t.best:.3f}s x{len(t.times)} (warm-up {t.warmup_s:.2f}s), "
            f"peak dRSS {t.peak_delta_mib:.0f} MiB")
    if args.profile:
        x1 = mpx[min(mpx)]
        model.set_dtype(args.profile)
        result["profile_ours"] = profile_top(lambda: model.encode_pixels(x1), f"ours {name} {args.profile} b1")
    del model
    free_memory()

    # agreement at the largest batch run in both dtypes
    common = sorted(b for (d, b) in ids if d == "fp32" and ("bf16", b) in ids)
    if common:
        b = common[-1]
        agree = (ids[("fp32", b)] == ids[("bf16", b)]).double().mean().item()
        fp32_s = result["ours"][f"fp32/b{b}"]["best_s"]
        bf16_s = result["ours"][f"bf16/b{b}"]["best_s"]
        result["bf16_vs_fp32"] = {"batch": b, "ids_agree_pct": 100.0 * agree, "speedup": fp32_s / bf16_s,
                                  "num_ids": int(ids[("fp32", b)].numel())}

    # ---- baseline
    if not args.no_baseline:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = build_blip2(cfg)
        result["baseline_build_s"] = time.perf_counter() - t0
        result["baseline_attn_implementation"] = base.config._attn_implementation
        log(f"[{name}] built Blip2Model in {result['baseline_build_s']:.1f}s "
            f"(attn {base.config._attn_implementation})")
        counted_b, sdpa_b = counted_flops(base, lambda: base.get_qformer_features(one))
        result["flops"].update(baseline_counted=counted_b, baseline_counted_sdpa_part=sdpa_b)
        current = "fp32"
        for dtype, batch in plan:
            if dtype != current:
                base.to(DTYPES[dtype])
                current = dtype
            x = mpx[batch].to(DTYPES[dtype])

            def call(x=x):
                with torch.inference_mode():
                    return base.get_qformer_features(x)

            t = time_calls(call, args.min_time, args.max_reps, sample_s)
            result["baseline"][f"{dtype}/b{batch}"] = _timing_dict(t, batch)
            log(f"[{name}] BLIP-2 {dtype} b{batch}: best {t.best:.3f}s x{len(t.times)} "
                f"(warm-up {t.warmup_s:.2f}s), peak dRSS {t.peak_delta_mib:.0f} MiB")
        if args.profile:
            x1 = mpx[min(mpx)].to(DTYPES[args.profile])
            base.to(DTYPES[args.profile])

            def call1():
                with torch.inference_mode():
                    return base.get_qformer_features(x1)

            result["profile_baseline"] = profile_top(call1, f"BLIP-2 {name} {args.profile} b1")
        del base
        free_memory()
    return result


def _timing_dict(t: Timing, batch: int) -> dict:
    return {"batch": batch, "best_s": t.best, "images_per_s": batch / t.best, "times_s": t.times,
            "warmup_s": t.warmup_s, "rss_before_mib": t.rss_before_mib, "peak_rss_mib": t.peak_rss_mib,
            "peak_rss_delta_mib": t.peak_delta_mib}


# ------------------------------------------------------------------------------------------------ report
def format_table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i])
              for i in range(len(header))]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render(report: dict) -> str:
    out = []
    env = report["env"]
    out.append(f"seedtok encode benchmark  |  torch {env['torch']}, transformers {env['transformers']}, "
               f"{env['threads']} torch threads, {env['cpu']}")
    out.append(f"random weights, random preprocessed pixels; 1 warm-up call per setting, images/s from the best "
               f"timed call (n = timed calls); peak dRSS = psutil RSS sampled every {env['sample_ms']} ms in a "
               f"thread, minus RSS before the warm-up")
    ceil = report["ceiling"]
    out.append(f"matmul ceiling ({ceil['n']}x{ceil['n']} @ {ceil['n']}x{ceil['n']}, best of {ceil['reps']}): "
               f"fp32 {ceil['fp32_gflops']:.0f} GFLOP/s, bf16 {ceil['bf16_gflops']:.0f} GFLOP/s")
    out.append("")

    header = ["preset", "dtype", "batch", "n", "ours img/s", "ms/img", "peak dRSS MiB", "BLIP-2 img/s",
              "BLIP-2 dRSS MiB", "ours/base", "GFLOP/s", "% ceiling"]
    rows = []
    for res in report["presets"]:
        flops = res["flops"]["counted"]
        for key, o in res["ours"].items():
            dtype = key.split("/")[0]
            b = res["baseline"].get(key)
            gflops = flops * o["batch"] / o["best_s"] / 1e9
            rows.append([res["preset"], dtype, str(o["batch"]), str(len(o["times_s"])),
                         f"{o['images_per_s']:.3g}", f"{1000 * o['best_s'] / o['batch']:.1f}",
                         f"{o['peak_rss_delta_mib']:.0f}",
                         f"{b['images_per_s']:.3g}" if b else "-",
                         f"{b['peak_rss_delta_mib']:.0f}" if b else "-",
                         f"{o['images_per_s'] / b['images_per_s']:.2f}" if b else "-",
                         f"{gflops:.0f}", f"{100 * gflops / ceil[dtype + '_gflops']:.0f}%"])
    out.append(format_table(header, rows, right=set(range(2, len(header)))))
    out.append("")

    for res in report["presets"]:
        f = res["flops"]
        a = f["analytic"]
        line = (f"[{res['preset']}] encode GFLOP/image: FlopCounterMode {f['counted'] / 1e9:.1f} "
                f"(of which {f['counted_sdpa_part'] / 1e9:.1f} CPU-SDPA, added by formula), analytic "
                f"{a['total'] / 1e9:.1f} (ViT {a['vit'] / 1e9:.1f} + Q-Former {a['qformer'] / 1e9:.2f} + "
                f"quantizer {a['quantizer'] / 1e9:.3f})")
        if res["preset"] == "seed2":
            line += f", SPEC ~{SPEC_SEED2_GFLOP:.0f}"
        if "baseline_counted" in f:
            line += f"; BLIP-2 counted {f['baseline_counted'] / 1e9:.1f}"
        out.append(line)
        if "bf16_vs_fp32" in res:
            c = res["bf16_vs_fp32"]
            out.append(f"[{res['preset']}] bf16 vs fp32 at batch {c['batch']}: {c['ids_agree_pct']:.1f}% of "
                       f"{c['num_ids']} ids agree; bf16 speedup {c['speedup']:.2f}x")
        builds = f"[{res['preset']}] build: ours {res['ours_build_s']:.1f}s"
        if "baseline_build_s" in res:
            builds += f", BLIP-2 {res['baseline_build_s']:.1f}s (attn {res['baseline_attn_implementation']})"
        out.append(builds)
    out.append(f"total run time {report['total_s']:.0f}s")
    for res in report["presets"]:
        for k in ("profile_ours", "profile_baseline"):
            if k in res:
                out.append("")
                out.append(res[k])
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="micro,seed2", help="comma-separated presets (default: micro,seed2)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--quick", action="store_true", help="skip seed2 at batch > 1")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--min-time", type=float, default=3.0,
                   help="timed calls per setting run until this many seconds (at least one call)")
    p.add_argument("--max-reps", type=int, default=200, help="at most this many timed calls per setting")
    p.add_argument("--sample-ms", type=float, default=5.0, help="RSS sampling interval")
    p.add_argument("--matmul-n", type=int, default=4096, help="matmul ceiling size (n x n @ n x n)")
    p.add_argument("--matmul-reps", type=int, default=3)
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers BLIP-2 baseline")
    p.add_argument("--profile", choices=list(DTYPES), default=None,
                   help="also profile one batch-1 call (ours and baseline) in this dtype: top 10 ops")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    args.batches = sorted({int(s) for s in args.batches.split(",") if s.strip()})
    for name in args.presets:
        preset(name)  # fail fast on unknown names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_num_threads(torch.get_num_threads())  # explicit, and printed below
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "sample_ms": args.sample_ms,
           "rss_method": "psutil.Process().memory_info().rss sampled in a thread"}
    log(f"torch threads: {env['threads']}; measuring matmul ceiling ...")

    ceiling = {"n": args.matmul_n, "reps": args.matmul_reps}
    for dtype, torch_dtype in DTYPES.items():
        gflops, best = matmul_ceiling(args.matmul_n, torch_dtype, args.matmul_reps)
        ceiling[f"{dtype}_gflops"], ceiling[f"{dtype}_best_s"] = gflops, best
        log(f"matmul {dtype}: {gflops:.0f} GFLOP/s")
    free_memory()

    results = []
    for name in args.presets:
        cfg = preset(name)
        pixels = {b: random_pixels(cfg, b) for b in args.batches}
        results.append(bench_preset(name, args, pixels))

    report = {"env": env, "args": {k: v for k, v in vars(args).items()}, "ceiling": ceiling,
              "presets": results, "total_s": time.perf_counter() - start}
    print(render(report), flush=True)
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
        log(f"wrote {args.json_out}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
            else:
                name = platform.processor() or "cpu"
    except OSError:
        name = platform.processor() or "cpu"
    return f"{name} ({os.cpu_count()} logical CPUs)"


if __name__ == "__main__":
    sys.exit(main())
