"""Assemble the frozen text side of a run: word vectors plus the caption encoder.

The word vectors are loaded (or, for ``word2vec-captions``, trained once on the training captions
and saved in the run directory); they are never updated by image training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from retrieval.config import TextConfig
from retrieval.text import CaptionEncoder, load_word_vectors, save_word_vectors, train_caption_word2vec

CAPTION_WORD2VEC_FILE = "word2vec-captions.kv"


def load_vectors(text: TextConfig, run_dir: str | Path, train_captions: Sequence[str] | None = None):
    """Return the run's KeyedVectors; ``word2vec-captions`` trains them once and reuses the saved file."""
    if text.vectors != "word2vec-captions":
        return load_word_vectors(text.vectors, text.vectors_path)
    saved = Path(run_dir) / CAPTION_WORD2VEC_FILE
    if saved.exists():
        return load_word_vectors("gensim", str(saved))
    if train_captions is None:
        raise FileNotFoundError(f"{saved} is missing; train the model first")
    vectors = train_caption_word2vec(list(train_captions), vector_size=text.word2vec_dim,
                                     epochs=text.word2vec_epochs)
    save_word_vectors(vectors, saved)
    return vectors


def build_caption_encoder(text: TextConfig, vectors, train_captions: Sequence[str]) -> CaptionEncoder:
    """A caption encoder with the configured weighting (tf-idf is fitted on the training captions)."""
    encoder = CaptionEncoder(vectors, weighting=text.weighting, normalize=text.normalize)
    if text.weighting == "tfidf":
        encoder.fit_idf(train_captions)
    return encoder
