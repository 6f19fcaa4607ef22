"""Streamlit building blocks of the app: result grids, text results and the model card.

Text that comes from a user or from the data (queries, the words box, file names, captions, keys,
error messages that echo them) is never read as markdown: it is shown with ``st.text`` when it
stands alone and as an inline code span (:func:`literal`) inside a markdown sentence, so a link,
an image or an emphasis in it is shown as typed, not rendered (and no remote image is fetched).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import streamlit as st
from PIL import Image, ImageOps

from retrieval.losses import describe_loss
from retrieval.search import SIMILARITIES, ImageHit, Searcher, TextHit

GRID_COLUMNS = 5
TILE_PIXELS = 256  # every thumbnail is shown as a square of this size: a uniform grid
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BACKTICKS = re.compile(r"`+")


def one_line(text: object) -> str:
    """``text`` with every line break replaced by a space."""
    return _LINE_BREAK.sub(" ", str(text))


def literal(text: object) -> str:
    """``str(text)`` as a markdown inline code span, shown verbatim inside any markdown element.

    The fence is one backtick longer than the longest backtick run of ``text`` and is padded
    with one space on each side, which CommonMark strips again, so ``text`` may start or end with a
    backtick. A code span cannot hold a line break, so line breaks become spaces.
    """
    text = one_line(text)
    longest = max((len(run) for run in _BACKTICKS.findall(text)), default=0)
    fence = "`" * (longest + 1)
    return f"{fence} {text} {fence}"


def show_error(message: str) -> None:
    """A one-line error box whose message (which may echo user text) is shown verbatim."""
    st.error(literal(message))


def shown_value(hit: ImageHit | TextHit) -> float:
    """What a result shows: its similarity (higher is better), else the index's score."""
    return hit.similarity if hit.similarity is not None else hit.score


def similarity_note(kind: str) -> str:
    """One sentence saying what the numbers under the results are."""
    return f"Numbers are similarities, higher is better: the {SIMILARITIES.get(kind, kind)}."


def tile(jpeg: bytes, pixels: int = TILE_PIXELS) -> Image.Image:
    """A thumbnail centre-cropped to a ``pixels`` square, so every cell of the grid has the same size."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return ImageOps.fit(image.convert("RGB"), (pixels, pixels))


def image_grid(hits: Sequence[ImageHit], columns: int = GRID_COLUMNS) -> None:
    """Square thumbnails of one size in rows of ``columns``, each with its rank, similarity and first caption."""
    for start in range(0, len(hits), columns):
        cells = st.columns(columns)
        for rank, (cell, hit) in enumerate(zip(cells, hits[start:start + columns]), start + 1):
            with cell:
                if hit.thumbnail:
                    st.image(tile(hit.thumbnail), width="stretch")
                else:
                    st.caption(f"(no thumbnail for {literal(hit.key)})")
                st.markdown(f"**{rank}.** similarity `{shown_value(hit):.3f}`")
                st.text(one_line(hit.captions[0] if hit.captions else hit.key))


def caption_list(hits: Sequence[TextHit]) -> None:
    """Nearest captions of the collection, best first, with similarities (plain text, one line each)."""
    lines = [f"{rank}. {one_line(hit.text)} — {shown_value(hit):.3f}" for rank, hit in enumerate(hits, 1)]
    st.text("\n".join(lines) if lines else "no captions in the index")


def word_list(hits: Sequence[TextHit]) -> None:
    """Nearest vocabulary words, best first, with cosine similarities (plain text)."""
    st.text(" · ".join(f"{one_line(hit.text)} {shown_value(hit):.2f}" for hit in hits) or "no vocabulary")


def service_card(url: str, info: dict) -> str:
    """Markdown lines describing the model and index behind a search API (its ``GET /info``)."""
    model, index = info.get("model", {}), info.get("index", {})
    images, captions = index.get("images", {}), index.get("captions", {})
    params = ", ".join(f"{name} {value}" for name, value in (images.get("search_params") or {}).items())
    return "\n".join([
        f"- **search API**: {literal(url)}",
        f"- **backbone**: {literal(str(model.get('backbone')))} + {literal(str(model.get('projection')))} projection",
        f"- **word vectors**: {literal(str(model.get('text_vectors')))}, {model.get('text_dim')}-d",
        f"- **loss**: {literal(str(model.get('loss')))}, epoch {model.get('epoch')}",
        f"- **index**: {literal(str(images.get('kind')))}{f' ({literal(params)})' if params else ''}, "
        f"{literal(str(images.get('metric')))}, {images.get('count', 0):,} images, {captions.get('count', 0):,} "
        f"captions, {index.get('words', 0):,} words",
    ])


def model_card(searcher: Searcher, checkpoint: str) -> str:
    """Markdown lines describing the model, word vectors, loss and index in use."""
    config = searcher.model.config
    images = searcher.images
    params = ", ".join(f"{name} {value}" for name, value in images.search_params.items())
    lines = [
        f"- **backbone**: {config.model.backbone} + {config.model.projection} projection"
        f"{' (frozen)' if config.model.freeze_backbone else ''}",
        f"- **word vectors**: {config.text.vectors}, {searcher.model.caption_encoder.dim}-d, "
        f"{config.text.weighting} of words",
        f"- **loss**: {describe_loss(config.loss)}",
        f"- **checkpoint**: {literal(checkpoint)}, epoch {searcher.model.epoch}",
        f"- **index**: {images.kind}{f' ({params})' if params else ''}, {images.metric}, "
        f"{len(images):,} images, {len(searcher.captions):,} captions, {len(searcher.words):,} words",
    ]
    return "\n".join(lines)
