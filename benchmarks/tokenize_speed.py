"""Encode-speed benchmark: ``SeedTokenizer.encode_pixels`` against transformers' BLIP-2 feature path.

    .venv/bin/python benchmarks/tokenize_speed.py [--quick] [--presets micro,seed2] [--json-out PATH]

What it measures (CPU, random weights, preprocessed random pixels [B, 3, S, S] so the time is the model's):
1. images/s and peak memory of ``encode_pixels`` per preset, batch (1, 8) and dtype (fp32, bf16). Ours and the
   baseline are built once per preset, kept together (``--no-interleave``: one at a time) and, per setting, get
   one untimed warm-up call each, then timed calls in alternation (ours, baseline, ours, ...) until each has spent
   ``--min-time`` seconds (at least ``--min-rounds``, at most ``--max-reps`` calls): on shared CPUs the
   machine's speed drifts, and alternation lets both see the same drift. images/s comes from the best call.
   Memory: the process RSS read with psutil every ``--sample-ms`` in a background thread; "peak dRSS" is the
   highest RSS during the warm-up or the first timed call minus the RSS just before it (after ``malloc_trim``
   where glibc has it), in MiB: the weights are resident already, so this is activations and workspace.
2. The baseline in the same run: ``transformers.Blip2Model.get_qformer_features`` of the same size (ViT,
   bidirectional Q-Former, 32 queries; a tiny OPT so the language model costs nothing), under inference_mode,
   SDPA attention, cast whole to bf16 for the bf16 rows (as ``set_dtype`` casts ours). "ours/base" is our
   images/s over the baseline's (> 1: we are faster).
3. Achieved GFLOP/s against a measured ceiling: the best of a few square matmuls (``--matmul-n`` sizes, at the
   start and at the end of the run) in fp32 and in bf16. Encode FLOPs per image are counted with
   ``torch.utils.flop_counter.FlopCounterMode`` on one image (plus a formula for the CPU flash-attention op,
   which torch does not count) and cross-checked against the analytic count from the config.
4. bf16 vs fp32 on the same inputs at the largest batch run: the share of ids that agree, and the speedup.
5. The other processes' share of the CPUs before and during the run (psutil), since it skews every number.
"""

from __future__ import annotations

import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, if not installed

import argparse  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

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
class Runner:
    """One model under test: ``call(x)`` runs it on pixels prepared by ``prepare(x)`` (outside the timing)."""

    def __init__(self, label: str, module: torch.nn.Module, call, set_dtype, prepare):
        self.label, self.module, self.call, self.set_dtype, self.prepare = label, module, call, set_dtype, prepare


def measured_call(fn, sample_s: float) -> tuple[float, float, object]:
    """(seconds, peak RSS delta in MiB, result) of one call, RSS sampled in a thread from a trimmed heap."""
    _malloc_trim()
    before = rss()
    with RssSampler(sample_s) as sampler:
        t0 = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
    return elapsed, (sampler.peak - before) / MIB, result


def time_paired(runners: list[Runner], inputs: list, args) -> list[dict]:
    """One warm-up call per runner, then rounds of one timed call per runner in turn (A, B, A, B, ...), so a
    change in the machine's speed hits both alike, until every runner has spent ``--min-time`` seconds (at
    least ``--min-rounds`` rounds, at most ``--max-reps``). Memory is sampled over the warm-up and the first
    timed call."""
    sample_s = args.sample_ms / 1000.0
    gc.collect()
    out = []
    for runner, x in zip(runners, inputs):
        warmup, mem, _ = measured_call(lambda: runner.call(x), sample_s)
        out.append({"warmup_s": warmup, "peak_rss_delta_mib": mem, "times_s": [], "result": None})
    rounds = 0
    while rounds < args.min_rounds or (rounds < args.max_reps
                                       and min(sum(o["times_s"]) for o in out) < args.min_time):
        for runner, x, o in zip(runners, inputs, out):
            if rounds == 0:
                elapsed, mem, result = measured_call(lambda: runner.call(x), sample_s)
                o["peak_rss_delta_mib"] = max(o["peak_rss_delta_mib"], mem)
            else:
                t0 = time.perf_counter()
                result = runner.call(x)
                elapsed = time.perf_counter() - t0
            o["times_s"].append(elapsed)
            o["result"] = result
        rounds += 1
    for o in out:
        o["best_s"] = min(o["times_s"])
        o["median_s"] = statistics.median(o["times_s"])
    return out


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
    patches = (v.image_size // v.patch_size) ** 2
    n, d, i = patches + 1, v.hidden_size, v.intermediate_size  # patches + CLS
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
                           qkv_bias=True, hidden_act="gelu",
                           # transformers' default here is 1e-10: activations that small run into fp32
                           # denormals on CPU (several times slower); use our random models' scale
                           initializer_range=v.init_std),
        qformer_config=dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
                            num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size,
                            encoder_hidden_size=q.encoder_width,
                            cross_attention_frequency=q.cross_attention_every,
                            layer_norm_eps=q.layer_norm_eps, initializer_range=q.init_std),
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
    with torch.no_grad():  # transformers zeroes the queries; ours are N(0, 0.02)
        gen = torch.Generator().manual_seed(cfg.seed)
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=gen) * 0.02)
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


