"""``seedtok demo`` (the HTML report of every ability) and ``seedtok serve`` (the web app)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_web_commands(sub) -> None:
    p = sub.add_parser("demo", help="every ability on sample images and prompts -> an HTML report")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default demo-out)")
    _engine_args(p)
    p.add_argument("--emoji", type=int, default=4, metavar="N", help="emoji-world test scenes to show (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser("serve", help="the web app: upload an image, see its ids, reconstruction, caption; draw")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    _engine_args(p)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (default 10 MB)")
    p.set_defaults(func=_serve)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="tokenizer preset or checkpoint folder (default tiny)")
    p.add_argument("--lm", default="tiny", help="SeedLM preset or checkpoint folder (default tiny); 'none' to skip")


def _engine(args):
    from .web.engine import Engine

    return Engine.load(args.model, None if args.lm.lower() == "none" else args.lm)


def _demo(args) -> int:
    from .demo import run_demo, summary_table

    start = time.perf_counter()
    engine = _engine(args)
    loaded = time.perf_counter() - start
    report = run_demo(engine, args.out, n_emoji=max(0, args.emoji), seed=args.seed)
    print(summary_table(report))
    print(f"loaded in {loaded:.1f} s, ran in {report.seconds['total']:.1f} s; report: {report.index}")
    return 0


def _serve(args) -> int:
    from .errors import SeedtokError
    from .web.app import create_app
    from .web.server import serve

    if not 0 <= args.port <= 65535:
        raise SeedtokError(f"--port must be in 0..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise SeedtokError("--max-upload-mb must be positive")
    app = create_app(_engine(args), max_upload_bytes=int(args.max_upload_mb * 2**20))
    serve(app, args.host, args.port)
    return 0
