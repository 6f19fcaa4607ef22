"""Retrieval metrics (R@K, P@K, mAP, median/mean rank) computed in chunks, never on the full matrix.

Relevance: item ``j`` is relevant to query ``i`` iff ``query_labels[i] == item_labels[j]``; any
number of relevant items per query is allowed. A query with no relevant item is an error.

Tie policy (pessimistic, deterministic): items are ranked by score, higher first; among items with
equal scores every non-relevant item is ranked ahead of every relevant one. The order among tied
relevant items does not matter, since they occupy the same consecutive ranks either way. So the
m-th best relevant item (1-based) has rank ``m + #{non-relevant items scoring >= its score}``, and
R@K, P@K, mAP and the ranks all follow from these ranks; no top-K list is kept.

Algorithm: queries are processed in chunks. For a chunk, the scores of its relevant pairs are
gathered first and sorted per query; then items are streamed in chunks, relevant entries of each
score block are masked to -inf, and for every relevant score we count the non-relevant items that
score at least as high (broadcast comparisons when a query has few relevant items, otherwise the
block is sorted per row as order-preserving integer keys and searched with ``searchsorted``).
Cost: O(q*n*d) for scores, O(q*n*min(r, log n)) for counting (r = most relevant items of one
query), O(q*r*d) for gathering and O(q*r*log n) per item chunk for searching. Working memory
stays within about ``max_bytes`` (at least one query row, one query's relevant pairs and the item
rows of one label); inputs that are not float32 C-contiguous (or any input, for ``cosine``) are
also copied once. Scores are float32: pairs whose scores differ only by float32 rounding may be
ordered either way (the metrics then differ from a float64 reference by such swaps only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.distances import Distance, distance_named
from retrieval.errors import ConfigError, DataError

DEFAULT_MAX_BYTES = 256 * 2**20
_CELL_BYTES = (12, 24)  # working bytes per score-block cell (broadcast, searchsorted counting)
_PAIR_BYTES = 64  # working bytes per gathered relevant pair
_FEW_RELEVANT = 8  # up to this many relevant items per query: broadcast counting
_GROUPED_PAIRS = 64  # at least this many relevant pairs per label of a query chunk: score them by label


@dataclass(frozen=True)
class RetrievalMetrics:
    """Metrics averaged over queries; recall/precision are fractions in [0, 1], ranks are 1-based."""

    recall: dict[int, float]
    precision: dict[int, float]
    mean_average_precision: float
    median_rank: float
    mean_rank: float
    num_queries: int

    def as_dict(self) -> dict[str, float]:
        """Flat view: ``R@K``, ``P@K``, ``mAP``, ``MedR``, ``MeanR`` and ``num_queries``."""
        out: dict[str, float] = {f"R@{k}": v for k, v in self.recall.items()}
        out.update({f"P@{k}": v for k, v in self.precision.items()})
        out.update(mAP=self.mean_average_precision, MedR=self.median_rank, MeanR=self.mean_rank)
        out["num_queries"] = self.num_queries
        return out



def retrieval_metrics(
    queries: Any,
    items: Any,
    query_labels: Any,
    item_labels: Any,
    *,
    ks: Sequence[int] = (1, 5, 10),
    distance: Distance | str = "l2",
    query_chunk: int | None = None,
    item_chunk: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> RetrievalMetrics:
    """Rank ``items`` (n, d) for every row of ``queries`` (q, d) and average the metrics.

    ``distance`` (a :class:`~retrieval.distances.Distance` or its name) ranks the items: both sides
    are mapped into its search space and scored as its faiss index would (``l2`` and ``squared-l2``:
    score = -squared distance; ``cosine``: inner product of unit vectors; ``ip``: inner product).
    Chunk sizes are derived from ``max_bytes`` unless ``query_chunk``/``item_chunk`` are given.
    """
    ks = _check_ks(ks)
    distance = distance_named(distance)
    qx, xx = _as_matrix(queries, "queries"), _as_matrix(items, "items")
    if qx.shape[1] != xx.shape[1]:
        raise DataError(f"queries have dimension {qx.shape[1]} but items have {xx.shape[1]}")
    qlab = _as_labels(query_labels, len(qx), "query_labels")
    xlab = _as_labels(item_labels, len(xx), "item_labels")
    if distance.unit_length:
        _check_nonzero(qx, "queries")
        _check_nonzero(xx, "items")
        qx, xx = distance.to_search_space(qx), distance.to_search_space(xx)
    qn, xn = _squared_norms(qx), _squared_norms(xx)
    if 4.0 * max(float(qn.max()), float(xn.max())) > 1e37:
        raise DataError("embeddings are too large: scores would overflow float32")
    index = _LabelIndex(xlab)
    r = index.counts_for(qlab)
    if (missing := int(np.count_nonzero(r == 0))) > 0:
        raise DataError(f"{missing} of {len(qlab)} queries have no relevant item (no item shares their label)")
    qc, ic = _chunk_sizes(len(qx), len(xx), int(r.max()), max_bytes, query_chunk, item_chunk)
    if distance.faiss_metric != "l2":  # without norms _scores gives q.x; with them 2q.x - |q|^2 - |x|^2 = -|q - x|^2
        qn = xn = None
    first, ap = np.empty(len(qx)), np.empty(len(qx))
    hits = {k: np.empty(len(qx)) for k in ks}
    for q0 in range(0, len(qx), qc):
        sl = slice(q0, q0 + qc)
        block = _Block(qx[sl], None if qn is None else qn[sl], qlab[sl], r[sl])
        block.gather(xx, xn, index, max_bytes)
        for i0 in range(0, len(xx), ic):
            js = slice(i0, i0 + ic)
            block.count(xx[js], None if xn is None else xn[js], xlab[js])
        first[sl], ap[sl], chunk_hits = block.stats(ks)
        for k in ks:
            hits[k][sl] = chunk_hits[k]
    return RetrievalMetrics(
        recall={k: float(np.mean(first <= k)) for k in ks},
        precision={k: float(np.mean(hits[k]) / k) for k in ks},
        mean_average_precision=float(np.mean(ap)),
        median_rank=float(np.median(first)),
        mean_rank=float(np.mean(first)),
        num_queries=len(qx),
    )


class _LabelIndex:
    """Items grouped by label: ``order[start:start + count]`` are the items carrying one label."""

    def __init__(self, labels: np.ndarray) -> None:
        self.order = np.argsort(labels, kind="stable")
        self.labels, self.starts, self.sizes = np.unique(labels[self.order], return_index=True, return_counts=True)

    def _find(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(self.labels, labels), len(self.labels) - 1)
        return pos, self.labels[pos] == labels

    def counts_for(self, labels: np.ndarray) -> np.ndarray:
        """Number of items carrying each label (0 for unknown labels)."""
        pos, found = self._find(labels)
        return np.where(found, self.sizes[pos], 0)

    def items_of(self, label: int) -> np.ndarray:
        """Items carrying ``label`` (which must be present)."""
        j = int(np.searchsorted(self.labels, label))
        return self.order[self.starts[j] : self.starts[j] + self.sizes[j]]

    def pairs(self, labels: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) of every relevant pair, row-major; every label must be present."""
        pos, _ = self._find(labels)
        rows = np.repeat(np.arange(len(labels)), counts)
        offsets = np.cumsum(counts) - counts
        within = np.arange(int(counts.sum())) - np.repeat(offsets, counts)
        return rows, self.order[np.repeat(self.starts[pos], counts) + within]