def ours_runner(name: str) -> Runner:
    model = SeedTokenizer(preset(name)).eval()
    return Runner("ours", model, call=model.encode_pixels, set_dtype=model.set_dtype, prepare=lambda x, dtype: x)


def baseline_runner(cfg: TokenizerConfig) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_blip2(cfg)

    def call(x):
        with torch.inference_mode():
            return model.get_qformer_features(x)

    return Runner("BLIP-2", model, call=call, set_dtype=lambda dtype: model.to(DTYPES[dtype]),
                  prepare=lambda x, dtype: x.to(DTYPES[dtype]))


def bench_preset(name: str, args, pixels: dict[int, torch.Tensor]) -> dict:
    cfg = preset(name)
    plan = settings(name, args.quick, args.batches)
    vit = cfg.vision.kind == "eva_vit"  # the BLIP-2 baseline and the analytic count need EVA's ViT
    result: dict = {"preset": name, "image_size": cfg.image_size, "ours": {}, "baseline": {}, "flops": {},
                    "analytic_flops": analytic_flops(cfg) if vit else None}
    one = pixels[min(pixels)][:1]

    def build(kind: str) -> Runner:
        t0 = time.perf_counter()
        runner = ours_runner(name) if kind == "ours" else baseline_runner(cfg)
        result[f"{kind}_build_s"] = time.perf_counter() - t0
        if kind == "ours":
            call = lambda: runner.module(one)  # noqa: E731  (forward: encode_pixels is inference_mode)
        else:
            result["baseline_attn_implementation"] = runner.module.config._attn_implementation
            call = lambda: runner.module.get_qformer_features(one)  # noqa: E731
        total, sdpa = counted_flops(runner.module, call)
        result["flops"][kind] = {"counted": total, "counted_sdpa_part": sdpa}
        log(f"[{name}] built {runner.label} in {result[f'{kind}_build_s']:.1f}s; "
            f"{total / 1e9:.4g} GFLOP/image counted")
        return runner

    kinds = ["ours"] + ([] if args.no_baseline or not vit else ["baseline"])
    groups = [kinds] if args.interleave else [[k] for k in kinds]  # models alive at the same time
    ids: dict[tuple[str, int], torch.Tensor] = {}
    for group in groups:
        runners = {kind: build(kind) for kind in group}
        current = "fp32"
        for dtype, batch in plan:
            if dtype != current:
                for runner in runners.values():
                    runner.set_dtype(dtype)
                current = dtype
            inputs = [r.prepare(pixels[batch], dtype) for r in runners.values()]
            try:
                timings = time_paired(list(runners.values()), inputs, args)
            except Exception as exc:  # record it and go on with the other settings
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                for kind in runners:
                    result[kind][f"{dtype}/b{batch}"] = {"batch": batch, "error": error}
                log(f"[{name}] {dtype} b{batch} FAILED: {error}")
                continue
            for (kind, runner), t in zip(runners.items(), timings):
                res = t.pop("result")
                if kind == "ours":
                    ids[(dtype, batch)] = res
                t.update(batch=batch, images_per_s=batch / t["best_s"])
                result[kind][f"{dtype}/b{batch}"] = t
                log(f"[{name}] {runner.label} {dtype} b{batch}: best {t['best_s']:.3f}s "
                    f"(median {t['median_s']:.3f}s of {len(t['times_s'])}, warm-up {t['warmup_s']:.2f}s), "
                    f"peak dRSS {t['peak_rss_delta_mib']:.0f} MiB")
        if args.profile:
            for kind, runner in runners.items():
                runner.set_dtype(args.profile)
                x1 = runner.prepare(pixels[min(pixels)], args.profile)
                label = f"{runner.label} {name} {args.profile} b{min(pixels)}"
                try:
                    result[f"profile_{kind}"] = profile_top(lambda: runner.call(x1), label)
                except Exception as exc:
                    result[f"profile_{kind}"] = f"--- profile: {label} failed: {type(exc).__name__}: {exc}"
        del runners, inputs
        free_memory()

    # bf16 vs fp32 ids at the largest batch run in both dtypes
    common = sorted(b for (d, b) in ids if d == "fp32" and ("bf16", b) in ids)
    if common:
        b = common[-1]
        agree = (ids[("fp32", b)] == ids[("bf16", b)]).double().mean().item()
        result["bf16_vs_fp32"] = {"batch": b, "ids_agree_pct": 100.0 * agree,
                                  "speedup": result["ours"][f"fp32/b{b}"]["best_s"]
                                  / result["ours"][f"bf16/b{b}"]["best_s"],
                                  "num_ids": int(ids[("fp32", b)].numel())}
    return result


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
    mode = ("ours and BLIP-2 built together and timed in alternation (A, B, A, B, ...)" if env["interleave"]
            else "one model at a time")
    out.append(f"random weights, random preprocessed pixels; {mode}; 1 warm-up call per model and setting, then "
               f"n timed calls each; img/s from the best call")
    out.append(f"other processes used {100 * env['other_load_before']:.0f}% of the CPUs just before the run and "
               f"~{100 * env['other_load_during']:.0f}% during it (psutil; times are only comparable when low)")
    if max(env["other_load_before"], env["other_load_during"]) > 0.2:
        out.append("WARNING: other processes were using the CPUs; torch's threads then wait on each other and "
                   "timings (and ratios) can be off by large factors: rerun on a quiet machine")
    out.append(f"peak dRSS = highest process RSS (psutil, sampled every {env['sample_ms']:g} ms in a thread) during "
               f"the warm-up and first timed call, minus the RSS just before each (after malloc_trim), MiB")
    ceil = report["ceiling"]
    runs = ", ".join(f"{r['when']} {r['fp32_gflops']:.0f}/{r['bf16_gflops']:.0f}" for r in ceil["runs"])
    sizes = "/".join(str(n) for n in ceil["n"])
    out.append(f"matmul ceiling (n x n @ n x n, n = {sizes}, best of {ceil['reps']} each, measured at the start and "
               f"end of the run; the best kept): fp32 {ceil['fp32_gflops']:.0f} GFLOP/s, "
               f"bf16 {ceil['bf16_gflops']:.0f} GFLOP/s (fp32/bf16: {runs})")
    out.append("")

    header = ["preset", "dtype", "batch", "n", "ours img/s", "ms/img", "peak dRSS MiB", "BLIP-2 img/s",
              "BLIP-2 dRSS MiB", "ours/base", "GFLOP/s", "% ceiling"]
    rows, failures = [], []
    for res in report["presets"]:
        flops = res["flops"]["ours"]["counted"]
        for key, o in res["ours"].items():
            dtype = key.split("/")[0]
            if "error" in o:
                rows.append([res["preset"], dtype, str(o["batch"]), "-", "failed"] + ["-"] * 7)
                failures.append(f"[{res['preset']}] {dtype} b{o['batch']} failed: {o['error']}")
                continue
            b = res["baseline"].get(key)
            gflops = flops * o["batch"] / o["best_s"] / 1e9
            rows.append([res["preset"], dtype, str(o["batch"]), str(len(o["times_s"])),
                         f"{o['images_per_s']:.3g}", f"{1000 * o['best_s'] / o['batch']:.1f}",
                         f"{o['peak_rss_delta_mib']:.0f}",
                         f"{b['images_per_s']:.3g}" if b else "-",
                         f"{b['peak_rss_delta_mib']:.0f}" if b else "-",
                         f"{o['images_per_s'] / b['images_per_s']:.2f}" if b else "-",
                         f"{gflops:.4g}", f"{100 * gflops / ceil[dtype + '_gflops']:.1f}%"])
    out.append(format_table(header, rows, right=set(range(2, len(header)))))
    out.extend(failures)
    out.append("")

    for res in report["presets"]:
        f = res["flops"]
        a = res["analytic_flops"]
        line = (f"[{res['preset']}] encode GFLOP/image: FlopCounterMode {_g(f['ours']['counted'])} "
                f"(of which {_g(f['ours']['counted_sdpa_part'])} CPU flash-SDPA, counted by an added formula)")
        if a:
            line += (f", analytic {_g(a['total'])} (ViT {_g(a['vit'])} + Q-Former {_g(a['qformer'])} + "
                     f"quantizer {_g(a['quantizer'])})")
        if res["preset"] == "seed2":
            line += f", SPEC ~{SPEC_SEED2_GFLOP:.0f}"
        if "baseline" in f:
            line += f"; BLIP-2 counted {_g(f['baseline']['counted'])}"
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


