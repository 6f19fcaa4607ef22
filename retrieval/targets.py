"""The frozen text side of a run, registered by its ``text.vectors`` name in ``TEXT_SIDES``.

A text side loads what it is made of (word vectors, a sentence transformer), builds the run's
caption encoder from the training captions and rebuilds it from a checkpoint's saved state. Every
caption encoder it returns is a ``TextEncoder``: ``encode``, ``encode_query``,
``encode_arithmetic``, ``fingerprint`` (the identity stamped into indexes) and ``state_dict``.

* word vectors (``glove-6b-50d``, ``glove-text``, ``word2vec-binary``, ``word2vec-text``, ``gensim``):
  loaded from ``text.vectors_path`` (or the packaged GloVe); a caption is the (tf-idf) weighted
  mean of its words' vectors.
* ``word2vec-captions``: word vectors trained once on the training captions and saved in the run
  directory, then used as above.
* ``sentence-transformer``: a frozen transformer (``text.vectors_path``, default: the packaged
  all-MiniLM-L6-v2) maps each caption to one vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gensim.models import KeyedVectors

from retrieval.config import TextConfig
from retrieval.errors import ConfigError, DataError
from retrieval.registry import Registry
from retrieval.rundir import RunDir
from retrieval.text import (
    VECTOR_KINDS,
    CaptionEncoder,
    TextEncoder,
    load_word_vectors,
    save_word_vectors,
    train_caption_word2vec,
)
from retrieval.text.sentence import SENTENCE_KIND, SentenceEncoder, packaged_minilm_dir


class TextSide:
    """One kind of text side for the ``text`` section of a run whose folder is ``run_dir``."""

    def __init__(self, text: TextConfig, run_dir: str | Path) -> None:
        self.text = text
        self.run_dir = Path(run_dir)

    def load(self) -> Any:
        """Load (and cache per process, where the kind does) what the encoder is made of."""
        raise NotImplementedError

    def build(self, train_captions: Sequence[str]) -> TextEncoder:
        """The run's caption encoder, fitted on the training captions where the kind needs them."""
        raise NotImplementedError

    def restore(self, state: dict[str, Any]) -> TextEncoder:
        """The caption encoder a checkpoint saved (its ``state_dict``)."""
        raise NotImplementedError


TEXT_SIDES: Registry[TextSide] = Registry("text side (text.vectors)")


class WordVectorSide(TextSide):
    """Frozen word vectors in the format ``text.vectors`` names; captions are weighted means of word vectors."""

    def load(self) -> KeyedVectors:
        return load_word_vectors(self.text.vectors, self.text.vectors_path)

    def build(self, train_captions: Sequence[str]) -> TextEncoder:
        encoder = CaptionEncoder(self.load(), weighting=self.text.weighting, normalize=self.text.normalize)
        if self.text.weighting == "tfidf":
            encoder.fit_idf(train_captions)
        return encoder

    def restore(self, state: dict[str, Any]) -> TextEncoder:
        return CaptionEncoder.from_state_dict(self.load(), state)


for _format in VECTOR_KINDS:
    TEXT_SIDES.register(_format)(WordVectorSide)


@TEXT_SIDES.register("word2vec-captions")
class CaptionWord2VecSide(WordVectorSide):
    """Word2Vec trained once on the training captions, saved as ``word2vec-captions.kv`` in the run."""

    @property
    def saved(self) -> Path:
        return RunDir(self.run_dir).caption_word2vec

    def load(self) -> KeyedVectors:
        if not self.saved.exists():
            raise DataError(f"{self.saved} is missing; train the model first")
        return load_word_vectors("gensim", str(self.saved))

    def build(self, train_captions: Sequence[str]) -> TextEncoder:
        if not self.saved.exists():
            vectors = train_caption_word2vec(list(train_captions), vector_size=self.text.word2vec_dim,
                                             epochs=self.text.word2vec_epochs)
            save_word_vectors(vectors, self.saved)
        return super().build(train_captions)


@TEXT_SIDES.register(SENTENCE_KIND)
class SentenceSide(TextSide):
    """A frozen sentence transformer is the caption encoder (mean weighting only)."""

    def _folder(self) -> Path:
        if self.text.weighting != "mean":
            raise ConfigError(f"text.weighting: {self.text.weighting!r} does not apply to "
                              f"text.vectors={SENTENCE_KIND}; use mean")
        return Path(self.text.vectors_path) if self.text.vectors_path else packaged_minilm_dir()

    def load(self) -> SentenceEncoder:
        return SentenceEncoder(self._folder(), normalize=True if self.text.normalize else None)

    def build(self, train_captions: Sequence[str]) -> TextEncoder:
        return self.load()

    def restore(self, state: dict[str, Any]) -> TextEncoder:
        return SentenceEncoder.from_state_dict(self._folder(), state)


def text_side(text: TextConfig, run_dir: str | Path) -> TextSide:
    """The registered text side of ``text.vectors`` (unknown name → one-line ConfigError)."""
    return TEXT_SIDES.create(text.vectors, text=text, run_dir=run_dir)


def build_caption_encoder(text: TextConfig, run_dir: str | Path, train_captions: Sequence[str]) -> TextEncoder:
    """The caption encoder of a new run (``word2vec-captions`` trains and saves its vectors once)."""
    return text_side(text, run_dir).build(train_captions)


def restore_caption_encoder(text: TextConfig, run_dir: str | Path, state: dict[str, Any]) -> TextEncoder:
    """The caption encoder a run's checkpoint saved, rebuilt over the run's text side."""
    return text_side(text, run_dir).restore(state)
