"""``retrieval search``: text→image (``--text``, word arithmetic allowed) or image→text (``--image``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.console import image_query_results, text_query_results
from retrieval.errors import QueryError
from retrieval.search import open_searcher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval search", description=__doc__)
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help='caption-like text, or arithmetic such as "dog - grass + snow"')
    query.add_argument("--image", type=Path, help="an image file")
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    parser.add_argument("--checkpoint", default="best.pt")
    parser.add_argument("--index", type=Path, help="index directory (default: <run>/index)")
    parser.add_argument("-k", type=int, default=5, help="number of results")
    args = parser.parse_args(argv)
    if args.text is not None and not args.text.strip():
        raise QueryError("--text is empty: type some words")
    searcher = open_searcher(args.run, args.checkpoint, args.index)
    print(text_query_results(searcher, args.text, args.k) if args.text is not None
          else image_query_results(searcher, args.image, args.k))
    return 0
