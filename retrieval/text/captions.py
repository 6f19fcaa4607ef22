"""Captions and queries to vectors: tokenizer, (tf-idf) weighted mean of word vectors, OOV
accounting and word arithmetic ("dog - grass + snow", grammar in ``retrieval.text.query``)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse
from gensim.models import KeyedVectors

from retrieval.errors import ConfigError, DataError, QueryError
from retrieval.text.query import parse_arithmetic

WEIGHTINGS = ("mean", "tfidf")

_CONTRACTIONS = (
    (re.compile(r"\bcan['’]t\b"), "can not"),
    (re.compile(r"\bwon['’]t\b"), "will not"),
    (re.compile(r"n['’]t\b"), " not"),
)
_CLITIC = re.compile(r"['’](?:s|re|ve|ll|d|m)\b")
_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into runs of letters and digits.

    GloVe 6B was built with the Stanford tokenizer, which splits clitics off ("man's" ->
    "man" "'s", "don't" -> "do" "n't"); so here "n't" becomes "not" (can't -> can not, won't ->
    will not), the clitics 's 're 've 'll 'd 'm are dropped (they would otherwise leave the
    noise tokens "s", "re", ... behind) and every other apostrophe, hyphen or punctuation mark
    splits words. Hyphens are not kept: only some compounds are GloVe words ("t-shirt",
    "x-ray" but not "hot-dog", 33k of 400k entries), while the parts nearly always are, and a
    vocabulary-independent rule keeps caption-trained Word2Vec consistent with queries.
    Example: ``tokenize("A man's T-shirt, isn't it?") == ["a", "man", "t", "shirt", "is", "not", "it"]``.
    """
    text = text.lower()
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    return _WORD.findall(_CLITIC.sub(" ", text))


@dataclass
class OOVStats:
    """Out-of-vocabulary accounting for a batch of captions (unknown tokens are dropped)."""

    total_tokens: int = 0
    unknown_tokens: int = 0
    unknown_words: Counter = field(default_factory=Counter)
    empty_captions: list[str] = field(default_factory=list)
    captions: int = 0

    def summary(self, top: int = 5) -> str:
        """One line, e.g. "12/340 tokens unknown (3.5%), 1/50 captions with no known word; ..."."""
        share = 100.0 * self.unknown_tokens / self.total_tokens if self.total_tokens else 0.0
        line = (
            f"{self.unknown_tokens}/{self.total_tokens} tokens unknown ({share:.1f}%), "
            f"{len(self.empty_captions)}/{self.captions} captions with no known word"
        )
        if self.unknown_words:
            common = ", ".join(f"{word!r}({n})" for word, n in self.unknown_words.most_common(top))
            line += f"; most common unknown: {common}"
        return line


class TextEncoder:
    """Single captions, queries and word arithmetic on top of a subclass's ``encode_batch``.

    Subclasses provide ``dim``, ``normalize``, ``encode_batch(texts) -> (vectors, known mask, stats)``,
    ``_no_vector_error(text, where)`` (the error for a text that gives no vector), ``fingerprint()``
    (what made the vectors, for index stamps) and ``state_dict()`` (what a checkpoint saves to rebuild
    the encoder; ``retrieval.targets`` rebuilds it).
    """

    normalize: bool

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def encode_batch(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, OOVStats]:
        raise NotImplementedError

    def _no_vector_error(self, text: str, where: str) -> QueryError:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short digest of what the vectors are made of (an index built with others is refused)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The encoder's own settings as a JSON-serialisable dict (not its vectors or model weights)."""
        raise NotImplementedError

    def encode(self, caption: str) -> np.ndarray | None:
        """The float32 vector of one caption, or None when it gives no vector."""
        vectors, mask, _ = self.encode_batch([caption])
        return vectors[0] if mask[0] else None

    def encode_query(self, text: str) -> np.ndarray:
        """Like ``encode`` but raises ``QueryError`` when the query gives no vector."""
        vector = self.encode(text)
        if vector is None:
            raise self._no_vector_error(text, f"query {text!r}")
        return vector

    def encode_arithmetic(self, query: str) -> np.ndarray:
        """The vector of any query: a caption, or the signed sum of its terms ("dog - grass + snow").

        ``parse_arithmetic`` splits the query. A single positive term is encoded exactly like a
        caption (``encode_query``). Otherwise each term is encoded like a caption (unit length if
        ``normalize``) and, with ``normalize``, the sum is L2-normalized too. Raises ``QueryError``
        for a query the grammar refuses, a term that gives no vector or a sum that cancels to zero
        ("dog - dog").
        """
        terms = parse_arithmetic(query)
        if len(terms) == 1 and terms[0][0] == 1:
            return self.encode_query(terms[0][1])
        vectors, known, _ = self.encode_batch([term for _, term in terms])
        total = np.zeros(vectors.shape[1], dtype=np.float64)
        for (sign, term), vector, ok in zip(terms, vectors, known):
            if not ok:
                raise self._no_vector_error(term, f"term {term!r} of query {query!r}")
            total += sign * vector.astype(np.float64)
        norm = float(np.linalg.norm(total))
        if norm < 1e-6:
            raise QueryError(f"query {query!r} cancels out to a zero vector")
        if self.normalize:
            total /= norm
        return total.astype(np.float32)


