"""Plain-text renderings for the terminal: held-out R@K tables and search results."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from retrieval.search import Searcher


def format_metrics_table(metrics: dict, chance: dict | None = None, ks=(1, 5, 10)) -> str:
    """A small text table: rows = directions, columns = R@K (with chance level when given)."""
    lines = [f"{'direction':<16}" + "".join(f"{'R@' + str(k):>10}" for k in ks)]
    for direction in ("text_to_image", "image_to_text"):
        lines.append(f"{direction:<16}" + "".join(f"{metrics.get(f'{direction}/R@{k}', float('nan')):>10.3f}"
                                                  for k in ks))
        if chance:
            lines.append(f"{'  (chance)':<16}" + "".join(f"{chance.get(f'{direction}/R@{k}', float('nan')):>10.3f}"
                                                         for k in ks))
    return "\n".join(lines)


def text_query_results(searcher: Searcher, query: str, k: int) -> str:
    """The top-k images of a text query, one line each: rank, key, score and first caption."""
    lines = [f"text → image: {query!r}"]
    for rank, hit in enumerate(searcher.text_to_image(query, k), 1):
        lines.append(f"  {rank}. {hit.key}  score {hit.score:.3f}  “{hit.captions[0] if hit.captions else ''}”")
    return "\n".join(lines)


def image_query_results(searcher: Searcher, image: str | Path | Image.Image, k: int, name: str | None = None) -> str:
    """The nearest captions of the collection and the nearest words of an image (a file, or a picture ``name``d)."""
    found = searcher.image_to_text(image, k)
    lines = [f"image → text: {name or image}", "  nearest captions of the collection:"]
    lines += [f"    {rank}. {hit.text}  ({hit.score:.3f})" for rank, hit in enumerate(found.captions, 1)]
    lines.append("  nearest words: " + ", ".join(f"{hit.text} ({hit.score:.2f})" for hit in found.words))
    return "\n".join(lines)
