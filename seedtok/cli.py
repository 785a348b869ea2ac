"""The ``seedtok`` command. Thin: every verb calls the library. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "tiny"  # the embedded default, bundled in seedtok/weights/tiny


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import SeedtokError

    restore = _terminate_cleanly()
    try:
        return args.func(args) or 0
    except SeedtokError as exc:
        print(f"seedtok: error: {exc}", file=sys.stderr)
        return 2
    except _Terminated:
        print("seedtok: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("seedtok: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("seedtok: error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return 1
    finally:
        restore()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that ``finally`` blocks and atomic writes clean up (temporary
    files and checkpoint folders are removed; finished files and checkpoints stay)."""


def _terminate_cleanly():
    """Turn SIGTERM into `_Terminated` while a verb runs; returns the function that restores the old handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:  # embedded with its own handler: leave it
        return lambda: None

    def handler(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seedtok", description="SEED image tokenizer: images <-> 32 causal ids.")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("tokenize", help="images -> ids")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    _model_args(p)
    p.add_argument("--json", action="store_true", help='one JSON line per image: {"image": ..., "ids": [...]}')
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--background", type=_rgb, default=None, metavar="R,G,B",
                   help="composite transparent images onto this colour (default: drop alpha, as the reference)")
    p.set_defaults(func=_tokenize)

    p = sub.add_parser("detokenize", help="ids -> an image (through the model's image decoder)")
    p.add_argument("--ids", required=True, help='one image\'s ids: "3,17,..." (commas or spaces)')
    p.add_argument("-o", "--out", required=True, type=Path, help="output PNG")
    _model_args(p)
    _decode_args(p)
    p.set_defaults(func=_detokenize)

    p = sub.add_parser("reconstruct", help="images -> ids -> images (encode, then decode)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (one PNG per input)")
    p.add_argument("--grid", type=Path, default=None, help="also write a PNG with each input beside its "
                   "reconstruction")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    _model_args(p)
    _decode_args(p)
    p.set_defaults(func=_reconstruct)

    p = sub.add_parser("info", help="config, parameter counts per part, codebook size")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)

    p = sub.add_parser("convert", help="convert checkpoints")
    conv = p.add_subparsers(metavar="FORMAT")
    q = conv.add_parser("official", help="official SEED-1/SEED-2 .pt/.pth files -> a seedtok folder")
    q.add_argument("paths", nargs="+", metavar="PATH",
                   help="SEED-2: seed_quantizer.pt [eva_vit_g.pth]; SEED-1: causal_qformer.pth seed_tokenizer.pth")
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--version", choices=["seed1", "seed2"], default=None, help="default: inferred from the keys")
    q.add_argument("--config", default=None, metavar="PRESET_OR_JSON",
                   help="model config (default: the version's paper preset)")
    q.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="storage dtype")
    q.add_argument("--allow-missing", action="store_true", help="save even when keys are missing")
    q.set_defaults(func=_convert_official)

    p = sub.add_parser("export", help="re-save a model folder, e.g. in fp16 to bundle it")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", default="fp16", choices=["fp32", "bf16", "fp16"], help="storage dtype")
    p.set_defaults(func=_export)

    p = sub.add_parser("data", help="make datasets")
    data = p.add_subparsers(metavar="SOURCE")
    q = data.add_parser("emoji", help="emoji-world scenes -> a folder with captions.jsonl or .tar shards")
    q.add_argument("--split", choices=["train", "val", "test"], default="test")
    q.add_argument("--n", type=_positive_int, default=1000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--format", choices=["folder", "wds"], default="folder")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=_data_emoji)

    p = sub.add_parser("train", help="train a stage")
    stages = p.add_subparsers(metavar="WHAT")
    q = stages.add_parser("tokenizer", help="tokenizer stage 1 (causal Q-Former) or 2 (codebook + de-tokenizer)")
    q.add_argument("--stage", type=int, choices=[1, 2], required=True)
    q.add_argument("--config", default="tiny", metavar="FILE_OR_PRESET")
    q.add_argument("--out", type=Path, default=None, help="run folder (default runs/NAME-stageN)")
    q.add_argument("--init", type=Path, default=None,
                   help="stage 2: the stage-1 model folder (with --generation-only: the stage-2 model)")
    q.add_argument("--quick", action="store_true", help="a short run (minutes) to see every part work")
    q.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    q.add_argument("--steps", type=_positive_int, default=None)
    q.add_argument("--no-causal", action="store_true", help="train the bidirectional (BLIP-2) baseline")
    q.add_argument("--generation-only", action="store_true",
                   help="stage 2: retrain only the generation branch of a trained stage-2 model (ids unchanged)")
    q.set_defaults(func=_train_tokenizer)
    q = stages.add_parser("decoder", help="the tiny preset's image decoder (generation embedding -> image)")
    q.add_argument("--config", default="tiny", metavar="FILE_OR_PRESET")
    q.add_argument("--out", type=Path, default=None, help="run folder (default runs/NAME-decoder)")
    q.add_argument("--quick", action="store_true", help="a short run (minutes) to see every part work")
    q.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    q.add_argument("--steps", type=_positive_int, default=None)
    q.add_argument("--export", type=Path, default=None, metavar="DIR",
                   help="also save the trained decoder there in fp16 (e.g. seedtok/weights/tiny/decoder)")
    q.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="condition=generation: the trained tokenizer whose code embeddings to learn from "
                        "(default: the config's preset)")
    q.add_argument("--coarse-only", action="store_true",
                   help="train a new coarse head on the frozen UNet of the trained decoder --init")
    q.add_argument("--unet-only", action="store_true",
                   help="fine-tune the UNet of the trained decoder --init under its frozen coarse head")
    q.add_argument("--refit-prototypes", action="store_true",
                   help="no training steps: refit the coarse head's prototypes of the trained decoder --init on "
                        "the config's training targets, in closed form (everything else kept)")
    q.add_argument("--init", type=Path, default=None, metavar="DECODER_DIR",
                   help="with --coarse-only / --unet-only / --refit-prototypes: the trained decoder folder whose "
                        "other parts to keep")
    q.set_defaults(func=_train_decoder)

    p = sub.add_parser("eval", help="evaluate")
    evals = p.add_subparsers(metavar="WHAT")
    q = evals.add_parser("tokenizer", help="retrieval (embeddings / codes / bidirectional) and codebook health")
    q.add_argument("--model", default="tiny")
    q.add_argument("--data", help="a folder with captions.jsonl, .tar shards or emoji:SPLIT:N")
    q.add_argument("--karpathy", metavar="JSON", help="paper-scale retrieval: a Karpathy split file "
                   "(Flickr30K / COCO) with --image-root; every caption of every image is a query")
    q.add_argument("--image-root", default=".")
    q.add_argument("--split", default="test")
    q.add_argument("--baseline", default=None, help="a bidirectional model trained with --no-causal")
    q.add_argument("--json", type=Path, default=None, help="write the results here")
    q.set_defaults(func=_eval_tokenizer)
    q = evals.add_parser("decoder", help="reconstruction through the codes, scored on emoji-world scenes")
    _model_args(q)
    q.add_argument("--data", required=True, help="emoji-world scenes: a folder from `seedtok data emoji` or "
                   "emoji:test:N")
    q.add_argument("--limit", type=_positive_int, default=None, help="only the first N scenes")
    q.add_argument("--batch-size", type=_positive_int, default=16)
    q.add_argument("--json", type=Path, default=None, help="write the results here")
    _decode_args(q)
    q.set_defaults(func=_eval_decoder)
    from .cli_lm import add_lm_commands  # SeedLM verbs: caption, ask, draw, chat, extract-ids, train/eval lm, lm

    add_lm_commands(sub, stages, evals)
    from .cli_web import add_web_commands  # demo (HTML report) and serve (web app)

    add_web_commands(sub)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"preset or checkpoint folder (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])


def _load(args):
    from .models.tokenizer import SeedTokenizer

    return SeedTokenizer.from_pretrained(args.model, dtype=args.dtype)


def _tokenize(args) -> int:
    tokenizer = _load(args)
    images = args.images
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        ids = tokenizer.encode(chunk, batch_size=args.batch_size, background=args.background)
        for path, row in zip(chunk, ids.tolist()):
            if args.json:
                print(json.dumps({"image": path, "ids": row}), flush=True)
            else:
                print(f"{path}: {' '.join(map(str, row))}", flush=True)
    return 0


def _info(args) -> int:
    from .models.tokenizer import SeedTokenizer
    from .config import preset

    if args.model in ("seed1", "seed2"):
        import torch  # paper presets: shapes only, no weights needed
        with torch.device("meta"):
            tokenizer = SeedTokenizer(preset(args.model))
    else:
        tokenizer = SeedTokenizer.from_pretrained(args.model)
    counts = tokenizer.parameter_counts()
    info = {"name": tokenizer.config.name, "num_tokens": tokenizer.num_tokens,
            "codebook_size": tokenizer.codebook_size, "code_dim": tokenizer.config.quantizer.code_dim,
            "image_size": tokenizer.config.image_size, "detokenizer": tokenizer.config.detokenizer.kind,
            "causal": tokenizer.config.qformer.causal, "parameters": counts, "config": tokenizer.config.to_dict()}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"model        {info['name']} ({args.model})")
    print(f"tokens       {info['num_tokens']} causal ids per image, codebook {info['codebook_size']} x "
          f"{info['code_dim']}")
    print(f"image size   {info['image_size']}   de-tokenizer {info['detokenizer']}")
    print("parameters")
    for part, n in counts.items():
        print(f"  {part:<15}{n:>15,}")
    return 0


def _convert_official(args) -> int:
    from .models.tokenizer import SeedTokenizer

    config = None
    if args.config:
        from .config import PRESETS, TokenizerConfig, preset

        config = preset(args.config) if args.config in PRESETS else TokenizerConfig.from_json_file(args.config)
    model = SeedTokenizer.from_official(*args.paths, version=args.version, strict=not args.allow_missing,
                                        dtype=args.dtype, config=config)
    print(model.load_report.summary(), file=sys.stderr)
    model.save_pretrained(args.out)
    print(f"saved {args.out}")
    return 0


def _export(args) -> int:
    from .models.tokenizer import SeedTokenizer

    SeedTokenizer.from_pretrained(args.model).save_pretrained(args.out, dtype=args.dtype)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"saved {args.out} ({size:.1f} MB, {args.dtype})")
    return 0


def _data_emoji(args) -> int:
    from .data.emoji import EmojiWorld
    from .data.writer import write_dataset

    world = EmojiWorld(args.split, args.seed)
    count = write_dataset(world.take(args.n), args.out, format=args.format, progress=True, total=args.n,
                          overwrite=args.overwrite)
    print(f"wrote {count} {args.split} scenes to {args.out}")
    return 0


def _train_tokenizer(args) -> int:
    from .train import train_tokenizer

    result = train_tokenizer(args.config, args.stage, out=args.out, quick=args.quick, resume=args.resume,
                             init=args.init, steps=args.steps, causal=not args.no_causal,
                             generation_only=args.generation_only)
    print(f"{result.summary()}; model: {result.out_dir / 'final'}")
    return 0


def _eval_tokenizer(args) -> int:
    from .errors import SeedtokError
    from .data.sources import open_source
    from .evaluate import evaluate_tokenizer
    from .models.tokenizer import SeedTokenizer

    if bool(args.data) == bool(args.karpathy):
        raise SeedtokError("give exactly one of --data or --karpathy")
    if args.karpathy:
        from .data.sources import KarpathyCaptions

        data = KarpathyCaptions(args.karpathy, args.image_root, args.split)
        captions = data.captions()
    else:
        data, captions = open_source(args.data), None
    model = SeedTokenizer.from_pretrained(args.model)
    baseline = SeedTokenizer.from_pretrained(args.baseline) if args.baseline else None
    result = evaluate_tokenizer(model, data, baseline=baseline, captions=captions, progress=True)
    rows = result["retrieval"]
    print(f"{'':<15}{'I->T R@1/5/10':>22}{'T->I R@1/5/10':>22}")
    for name, r in rows.items():
        print(f"{name:<15}{r['i2t_r1']:>8.1f}{r['i2t_r5']:>7.1f}{r['i2t_r10']:>7.1f}"
              f"{r['t2i_r1']:>8.1f}{r['t2i_r5']:>7.1f}{r['t2i_r10']:>7.1f}")
    cb = result["codebook"]
    print(f"codebook: usage {cb['usage']:.1f}%, perplexity {cb['perplexity']:.1f}, dead {cb['dead']}")
    if "generation" in result:
        g = result["generation"]
        print(f"generation embeddings vs teacher: own teacher nearest {g['teacher_r1']:.1f}%, cosine "
              f"{g['cosine']:.3f}, MSE {g['mse']:.4f} (standardised {g['standardized_mse']:.3f})")
    if args.json:
        from .fileio import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-decoder", default=None, metavar="PATH",
                   help="image decoder folder or hub id (default: the model's decoder/ sub-folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the decoder's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the decoder's)")
    p.add_argument("--strength", type=float, default=None,
                   help="tiny decoder: share of the steps run from its noised coarse image, in (0, 1] "
                        "(1: from pure noise; default: the decoder's)")
    p.add_argument("--text-prior-weight", type=float, default=None,
                   help="tiny decoder: weight of its text prior, the ids' caption scores, in its emoji (and "
                        "background) choice (0: off; default: the decoder's)")


def _decode_kwargs(args) -> dict:
    kwargs = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    if args.strength is not None:  # only the tiny decoder has these
        kwargs["strength"] = args.strength
    if args.text_prior_weight is not None:
        kwargs["text_prior_weight"] = args.text_prior_weight
    return kwargs


def _load_with_decoder(args):
    tokenizer = _load(args)
    tokenizer.image_decoder(args.image_decoder)  # fails early, in one line, when there is none
    return tokenizer


def _save_png(image, path: Path) -> None:
    from .fileio import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: image.save(p, format="PNG"))


def _detokenize(args) -> int:
    from .models.tokenizer import parse_ids

    ids = parse_ids(args.ids)
    tokenizer = _load(args)
    tokenizer.check_ids([ids])  # bad ids fail before the decoder loads
    tokenizer.image_decoder(args.image_decoder)
    image = tokenizer.decode([ids], seed=args.seed, **_decode_kwargs(args))[0]
    _save_png(image, args.out)
    print(f"wrote {args.out}")
    return 0


def _reconstruct(args) -> int:
    from .data.transforms import load_image

    for path in args.images:  # every input readable before anything is written: no partial output folder
        load_image(path)
    tokenizer = _load_with_decoder(args)
    stems = [Path(p).stem for p in args.images]
    unique = len(set(stems)) == len(stems)
    pairs = []
    for start in range(0, len(args.images), args.batch_size):
        chunk = [load_image(p) for p in args.images[start:start + args.batch_size]]
        ids = tokenizer.encode(chunk, batch_size=args.batch_size)
        for i, (image, recon) in enumerate(zip(chunk, tokenizer.decode(ids, seed=args.seed,
                                                                       **_decode_kwargs(args)))):
            n = start + i
            out = args.out / (f"{stems[n]}.png" if unique else f"{n:04d}-{stems[n]}.png")
            _save_png(recon, out)
            print(f"{args.images[n]} -> {out}", flush=True)
            pairs.append((image, recon))
    if args.grid:
        _save_png(_grid(pairs), args.grid)
        print(f"grid: {args.grid}")
    return 0


def _grid(pairs, gap: int = 2):
    """One row per image: the input (resized to the reconstruction's size) beside its reconstruction."""
    from PIL import Image

    w, h = pairs[0][1].size
    grid = Image.new("RGB", (2 * w + 3 * gap, len(pairs) * (h + gap) + gap), (255, 255, 255))
    for row, (image, recon) in enumerate(pairs):
        y = gap + row * (h + gap)
        grid.paste(image.resize((w, h), Image.Resampling.BICUBIC), (gap, y))
        grid.paste(recon.resize((w, h), Image.Resampling.BICUBIC), (2 * gap + w, y))
    return grid


def _train_decoder(args) -> int:
    from .errors import ConfigError
    from .train.decoder import refit_prototypes, train_decoder

    if args.refit_prototypes:
        if args.init is None:
            raise ConfigError("--refit-prototypes refits a trained decoder: pass --init DECODER_DIR")
        if args.coarse_only or args.unet_only or args.resume or args.quick or args.steps:
            raise ConfigError("--refit-prototypes runs no training steps: drop --coarse-only, --unet-only, "
                              "--resume, --quick and --steps")
        out = args.out or Path("runs") / "decoder-refit"
        fitted = refit_prototypes(args.config, args.init, out, export=args.export)
        print(f"refit {fitted} prototypes; decoder: {out / 'final'}"
              + (f" (fp16 copy: {args.export})" if args.export else ""))
        return 0
    result = train_decoder(args.config, out=args.out, quick=args.quick, resume=args.resume, steps=args.steps,
                           export=args.export, tokenizer=args.tokenizer, init=args.init,
                           coarse_only=args.coarse_only, unet_only=args.unet_only)
    print(f"{result.summary()}; decoder: {result.out_dir / 'final'}"
          + (f" (fp16 copy: {args.export})" if args.export else ""))
    return 0


def _eval_decoder(args) -> int:
    from .data.sources import Slice, open_source
    from .evaluate.decoder import evaluate_decoder

    data = open_source(args.data)
    if args.limit:
        data = Slice(data, min(args.limit, len(data)))
    tokenizer = _load_with_decoder(args)
    result = evaluate_decoder(tokenizer, data, batch_size=args.batch_size, seed=args.seed,
                              **_decode_kwargs(args))
    print(f"reconstruction ({result['num_images']} images): identity top-1 {result['identity_top1']:.1f}%, "
          f"top-5 {result['identity_top5']:.1f}%, background {result['background_acc']:.1f}%, "
          f"embed cosine {result['embed_cosine']:.3f}, {result['images_per_s']:.2f} images/s")
    print(f"ceiling (originals): identity top-1 {result['ceiling_top1']:.1f}%, top-5 {result['ceiling_top5']:.1f}%")
    if args.json:
        from .fileio import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _rgb(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(0 <= v <= 255 for v in parts):
        raise argparse.ArgumentTypeError("expected R,G,B with values 0-255")
    return parts  # type: ignore[return-value]


if __name__ == "__main__":
    sys.exit(main())
