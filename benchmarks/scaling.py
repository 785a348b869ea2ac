"""Memory per GPU and training time at paper scale, computed from parameter counts (docs/scaling.md).

    python benchmarks/scaling.py            # markdown tables, as pasted in docs/scaling.md
    python benchmarks/scaling.py --json

Nothing is measured here: the tokenizer's counts come from the seed1 / seed2 presets (built on the meta device,
as ``seedtok info`` does), the LLM's from LLaMA-7B's shapes (SEED-LLaMA 8B = Vicuna-7B + 8,194 new tokens).
Rules of thumb used (each stated where it is used): mixed-precision AdamW keeps 16 bytes per trained
parameter (bf16 weight + bf16 grad + fp32 master, m, v); a frozen bf16 parameter costs 2 bytes; a forward
costs 2 FLOPs per parameter per token, forward + backward 6 (frozen parts: the backward still runs through
them when something before them trains -- not the case here, the ViT is first); activations from
Korthikanti et al. 2022 (34·s·b·h + 5·a·s²·b bytes per transformer layer, bf16; with full recomputation
only the 2·s·b·h layer inputs stay).
"""

from __future__ import annotations

import os
import sys

# this folder holds tokenize.py, which would shadow the standard library's module of that name
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402

GIB = 2**30
V100_TFLOPS = 125e12  # V100 fp16 tensor-core peak (dense)


def tokenizer_counts(name: str) -> dict[str, int]:
    import torch

    from seedtok import SeedTokenizer, preset

    with torch.device("meta"):
        return SeedTokenizer(preset(name)).parameter_counts()


def llama7b(new_tokens: int = 8194, r: int = 16) -> dict[str, int]:
    h, layers, inter, vocab = 4096, 32, 11008, 32000 + new_tokens
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    lora = layers * r * (4 * (h + h) + 2 * (h + inter) + (inter + h))  # q k v o, gate up, down
    embed = head = vocab * h
    norms = layers * 2 * h + h
    total = layers * per_layer + embed + head + h
    # SPEC §3 (SEED-LLaMA): LoRA + the whole embedding, LM head and norms train
    return {"total": total, "trainable": lora + embed + head + norms, "lora": lora, "hidden": h,
            "layers": layers, "heads": 32, "intermediate": inter, "vocab": vocab}


def act_bytes(seq: int, batch: int, h: int, heads: int, layers: int, recompute: bool) -> float:
    if recompute:  # layer inputs kept, one layer's activations live during its recomputation
        return layers * 2 * seq * batch * h + (34 * seq * batch * h + 5 * heads * seq * seq * batch)
    return layers * (34 * seq * batch * h + 5 * heads * seq * seq * batch)


def lm_memory(gpus: int, micro_batch: int = 4, seq: int = 1024, recompute: bool = True) -> dict[str, float]:
    m = llama7b()
    frozen = m["total"] - m["trainable"] + m["lora"]  # weights: everything in bf16 (LoRA adds its own)
    weights = 2 * (m["total"] + m["lora"])
    grads = 2 * m["trainable"] / gpus  # ZeRO-2: gradients partitioned
    optim = 12 * m["trainable"] / gpus  # ZeRO-2: fp32 master + Adam m, v partitioned
    acts = act_bytes(seq, micro_batch, m["hidden"], m["heads"], m["layers"], recompute)
    logits = micro_batch * seq * m["vocab"] * (2 + 4)  # bf16 logits + fp32 for the loss
    del frozen
    out = {"weights": weights, "grads": grads, "optimizer": optim, "activations": acts, "logits": logits}
    out["total"] = sum(out.values())
    return {k: v / GIB for k, v in out.items()}


def tokenizer_memory(counts: dict[str, int], stage: int, batch: int) -> dict[str, float]:
    vit = counts["vision_encoder"] + counts["ln_vision"]
    if stage == 1:
        trained = counts["qformer"] + counts["ln_vision"]
        frozen = counts["vision_encoder"] + counts["quantizer"] + counts["detokenizer"]
        # ViT (frozen, no grad: only one layer's activations live); Q-Former 12 layers over 32 queries + 32
        # text tokens, cross-attention to 257 states (~ 2x a self-attention layer's activations at s = 64)
        acts = 34 * 257 * batch * 1408 + 12 * 2 * (34 * 64 * batch * 768 + 5 * 12 * 64 * 64 * batch)
    else:
        trained = counts["quantizer"] + counts["detokenizer"]
        frozen = vit + counts["qformer"]
        acts = 34 * 257 * batch * 1408 + 8 * (34 * 32 * batch * 768 + 5 * 12 * 32 * 32 * batch)
    out = {"weights": 2 * frozen + 2 * trained, "grads+optimizer": 14 * trained, "activations": acts}
    out["total"] = sum(out.values())
    del vit
    return {k: v / GIB for k, v in out.items()}


