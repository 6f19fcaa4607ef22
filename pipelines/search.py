"""``retrieval search``: text→image (``--text``, word arithmetic allowed) or image→text (``--image``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.search import Searcher

from pipelines.common import checkpoint_path


def open_searcher(run_dir: Path, checkpoint: str = "best.pt", index: Path | None = None) -> Searcher:
    return Searcher.open(checkpoint_path(run_dir, checkpoint), index or Path(run_dir) / "index")


def text_results(searcher: Searcher, query: str, k: int) -> str:
    lines = [f"text → image: {query!r}"]
    for rank, hit in enumerate(searcher.text_to_image(query, k), 1):
        lines.append(f"  {rank}. {hit.key}  score {hit.score:.3f}  “{hit.captions[0] if hit.captions else ''}”")
    return "\n".join(lines)


def image_results(searcher: Searcher, image: Path, k: int) -> str:
    found = searcher.image_to_text(image, k)
    lines = [f"image → text: {image}", "  nearest captions of the collection:"]
    lines += [f"    {rank}. {hit.text}  ({hit.score:.3f})" for rank, hit in enumerate(found.captions, 1)]
    lines.append("  nearest words: " + ", ".join(f"{hit.text} ({hit.score:.2f})" for hit in found.words))
    return "\n".join(lines)


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
    searcher = open_searcher(args.run, args.checkpoint, args.index)
    print(text_results(searcher, args.text, args.k) if args.text else image_results(searcher, args.image, args.k))
    return 0