class _Block:
    """One chunk of queries: its relevant scores (sorted ascending per query) and their counts."""

    def __init__(self, q: np.ndarray, qn: np.ndarray | None, labels: np.ndarray, r: np.ndarray) -> None:
        self.q, self.qn, self.labels, self.r = q, qn, labels, r
        self.offsets = np.concatenate(([0], np.cumsum(r)))
        self.rows = np.repeat(np.arange(len(r)), r)

    def gather(self, x: np.ndarray, xn: np.ndarray | None, index: _LabelIndex, max_bytes: int) -> None:
        """Score every relevant pair (same float32 formula as ``count``) and sort per query."""
        labels, inverse = np.unique(self.labels, return_inverse=True)
        if len(self.rows) >= _GROUPED_PAIRS * len(labels):
            t = self._gather_by_label(x, xn, index, labels, inverse)
        else:
            t = self._gather_pairs(x, xn, index, max_bytes)
        t += np.float32(0.0)  # turns -0.0 into +0.0, which orders (and ties) like 0.0
        keys = np.sort(_ordered_keys(t).astype(np.uint64) | (self.rows.astype(np.uint64) << np.uint64(32)))
        self.keys, self.t = keys, _keys_to_floats(keys)  # by query, then score ascending
        self.ahead = np.zeros(len(t), dtype=np.int64)  # non-relevant items scoring >= t
        self.padded: np.ndarray | None = None  # (queries, r_max) thresholds, +inf padded
        if self.r.max() <= _FEW_RELEVANT:
            self.valid = np.arange(self.r.max()) < self.r[:, None]
            self.padded = np.full(self.valid.shape, np.inf, dtype=np.float32)
            self.padded[self.valid] = self.t

    def _gather_pairs(
        self, x: np.ndarray, xn: np.ndarray | None, index: _LabelIndex, max_bytes: int
    ) -> np.ndarray:
        """Relevant scores pair by pair (few pairs per label), in blocks of rows gathered on the fly."""
        rows, cols = index.pairs(self.labels, self.r)  # rows == self.rows
        t = np.empty(len(rows), dtype=np.float32)
        step = max(1, max_bytes // (8 * (x.shape[1] + 8)))
        for p0 in range(0, len(rows), step):
            pr, pc = rows[p0 : p0 + step], cols[p0 : p0 + step]
            dots = np.einsum("pd,pd->p", self.q[pr], x[pc])
            if xn is not None and self.qn is not None:
                dots *= 2
                dots -= self.qn[pr]
                dots -= xn[pc]
            t[p0 : p0 + step] = dots
        return t

    def _gather_by_label(
        self, x: np.ndarray, xn: np.ndarray | None, index: _LabelIndex, labels: np.ndarray, inverse: np.ndarray
    ) -> np.ndarray:
        """Relevant scores one label at a time: (queries with it) x (items with it) score blocks."""
        t = np.empty(len(self.rows), dtype=np.float32)
        by_label = np.argsort(inverse, kind="stable")
        bounds = np.concatenate(([0], np.cumsum(np.bincount(inverse))))
        for j, label in enumerate(labels):
            rows = by_label[bounds[j] : bounds[j + 1]]
            items = index.items_of(label)
            qn = None if self.qn is None else self.qn[rows]
            block = _scores(self.q[rows], qn, x[items], None if xn is None else xn[items])
            t[self.offsets[rows][:, None] + np.arange(len(items))] = block
        return t

    def count(self, x: np.ndarray, xn: np.ndarray | None, labels: np.ndarray) -> None:
        """Add, for each relevant score, the non-relevant items of this item chunk scoring >= it."""
        s = _scores(self.q, self.qn, x, xn)
        s[self.labels[:, None] == labels[None, :]] = -np.inf
        if self.padded is not None:
            counts = np.empty(self.padded.shape, dtype=np.int64)
            for m in range(self.padded.shape[1]):
                counts[:, m] = np.count_nonzero(s >= self.padded[:, m : m + 1], axis=1)
            self.ahead += counts[self.valid]
            return
        s += np.float32(0.0)
        keys = _ordered_keys(s)  # scores -> sortable uint32, then row-major sorted uint64 keys
        del s
        keys.sort(axis=1)
        keys = keys.astype(np.uint64)
        keys |= np.arange(len(keys), dtype=np.uint64)[:, None] << np.uint64(32)
        below = np.searchsorted(keys.ravel(), self.keys, side="left")  # items of rows <= own, < t
        self.ahead += (self.rows + 1) * keys.shape[1] - below

    def stats(self, ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        """Per query: rank of the first relevant item, average precision, relevant items in top K."""
        m = self.offsets[self.rows + 1] - np.arange(len(self.t))  # 1-based position among relevant
        rank = m + self.ahead
        first = rank[self.offsets[1:] - 1]
        # average precision (mAP as in TREC / Manning et al. 8.4): mean over relevant of m / rank
        ap = np.add.reduceat(m / rank, self.offsets[:-1]) / self.r
        hits = {k: np.add.reduceat((rank <= k).astype(np.int64), self.offsets[:-1]) for k in ks}
        return first, ap, hits


def chance_recall(k: int, num_items: int, num_relevant_per_query: int = 1) -> float:
    """Expected R@K of a uniformly random ranking: ``1 - C(n - r, k) / C(n, k)``."""
    n, r = int(num_items), int(num_relevant_per_query)
    if k < 1 or n < 1 or not 0 <= r <= n:
        raise ConfigError(f"chance_recall needs k >= 1 and 0 <= r <= n; got k={k}, n={n}, r={r}")
    k = min(int(k), n)
    return 1.0 - math.comb(n - r, k) / math.comb(n, k)


def _scores(q: np.ndarray, qn: np.ndarray | None, x: np.ndarray, xn: np.ndarray | None) -> np.ndarray:
    """Score block (higher is better): ``q @ x.T``, or ``-|q - x|^2`` when norms are given."""
    s = q @ x.T
    if qn is not None and xn is not None:
        s *= 2
        s -= qn[:, None]
        s -= xn[None, :]
    return s


def _ordered_keys(s: np.ndarray) -> np.ndarray:
    """uint32 keys that order like the float32 values (no NaN, no -0.0): flip negatives' bits."""
    bits = np.ascontiguousarray(s, dtype=np.float32).view(np.uint32)
    flip = (bits.view(np.int32) >> 31).view(np.uint32)  # all ones for negatives
    flip |= np.uint32(0x80000000)
    flip ^= bits
    return flip


def _keys_to_floats(keys: np.ndarray) -> np.ndarray:
    """Inverse of ``_ordered_keys`` on the low 32 bits of ``keys``."""
    low = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    negative = low < np.uint32(0x80000000)
    low[negative] = ~low[negative]
    low[~negative] ^= np.uint32(0x80000000)
    return low.view(np.float32)


def _chunk_sizes(
    q: int, n: int, r_max: int, max_bytes: int, query_chunk: int | None, item_chunk: int | None
) -> tuple[int, int]:
    """(queries, items) per block so that a block and a query chunk's pairs fit in ``max_bytes``."""
    for name, value in (("query_chunk", query_chunk), ("item_chunk", item_chunk), ("max_bytes", max_bytes)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    cells = max(1, max_bytes * 3 // 4 // _CELL_BYTES[r_max > _FEW_RELEVANT])
    pair_rows = max(1, max_bytes // 4 // (_PAIR_BYTES * r_max))  # query rows whose pairs fit
    qc = query_chunk or min(q, pair_rows, max(1, math.isqrt(cells)))
    ic = item_chunk or min(n, max(1, cells // qc))
    qc = query_chunk or min(q, pair_rows, max(1, cells // ic))
    return min(qc, q), min(ic, n)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    if not ks or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ks):
        raise ConfigError(f"ks must be positive integers, got {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """A (rows, d) float32 C-contiguous array with finite values (torch tensors are accepted)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"{name} must be a non-empty (rows, dim) matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DataError(f"{name} contains NaN or infinite values")
    return a


def _as_labels(x: Any, length: int, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.shape != (length,) or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{name} must be {length} integers, got {a.dtype} array of shape {a.shape}")
    return a.astype(np.int64, copy=False)


def _check_nonzero(x: np.ndarray, name: str) -> None:
    if (zero := int(np.count_nonzero(~x.any(axis=1)))) > 0:
        raise DataError(f"{name}: {zero} zero vectors have no cosine similarity")


def _squared_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)