def tokenizer_flops(counts: dict[str, int]) -> dict[str, float]:
    """FLOPs per image: the frozen ViT forward over 257 tokens; the trained part forward + backward."""
    vit = 2 * counts["vision_encoder"] * 257
    # stage 1: Q-Former over 32 queries (cross-attention layers see 257 keys: count their K/V projections
    # per ViT token) + the text branch over 32 tokens; forward + backward = 3x forward
    cross_kv = 6 * 2 * 1408 * 768  # 6 cross-attention layers, K and V
    qformer_fwd = 2 * (counts["qformer"] - 30522 * 768) * 64 + 2 * cross_kv * 257
    stage1 = vit + 3 * qformer_fwd
    # stage 2: ViT + Q-Former forward (frozen targets), quantizer + de-tokenizer forward + backward on 32 tokens
    stage2 = vit + qformer_fwd / 2 + 6 * (counts["quantizer"] + counts["detokenizer"]) * 32
    return {"stage1": stage1, "stage2": stage2}


def seed1_time(gpus: int = 64, stage1_images: float = 50e6, stage2_images: float = 20_000 * 256 * 64,
               mfu: float = 0.35) -> dict[str, float]:
    counts = tokenizer_counts("seed1")
    f = tokenizer_flops(counts)
    total = f["stage1"] * stage1_images + f["stage2"] * stage2_images
    rate = gpus * V100_TFLOPS * mfu
    return {"flops_per_image_stage1": f["stage1"], "flops_per_image_stage2": f["stage2"], "total_flops": total,
            "days_at_mfu": total / rate / 86400, "mfu": mfu,
            "implied_mfu_for_5.7_days": total / (gpus * V100_TFLOPS * 5.7 * 86400)}


def report() -> dict:
    counts = tokenizer_counts("seed2")
    return {"seed2_counts": counts, "llama7b": llama7b(),
            "lm_memory": {n: lm_memory(n) for n in (8, 16, 64)},
            "lm_memory_no_recompute_8": lm_memory(8, recompute=False),
            "tokenizer_memory": {"stage1_b64": tokenizer_memory(counts, 1, 64),
                                 "stage2_b256": tokenizer_memory(counts, 2, 256)},
            "seed1_time": seed1_time()}


def markdown(r: dict) -> str:
    lines = ["seed2 parameters: " + ", ".join(f"{k} {v / 1e6:,.1f}M" for k, v in r["seed2_counts"].items()),
             f"LLaMA-7B + 8,194 tokens: {r['llama7b']['total'] / 1e9:.2f}B parameters, trained "
             f"{r['llama7b']['trainable'] / 1e6:,.0f}M (LoRA r16 {r['llama7b']['lora'] / 1e6:.1f}M + embedding, "
             f"head, norms)", "",
             "| job | weights | grads + optimizer | activations | total GiB / GPU |", "|---|---|---|---|---|"]
    for n, m in r["lm_memory"].items():
        lines.append(f"| LM, ZeRO-2 on {n} GPUs, 4 x 1024 tokens, checkpointing | {m['weights']:.1f} | "
                     f"{m['grads'] + m['optimizer']:.1f} | {m['activations'] + m['logits']:.1f} | {m['total']:.1f} |")
    m = r["lm_memory_no_recompute_8"]
    lines.append(f"| LM, ZeRO-2 on 8 GPUs, no checkpointing | {m['weights']:.1f} | "
                 f"{m['grads'] + m['optimizer']:.1f} | {m['activations'] + m['logits']:.1f} | {m['total']:.1f} |")
    for name, m in r["tokenizer_memory"].items():
        lines.append(f"| tokenizer {name.replace('_b', ', batch ')} per GPU (DDP) | {m['weights']:.1f} | "
                     f"{m['grads+optimizer']:.1f} | {m['activations']:.1f} | {m['total']:.1f} |")
    t = r["seed1_time"]
    lines += ["", f"SEED-1 tokenizer FLOPs per image: stage 1 {t['flops_per_image_stage1'] / 1e12:.2f} TFLOP, "
              f"stage 2 {t['flops_per_image_stage2'] / 1e12:.2f} TFLOP; total {t['total_flops'] / 1e18:.0f} EFLOP "
              f"(50M stage-1 images, 327.7M stage-2 images)",
              f"64 V100 at {t['mfu']:.0%} of the fp16 peak: {t['days_at_mfu']:.1f} days "
              f"(paper: 5.7 days; that time implies {t['implied_mfu_for_5.7_days']:.0%} utilisation)"]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = report()
    print(json.dumps(result, indent=2) if args.json else markdown(result))
