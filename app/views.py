"""Streamlit building blocks of the app: result grids, text results and the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import streamlit as st

from retrieval.losses import describe_loss
from retrieval.search import ImageHit, Searcher, TextHit

GRID_COLUMNS = 5


def image_grid(hits: Sequence[ImageHit], columns: int = GRID_COLUMNS) -> None:
    """Thumbnails in rows of ``columns``, each with its rank, score and first caption."""
    for start in range(0, len(hits), columns):
        cells = st.columns(columns)
        for rank, (cell, hit) in enumerate(zip(cells, hits[start:start + columns]), start + 1):
            with cell:
                if hit.thumbnail and Path(hit.thumbnail).is_file():
                    st.image(hit.thumbnail)
                else:
                    st.caption(f"(no thumbnail for {hit.key})")
                st.markdown(f"**{rank}.** score `{hit.score:.3f}`")
                st.caption(hit.captions[0] if hit.captions else hit.key)


def caption_list(hits: Sequence[TextHit]) -> None:
    """Nearest captions of the collection, best first, with scores."""
    lines = [f"{rank}. {hit.text} — `{hit.score:.3f}`" for rank, hit in enumerate(hits, 1)]
    st.markdown("\n".join(lines) if lines else "_no captions in the index_")


def word_list(hits: Sequence[TextHit]) -> None:
    """Nearest vocabulary words, best first, with cosine scores."""
    st.markdown(" · ".join(f"**{hit.text}** `{hit.score:.2f}`" for hit in hits) or "_no vocabulary_")


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
        f"- **checkpoint**: {checkpoint}, epoch {searcher.model.epoch}",
        f"- **index**: {images.kind}{f' ({params})' if params else ''}, {images.metric}, "
        f"{len(images):,} images, {len(searcher.captions):,} captions, {len(searcher.words):,} words",
    ]
    return "\n".join(lines)
