"""The frozen text side: word vectors (gensim KeyedVectors) and caption/query encoding."""

from retrieval.text.captions import (
    WEIGHTINGS,
    CaptionEncoder,
    OOVStats,
    TextEncoder,
    tokenize,
)
from retrieval.text.query import join_terms, parse_arithmetic
from retrieval.text.vectors import (
    VECTOR_KINDS,
    load_word_vectors,
    save_word_vectors,
    train_caption_word2vec,
    vectors_fingerprint,
)

__all__ = [
    "VECTOR_KINDS",
    "WEIGHTINGS",
    "CaptionEncoder",
    "OOVStats",
    "TextEncoder",
    "join_terms",
    "load_word_vectors",
    "parse_arithmetic",
    "save_word_vectors",
    "tokenize",
    "train_caption_word2vec",
    "vectors_fingerprint",
]
