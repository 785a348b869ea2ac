"""The ``seedtok`` command. Thin: every verb calls the library. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "micro"  # until the embedded default (tiny) lands


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .errors import SeedtokError

    try:
        return args.func(args) or 0
    except SeedtokError as exc:
        print(f"seedtok: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seedtok: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("seedtok: error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return 1


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
    from .config import PRESETS, preset

    if args.model in PRESETS and args.model in ("seed1", "seed2"):
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
