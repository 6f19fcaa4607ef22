"""``retrieval serve``: the search API (HTTP JSON) over a run's index; endpoints in ``retrieval/serving.py``."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.errors import ConfigError, DataError
from retrieval.imagefile import check_pixel_limit
from retrieval.rundir import BEST_CHECKPOINT, IndexDir, RunDir
from retrieval.serving import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_K,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_QUERY_CHARS,
    ServeLimits,
    create_app,
)

DEFAULT_PORT = 8000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="retrieval serve", description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    parser.add_argument("--index", type=Path, help="index directory (default: <run>/index)")
    parser.add_argument("--checkpoint", default=BEST_CHECKPOINT, help="checkpoint name in <run>/checkpoints "
                                                                      f"(default: {BEST_CHECKPOINT})")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--device", default="cpu", help="device of the image encoder (default: cpu)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"largest request body (default: {DEFAULT_MAX_BODY_BYTES:,})")
    parser.add_argument("--max-upload-pixels", default=str(DEFAULT_MAX_PIXELS),
                        help=f"largest upload decoded, width × height (default: {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--max-k", type=int, default=DEFAULT_MAX_K, help=f"largest k (default: {DEFAULT_MAX_K})")
    parser.add_argument("--max-query-chars", type=int, default=DEFAULT_MAX_QUERY_CHARS,
                        help=f"longest text query (default: {DEFAULT_MAX_QUERY_CHARS})")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> ServeLimits:
    """Refuse (one line) a bad port or limit, or a run, checkpoint or index that is missing; return the limits."""
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: a port is a number from 1 to 65535")
    limits = ServeLimits(max_body_bytes=args.max_body_bytes,
                         max_pixels=check_pixel_limit(args.max_upload_pixels, "--max-upload-pixels"),
                         max_k=args.max_k, max_query_chars=args.max_query_chars)
    if not args.run.is_dir():
        raise DataError(f"run directory {args.run} does not exist; train one with `retrieval train` "
                        "(or pass --run DIR)")
    index = IndexDir(args.index) if args.index else RunDir(args.run).index
    if not index.exists():
        raise DataError(f"no index in {index}; build one with `retrieval index --run {args.run}` first")
    checkpoint = RunDir(args.run).checkpoint(args.checkpoint)
    if not checkpoint.is_file():
        raise DataError(f"checkpoint {checkpoint} does not exist (--checkpoint)")
    return limits


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from retrieval.search import open_searcher

    args = parse_args(argv)
    limits = check_args(args)
    searcher = open_searcher(args.run, args.checkpoint, args.index, device=args.device)
    print(f"serving {len(searcher.images):,} images of {args.run} at http://{args.host}:{args.port} "
          "(Ctrl-C stops it)", flush=True)
    uvicorn.run(create_app(searcher, limits), host=args.host, port=args.port, log_level="warning")
    return 0
