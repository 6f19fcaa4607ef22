"""Assemble the frozen text side of a run: word vectors plus the caption encoder, or a sentence encoder.

The word vectors are loaded (or, for ``word2vec-captions``, trained once on the training captions
and saved in the run directory); they are never updated by image training. With
``text.vectors: sentence-transformer`` a frozen transformer (``text.vectors_path``, default: the
packaged all-MiniLM-L6-v2) is both the "vectors" and the caption encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from retrieval.config import TextConfig
from retrieval.errors import ConfigError
from retrieval.rundir import RunDir
from retrieval.text import CaptionEncoder, load_word_vectors, save_word_vectors, train_caption_word2vec
from retrieval.text import vectors_fingerprint as word_vectors_fingerprint
from retrieval.text.sentence import SENTENCE_KIND, SentenceEncoder, packaged_minilm_dir


def load_sentence_encoder(text: TextConfig) -> SentenceEncoder:
    """The frozen sentence encoder of ``text`` (``vectors_path`` or the packaged MiniLM)."""
    if text.weighting != "mean":
        raise ConfigError(f"text.weighting: {text.weighting!r} does not apply to text.vectors={SENTENCE_KIND}; "
                          "use mean")
    folder = text.vectors_path or packaged_minilm_dir()
    return SentenceEncoder(folder, normalize=True if text.normalize else None)


def load_vectors(text: TextConfig, run_dir: str | Path, train_captions: Sequence[str] | None = None):
    """Return the run's KeyedVectors (``word2vec-captions`` trains them once and reuses the saved file),
    or for ``sentence-transformer`` the ``SentenceEncoder``."""
    if text.vectors == SENTENCE_KIND:
        return load_sentence_encoder(text)
    if text.vectors != "word2vec-captions":
        return load_word_vectors(text.vectors, text.vectors_path)
    saved = RunDir(run_dir).caption_word2vec
    if saved.exists():
        return load_word_vectors("gensim", str(saved))
    if train_captions is None:
        raise FileNotFoundError(f"{saved} is missing; train the model first")
    vectors = train_caption_word2vec(list(train_captions), vector_size=text.word2vec_dim,
                                     epochs=text.word2vec_epochs)
    save_word_vectors(vectors, saved)
    return vectors


def build_caption_encoder(text: TextConfig, vectors, train_captions: Sequence[str]) -> CaptionEncoder | SentenceEncoder:
    """A caption encoder with the configured weighting (tf-idf is fitted on the training captions);
    a ``SentenceEncoder`` from ``load_vectors`` is its own caption encoder."""
    if isinstance(vectors, SentenceEncoder):
        return vectors
    encoder = CaptionEncoder(vectors, weighting=text.weighting, normalize=text.normalize)
    if text.weighting == "tfidf":
        encoder.fit_idf(train_captions)
    return encoder


def restore_caption_encoder(vectors, state: dict[str, Any]) -> CaptionEncoder | SentenceEncoder:
    """The caption encoder a checkpoint saved (its ``state_dict``), over what ``load_vectors`` returned."""
    if isinstance(vectors, SentenceEncoder):
        return SentenceEncoder.from_state_dict(vectors, state)
    return CaptionEncoder.from_state_dict(vectors, state)


def vectors_fingerprint(vectors) -> str:
    """The identity of the text side for index stamps: word vectors or a sentence encoder."""
    if isinstance(vectors, SentenceEncoder):
        return vectors.fingerprint()
    return word_vectors_fingerprint(vectors)