class CaptionEncoder(TextEncoder):
    """Maps text to the weighted mean of its known words' vectors.

    ``weighting="mean"``: every known token occurrence has weight 1 (repeats count).
    ``weighting="tfidf"``: word w of a caption has weight tf(w) * idf(w), tf = occurrences of w
    in the caption; vector = sum_w tf*idf*v_w / sum_w tf*idf over known words. idf comes from
    ``fit_idf`` (or ``idf=``); words it does not list get the largest idf it holds.
    Unknown tokens are dropped and counted. ``normalize=True`` L2-normalizes the result.
    """

    def __init__(
        self,
        vectors: KeyedVectors,
        weighting: str = "mean",
        idf: dict[str, float] | None = None,
        normalize: bool = False,
    ) -> None:
        if weighting not in WEIGHTINGS:
            valid = ", ".join(WEIGHTINGS)
            raise ConfigError(f"unknown caption weighting {weighting!r}; choose one of: {valid}")
        self.vectors = vectors
        self.weighting = weighting
        self.normalize = bool(normalize)
        self.idf: dict[str, float] | None = None
        if idf is not None:
            self._set_idf(idf)
        self._fingerprint: str | None = None

    @property
    def dim(self) -> int:
        return int(self.vectors.vector_size)

    def _set_idf(self, idf: dict[str, float]) -> None:
        self.idf = {str(word): float(value) for word, value in idf.items()}
        self._idf_default = max(self.idf.values(), default=1.0)

    def fit_idf(self, corpus: Iterable[str]) -> None:
        """Smooth idf as in scikit-learn: ln((1 + N) / (1 + df)) + 1, df = captions containing w."""
        df: Counter = Counter()
        n = 0
        for caption in corpus:
            df.update(list(dict.fromkeys(tokenize(caption))))  # distinct words, in order
            n += 1
        if n == 0:
            raise DataError("cannot fit idf weights: the caption corpus is empty")
        self._set_idf({word: math.log((1 + n) / (1 + count)) + 1.0 for word, count in df.items()})

    def _weigh(self, tokens: list[str]) -> tuple[list[int], list[float], list[str]]:
        """Vocabulary rows and weights of the known words in ``tokens``, and the unknown tokens."""
        key_to_index = self.vectors.key_to_index
        known = Counter(t for t in tokens if t in key_to_index)
        unknown = [t for t in tokens if t not in key_to_index]
        rows = [key_to_index[word] for word in known]
        if self.weighting == "tfidf":
            if self.idf is None:
                raise ConfigError(
                    "caption weighting 'tfidf' needs idf weights: call fit_idf(captions) or pass idf="
                )
            weights = [tf * self.idf.get(word, self._idf_default) for word, tf in known.items()]
        else:
            weights = [float(tf) for tf in known.values()]
        return rows, weights, unknown

    def encode_batch(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, OOVStats]:
        """Encode captions: (n, dim) float32 vectors, bool mask of captions with a known word, stats.

        Rows of captions without any known word are zero and False in the mask; the stats
        list them in ``empty_captions``.
        """
        stats = OOVStats(captions=len(captions))
        mask = np.zeros(len(captions), dtype=bool)
        indptr, indices, data = [0], [], []
        for i, caption in enumerate(captions):
            tokens = tokenize(caption)
            rows, weights, unknown = self._weigh(tokens)
            stats.total_tokens += len(tokens)
            stats.unknown_tokens += len(unknown)
            stats.unknown_words.update(unknown)
            total = sum(weights)
            if rows and total > 0:
                mask[i] = True
                indices.extend(rows)
                data.extend(w / total for w in weights)
            else:
                stats.empty_captions.append(caption)
            indptr.append(len(indices))
        # One sparse (captions x vocabulary) weight matrix times the vectors: fast for 100k+ captions.
        weights = scipy.sparse.csr_matrix(
            (np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
            shape=(len(captions), len(self.vectors)),
        )
        out = np.asarray(weights @ self.vectors.vectors, dtype=np.float32).reshape(len(captions), self.dim)
        if self.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = out / np.where(norms > 0, norms, 1.0)
        return out, mask, stats

    def _no_vector_error(self, text: str, where: str) -> QueryError:
        return QueryError(f"no known word in {where}: {_unknown_words(text)}")

    def fingerprint(self) -> str:
        """The word vectors' fingerprint (``vectors_fingerprint``), computed once."""
        if self._fingerprint is None:
            from retrieval.text.vectors import vectors_fingerprint  # vectors.py imports this module

            self._fingerprint = vectors_fingerprint(self.vectors)
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """Weighting, normalization and idf as a JSON-serializable dict (vectors not included)."""
        return {
            "weighting": self.weighting,
            "normalize": self.normalize,
            "idf": None if self.idf is None else dict(self.idf),
        }

    @classmethod
    def from_state_dict(cls, vectors: KeyedVectors, state: dict[str, Any]) -> CaptionEncoder:
        """Rebuild an encoder saved with ``state_dict`` on top of ``vectors``."""
        if not isinstance(state, dict) or "weighting" not in state:
            raise ConfigError("caption encoder state must be a dict with a 'weighting' field")
        idf = state.get("idf")
        if idf is not None and not isinstance(idf, dict):
            raise ConfigError("caption encoder state field 'idf' must be a dict of word -> float or null")
        normalize = bool(state.get("normalize", False))
        return cls(vectors, weighting=state["weighting"], idf=idf, normalize=normalize)


def _unknown_words(text: str) -> str:
    """"unknown words: a, b" for the tokens of ``text``, or a note that it has no words."""
    words = list(dict.fromkeys(tokenize(text)))
    return f"unknown words: {', '.join(words)}" if words else "it contains no words"