def _g(flops: float) -> str:
    """FLOPs -> GFLOP, 4 significant digits."""
    return f"{flops / 1e9:.4g}"


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
    p.add_argument("--matmul-n", default="2048,4096",
                   help="matmul ceiling sizes, comma-separated (n x n @ n x n; the best counts)")
    p.add_argument("--matmul-reps", type=int, default=3)
    p.add_argument("--min-rounds", type=int, default=1, help="at least this many timed calls per setting")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers BLIP-2 baseline")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="build and time one model at a time (half the peak memory; ratios more exposed to "
                        "drift in the machine's speed)")
    p.add_argument("--profile", choices=list(DTYPES), default=None,
                   help="also profile one batch-1 call (ours and baseline) in this dtype: top 10 ops")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    args.batches = sorted({int(s) for s in args.batches.split(",") if s.strip()})
    args.matmul_n = [int(s) for s in args.matmul_n.split(",") if s.strip()]
    for name in args.presets:
        preset(name)  # fail fast on unknown names
    return args


def measure_ceiling(args, ceiling: dict, when: str) -> None:
    """Matmuls of each size in ``--matmul-n``, each dtype; the run's GFLOP/s is the best size's."""
    run: dict = {"when": when, "sizes": {}}
    for dtype, torch_dtype in DTYPES.items():
        for n in args.matmul_n:
            gflops, best = matmul_ceiling(n, torch_dtype, args.matmul_reps)
            run["sizes"][f"{dtype}/{n}"] = {"gflops": gflops, "best_s": best}
            log(f"matmul {dtype} n={n} ({when}): {gflops:.0f} GFLOP/s")
        run[f"{dtype}_gflops"] = max(run["sizes"][f"{dtype}/{n}"]["gflops"] for n in args.matmul_n)
    ceiling["runs"].append(run)
    free_memory()


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
           "python": platform.python_version(), "sample_ms": args.sample_ms, "interleave": args.interleave,
           "rss_method": "psutil.Process().memory_info().rss sampled in a thread"}
    log(f"torch threads: {env['threads']}; measuring matmul ceiling ...")

    idle_before = other_load(0.5)
    log(f"other processes' CPU use before the run: {100 * idle_before:.0f}% of all CPUs")
    usage0 = _cpu_usage()
    ceiling = {"n": args.matmul_n, "reps": args.matmul_reps, "runs": []}
    measure_ceiling(args, ceiling, "start")

    results = []
    for name in args.presets:
        cfg = preset(name)
        pixels = {b: random_pixels(cfg, b) for b in args.batches}
        results.append(bench_preset(name, args, pixels))

    measure_ceiling(args, ceiling, "end")
    for dtype in DTYPES:  # the machine's speed drifts (shared CPUs): the best of both runs is the ceiling
        ceiling[f"{dtype}_gflops"] = max(r[f"{dtype}_gflops"] for r in ceiling["runs"])
    busy, own, wall = (b - a for a, b in zip(usage0, _cpu_usage()))
    env["other_load_before"] = idle_before
    env["other_load_during"] = min(1.0, max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))))
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


def _cpu_usage() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, of this process, wall seconds) so far."""
    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    mine = psutil.Process().cpu_times()
    return busy, mine.user + mine.system, time.monotonic()


def other_load(seconds: float) -> float:
    """Share of all CPUs that other processes used over ``seconds`` (this one idle meanwhile)."""
    a = _cpu_usage()
    time.sleep(seconds)
    busy, own, wall = (y - x for x, y in zip(a, _cpu_usage()))
    return min(1.0, max(0.0, (busy - own) / (wall * (os.cpu_count() or 1))))


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
