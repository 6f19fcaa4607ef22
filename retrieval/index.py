"""One interface over faiss indexes (flat, IVF-Flat, IVF-PQ, HNSW, auto) with metadata and a model stamp.

* ``auto`` chooses the kind from the number of vectors, their dimension and a memory budget
  (``max_memory``), measures recall@10 against exact search on held-out vectors and raises
  nprobe until ``min_recall`` is met (or refuses with a one-line error); where that IVF needs
  many distances per query it also builds HNSW, raises efSearch the same way and keeps the
  cheaper of the two (see :class:`AutoKind`); ``build_info`` and the saved stamp.json record the
  choice and the measured recall.
* :func:`build_index_from_chunks` builds from a re-iterable of arrays (embedding shards) without
  holding all vectors at once: one pass gathers the training sample and the held-out queries, a
  second adds the vectors chunk by chunk; IVF lists can live on disk (``on_disk``).

* ids are insertion positions ``0 .. len(index) - 1``; they never change (append only).
* ``SearchResult.scores``: higher is better (inner product for "ip", *negative squared* L2
  distance for "l2"); rows are sorted best first and never contain the id -1.
* ``stamp`` names the model checkpoint and word vectors that made the vectors; ``load``
  refuses an index whose stamp differs from the expected one.
* Flat and IVF move to the GPU when faiss has GPU support and sees one; HNSW (no faiss GPU
  version) stays on the CPU. Saved files are CPU indexes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import faiss
import numpy as np

from retrieval.errors import ConfigError, DataError, QueryError, one_line_reason
from retrieval.io import atomic_dir
from retrieval.registry import Registry
from retrieval.rundir import INDEX_FILE, METADATA_FILE, STAMP_FILE

METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
AUTO_FLAT_MAX = 50_000  # "auto" builds an exact index below this many items (when it fits the budget)
DEFAULT_MIN_RECALL = 0.95  # recall@10 "auto" tunes its search parameter to reach
RECALL_K = 10  # recall@RECALL_K is what is measured and tuned
RECALL_QUERIES = 1000  # held-out vectors the recall is measured on (at most a tenth of the collection)
TRAIN_POINTS_PER_LIST = 64  # the coarse quantizer trains on about this many sampled vectors per list
PQ_TRAIN_POINTS = 65_536  # product-quantizer codebooks (256 centroids per sub-quantizer) need this many
PQ_NBITS = 8  # bits per sub-quantizer code: pq_m bytes per vector
MIN_MEMORY = 2**20  # the smallest max_memory accepted
ONDISK_LISTS_FILE = "index.ivfdata"  # on-disk inverted lists, beside INDEX_FILE
DEFAULT_HNSW_M = 32
HNSW_EF_CONSTRUCTION = 128  # 40 (faiss default) tops out at recall@10 0.94 on 1M items
DEFAULT_EF_SEARCH = 512  # recall@10 >= 0.95 up to 1M items at d=50 (bench_index)
AUTO_HNSW_MAX = 1_000_000  # "auto" considers HNSW up to this many vectors (its build is ~2x IVF's at 1M)
AUTO_HNSW_MIN_DISTANCES = 4096  # ... when the tuned IVF computes more distances per query than this
AUTO_HNSW_MIN_SCANNED = 0.05  # ... and than this fraction of the collection
HNSW_DISTANCE_COST = 2.0  # an HNSW distance (random access) costs ~2 IVF list-scan distances: 43-60 vs 23-30 ns
MIN_POINTS_PER_LIST = 39  # faiss k-means warns below 39 training points per centroid
MAX_NLIST = 65_536
GPU_MAX_K = 2048  # faiss GPU k-selection limit (k and nprobe)
UseGpu = bool | Literal["auto"]


_MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: int | str) -> int:
    """Bytes of a memory size: an int (bytes) or a string such as "4GB", "512MiB", "1.5 GB"; ConfigError else."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"max_memory must be a size in bytes or a string such as '4GB', got {value!r}")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", value)
        if match is None or match.group(2).lower() not in _MEMORY_UNITS:
            raise ConfigError(f"max_memory must be a size such as '4GB', '512MiB' or a number of bytes, "
                              f"got {value!r}")
        size = int(float(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()])
    else:
        size = value
    if size < MIN_MEMORY:
        raise ConfigError(f"max_memory must be at least 1MiB ({MIN_MEMORY} bytes), got {value!r}")
    return size


def default_memory_budget() -> int:
    """Half the physical memory of this machine: the budget when ``max_memory`` is unset."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):  # not POSIX: assume 8 GB
        return 8 * 10**9


def format_bytes(size: float) -> str:
    """``size`` bytes in words: 1.5 GB, 300 MB, ..."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


class SearchResult(NamedTuple):
    """Top-k results: ``scores`` (q, k) float32, higher is better; ``ids`` (q, k) int64."""

    scores: np.ndarray
    ids: np.ndarray


def default_nlist(n: int) -> int:
    """IVF list count: about 4 * sqrt(n), at least 39 training points per list."""
    upper = min(MAX_NLIST, max(1, n // MIN_POINTS_PER_LIST))
    return int(np.clip(round(4 * math.sqrt(n)), 1, upper))


def default_nprobe(nlist: int) -> int:
    """max(64, sqrt(nlist)): recall@10 >= 0.95 at d=50 for 20k..1M items (bench_index)."""
    return int(min(nlist, max(64, math.ceil(math.sqrt(nlist)))))


@dataclass(frozen=True)
class IndexKind:
    """One kind of faiss index with its own build and search parameters (the dataclass fields).

    Subclasses are registered in ``INDEX_KINDS``; in a config the parameters sit beside
    ``index.kind``. ``make`` returns the untrained CPU index; ``search_param_names`` lists the
    parameters that can change after building (``VectorIndex.set_search_params``).
    """

    search_param_names: ClassVar[tuple[str, ...]] = ()
    on_disk: ClassVar[bool] = False  # IVF kinds: a field (inverted lists in a file, not in memory)

    def make(self, dim: int, metric: int, n: int, seed: int = 0) -> faiss.Index:
        """An untrained CPU index for ``n`` vectors of ``dim`` dimensions (``build`` trains and fills it)."""
        raise NotImplementedError

    def resolve(self, n: int, dim: int) -> IndexKind:
        """The concrete kind built for ``n`` vectors of ``dim`` dimensions (``auto`` chooses; others are themselves)."""
        return self

    def memory_bytes(self, n: int, dim: int) -> int:
        """Estimated resident bytes of the built index over ``n`` vectors (inverted lists on disk excluded)."""
        return n * dim * 4

    def training_size(self, n: int, dim: int) -> int:
        """Vectors sampled to train the index (0: it needs no training)."""
        return 0

    def search_param_limit(self, index: faiss.Index) -> int:
        """The largest useful value of the first search parameter (recall tuning stops there)."""
        return 0

    @staticmethod
    def current_search_params(index: faiss.Index) -> dict[str, int]:
        """The search-time parameters of a built index of this kind."""
        return {}

    @staticmethod
    def apply_search_params(index: faiss.Index, values: dict[str, int], on_gpu: bool) -> None:
        """Set search-time parameters (names already checked against ``search_param_names``)."""


INDEX_KINDS: Registry[IndexKind] = Registry("index kind")


@INDEX_KINDS.register("flat")
@dataclass(frozen=True)
class FlatKind(IndexKind):
    """Exact search: IndexFlatL2 / IndexFlatIP; no parameters."""

    def make(self, dim: int, metric: int, n: int, seed: int = 0) -> faiss.Index:
        return faiss.IndexFlat(dim, metric)


@INDEX_KINDS.register("ivf")
@dataclass(frozen=True)
class IvfKind(IndexKind):
    """Inverted lists over a flat k-means quantizer (``seed`` seeds k-means).

    ``nlist``: lists (default ``default_nlist(n)``); ``nprobe``: lists searched per query (default
    ``default_nprobe(nlist)``, capped at ``nlist``).
    """

    nlist: int | None = None
    nprobe: int | None = None
    on_disk: bool = False
    search_param_names: ClassVar[tuple[str, ...]] = ("nprobe",)

    def __post_init__(self) -> None:
        _check_positive(nlist=self.nlist, nprobe=self.nprobe)
        _check_bool(on_disk=self.on_disk)

    def lists(self, n: int) -> int:
        """The number of inverted lists for ``n`` vectors (by default sized for those that train: all but
        the held-out queries)."""
        return self.nlist if self.nlist is not None else default_nlist(n - recall_query_count(n))

    def code_bytes(self, dim: int) -> int:
        """Bytes stored per vector in the inverted lists (besides its 8-byte id)."""
        return 4 * dim

    def memory_bytes(self, n: int, dim: int) -> int:
        lists = 0 if self.on_disk else n * (self.code_bytes(dim) + 8)
        return lists + self.lists(n) * (4 * dim + 32)  # + the coarse centroids and list headers

    def training_size(self, n: int, dim: int) -> int:
        return min(n, TRAIN_POINTS_PER_LIST * self.lists(n))

    def search_param_limit(self, index: faiss.Index) -> int:
        return int(index.nlist)

    def _quantizer(self, dim: int, metric: int, n: int) -> tuple[faiss.Index, int]:
        nlist = self.lists(n)
        if not 1 <= nlist <= n:
            raise ConfigError(f"nlist must be between 1 and the number of vectors ({n}), got {nlist}")
        return faiss.IndexFlat(dim, metric), nlist

    def _finish(self, index: faiss.Index, quantizer: faiss.Index, metric: int, seed: int) -> faiss.Index:
        quantizer.this.disown()  # the IVF index owns (and frees) its quantizer
        index.own_fields = True
        index.cp.seed = seed
        index.cp.spherical = metric == faiss.METRIC_INNER_PRODUCT  # k-means on the unit sphere
        nlist = int(index.nlist)
        index.nprobe = min(nlist, self.nprobe) if self.nprobe is not None else default_nprobe(nlist)
        return index

    def make(self, dim: int, metric: int, n: int, seed: int = 0) -> faiss.Index:
        quantizer, nlist = self._quantizer(dim, metric, n)
        return self._finish(faiss.IndexIVFFlat(quantizer, dim, nlist, metric), quantizer, metric, seed)

    @staticmethod
    def current_search_params(index: faiss.Index) -> dict[str, int]:
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}

    @staticmethod
    def apply_search_params(index: faiss.Index, values: dict[str, int], on_gpu: bool) -> None:
        if "nprobe" in values:
            limit = GPU_MAX_K if on_gpu else int(index.nlist)
            index.nprobe = min(values["nprobe"], int(index.nlist), limit)


@INDEX_KINDS.register("ivf-pq")
@dataclass(frozen=True)
class IvfPqKind(IvfKind):
    """Inverted lists of product-quantized residuals: ``pq_m`` bytes per vector instead of 4 * dim.

    ``pq_m``: sub-quantizers of 8 bits (must divide the dimension; default the largest divisor of
    the dimension up to dim / 2); ``nlist``, ``nprobe``, ``on_disk`` as for ``ivf``. Search is
    approximate even over all lists, so recall has a ceiling set by ``pq_m``. CPU only.
    """

    pq_m: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(pq_m=self.pq_m)

    def sub_quantizers(self, dim: int) -> int:
        """``pq_m``, or its default for ``dim``."""
        if self.pq_m is not None:
            return self.pq_m
        return max(m for m in range(1, max(1, dim // 2) + 1) if dim % m == 0)

    def code_bytes(self, dim: int) -> int:
        return self.sub_quantizers(dim) * PQ_NBITS // 8

    def memory_bytes(self, n: int, dim: int) -> int:
        m = self.sub_quantizers(dim)
        table = self.lists(n) * m * 256 * 4  # precomputed distance tables (faiss skips them above 2 GiB)
        return super().memory_bytes(n, dim) + 256 * dim * 4 + (table if table <= 2**31 else 0)

    def training_size(self, n: int, dim: int) -> int:
        return min(n, max(TRAIN_POINTS_PER_LIST * self.lists(n), PQ_TRAIN_POINTS))

    def make(self, dim: int, metric: int, n: int, seed: int = 0) -> faiss.Index:
        m = self.sub_quantizers(dim)
        if dim % m:
            raise ConfigError(f"pq_m must divide the dimension {dim}, got {m}")
        if n - recall_query_count(n) < 2**PQ_NBITS:
            raise ConfigError(f"ivf-pq trains {2**PQ_NBITS} centroids per sub-quantizer and needs more vectors than "
                              f"{n}; use flat or ivf")
        quantizer, nlist = self._quantizer(dim, metric, n)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, PQ_NBITS, metric)
        index.pq.cp.seed = seed
        return self._finish(index, quantizer, metric, seed)

    @staticmethod
    def current_search_params(index: faiss.Index) -> dict[str, int]:
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe), "pq_m": int(index.pq.M)}


@INDEX_KINDS.register("hnsw")
@dataclass(frozen=True)
class HnswKind(IndexKind):
    """Graph index (IndexHNSWFlat); CPU only.

    ``hnsw_m``: links per node; ``ef_construction``: build-time beam (default
    ``max(HNSW_EF_CONSTRUCTION, hnsw_m)``); ``ef_search``: search-time beam (default DEFAULT_EF_SEARCH).
    """

    hnsw_m: int = DEFAULT_HNSW_M
    ef_construction: int | None = None
    ef_search: int | None = None
    search_param_names: ClassVar[tuple[str, ...]] = ("ef_search",)

    def __post_init__(self) -> None:
        _check_positive(hnsw_m=self.hnsw_m, ef_construction=self.ef_construction, ef_search=self.ef_search)

    def make(self, dim: int, metric: int, n: int, seed: int = 0) -> faiss.Index:
        index = faiss.IndexHNSWFlat(dim, self.hnsw_m, metric)
        index.hnsw.efConstruction = (self.ef_construction if self.ef_construction is not None
                                     else max(HNSW_EF_CONSTRUCTION, self.hnsw_m))
        index.hnsw.efSearch = self.ef_search if self.ef_search is not None else DEFAULT_EF_SEARCH
        return index

    def memory_bytes(self, n: int, dim: int) -> int:
        # vectors, level-0 links (2 M ints) + ~10% for the upper levels, levels and offsets:
        # measured 497 B/vector at n=60k, d=50, M=32 (this gives 506)
        return n * (4 * dim + 88 * self.hnsw_m // 10 + 24)

    def search_param_limit(self, index: faiss.Index) -> int:
        return max(4096, int(index.hnsw.efSearch))

    @staticmethod
    def current_search_params(index: faiss.Index) -> dict[str, int]:
        return {"ef_search": int(index.hnsw.efSearch)}

    @staticmethod
    def apply_search_params(index: faiss.Index, values: dict[str, int], on_gpu: bool) -> None:
        if "ef_search" in values:
            index.hnsw.efSearch = values["ef_search"]


@INDEX_KINDS.register("auto")
@dataclass(frozen=True)
class AutoKind(IndexKind):
    """Choose flat, IVF-Flat, IVF-PQ or HNSW from the size, the dimension and ``max_memory``; tune to ``min_recall``.

    * flat (exact) below AUTO_FLAT_MAX vectors when they fit ``max_memory``;
    * else IVF-Flat when its lists fit (or ``on_disk``: the lists go to a file);
    * else IVF-PQ with the largest code (``pq_m`` bytes per vector) that fits.
    ``max_memory``: bytes or a string such as "4GB" (default: half this machine's memory); it bounds
    the index in memory plus its training sample. After building, recall@10 is measured against
    exact search on up to RECALL_QUERIES held-out vectors and nprobe rises from ``nprobe`` (default
    1) until ``min_recall`` is met; an IVF-PQ code too coarse to meet it is a one-line ConfigError.
    ``nlist``: IVF lists (default ``default_nlist(n)``).

    HNSW (:meth:`consider_hnsw`): when the tuned IVF-Flat (in memory, on the CPU) computes more
    than AUTO_HNSW_MIN_DISTANCES distances per query and more than AUTO_HNSW_MIN_SCANNED of the
    collection (isotropic or high-intrinsic-dimension data, where IVF needs a large nprobe), there
    are at most AUTO_HNSW_MAX vectors and the IVF and an HNSW index fit ``max_memory`` together,
    an IndexHNSWFlat is built too and efSearch rises from 1 until ``min_recall`` is met (measured on a
    graph without the held-out vectors, then the graph over every vector is built). HNSW is
    kept when it meets ``min_recall`` and its distances per query, counted by faiss on the
    held-out queries and weighted by HNSW_DISTANCE_COST, are fewer than the IVF's (list
    distances plus the nlist coarse ones); else the IVF is kept.
    """

    nlist: int | None = None
    nprobe: int | None = None
    max_memory: int | str | None = None
    min_recall: float = DEFAULT_MIN_RECALL
    on_disk: bool = False

    def __post_init__(self) -> None:
        _check_positive(nlist=self.nlist, nprobe=self.nprobe)
        _check_bool(on_disk=self.on_disk)
        if self.max_memory is not None:
            parse_memory(self.max_memory)
        if isinstance(self.min_recall, bool) or not isinstance(self.min_recall, (int, float)) \
                or not 0.0 < self.min_recall <= 1.0:
            raise ConfigError(f"min_recall must be a number in (0, 1], got {self.min_recall!r}")

    @property
    def max_memory_bytes(self) -> int:
        """The memory budget in bytes (``max_memory`` or half this machine's memory)."""
        return parse_memory(self.max_memory) if self.max_memory is not None else default_memory_budget()

    def resolve(self, n: int, dim: int) -> IndexKind:
        budget = self.max_memory_bytes
        flat = FlatKind()
        if n < AUTO_FLAT_MAX and not self.on_disk and build_footprint(flat, n, dim) <= budget:
            return flat
        ivf = IvfKind(nlist=self.nlist, nprobe=self.nprobe, on_disk=self.on_disk)
        if build_footprint(ivf, n, dim) <= budget:
            return ivf
        choices = [IvfPqKind(nlist=self.nlist, nprobe=self.nprobe, on_disk=self.on_disk, pq_m=m)
                   for m in range(dim, 0, -1) if dim % m == 0]
        for pq in choices:
            if build_footprint(pq, n, dim) <= budget:
                return pq
        smallest = build_footprint(choices[-1], n, dim)
        raise ConfigError(f"max_memory {format_bytes(budget)} is too small for {n} vectors of {dim} dimensions "
                          f"(the smallest index, IVF-PQ with 1-byte codes, needs {format_bytes(smallest)}); "
                          "raise index.max_memory or set index.on_disk: true")

    def make(self, dim: int, metric: int, n: int, seed: int = 0) -> faiss.Index:
        return self.resolve(n, dim).make(dim, metric, n, seed)

    def consider_hnsw(self, chosen: IndexKind, n: int, dim: int, ivf_distances: float) -> HnswKind | None:
        """The HNSW kind to build beside ``chosen`` (tuned to ``ivf_distances`` per query), or None (see above)."""
        hnsw = HnswKind()
        if type(chosen) is not IvfKind or chosen.on_disk or n > AUTO_HNSW_MAX:
            return None
        if ivf_distances <= max(AUTO_HNSW_MIN_DISTANCES, AUTO_HNSW_MIN_SCANNED * n):
            return None
        if build_footprint(chosen, n, dim) + hnsw.memory_bytes(n, dim) > self.max_memory_bytes:
            return None
        return hnsw


def build_footprint(kind: IndexKind, n: int, dim: int) -> int:
    """Estimated peak bytes of building ``kind`` (chunks aside): the larger of the built index and twice its
    training sample (faiss copies it while training; it is freed before adding), plus the held-out queries."""
    training = 2 * kind.training_size(n, dim) * dim * 4
    return max(kind.memory_bytes(n, dim), training) + RECALL_QUERIES * dim * 4


def index_kind_type(kind: str, where: str | None = None) -> type[IndexKind]:
    """The registered class of ``kind``; unknown → one-line ConfigError listing the kinds (prefixed by ``where``)."""
    if kind not in INDEX_KINDS:
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown index kind {kind!r}; choose one of: {', '.join(INDEX_KINDS.names())}")
    return INDEX_KINDS.get(kind)


def index_param_names(kind: str, where: str | None = None) -> tuple[str, ...]:
    """The build and search parameters index ``kind`` takes."""
    return tuple(f.name for f in dataclasses.fields(index_kind_type(kind, where)))


def make_index_kind(kind: str, values: Mapping[str, Any] | None = None, *, where: str = "index",
                    coerce: Callable[[Any, Any, str], Any] | None = None) -> IndexKind:
    """Index ``kind`` with its parameters from a mapping; a parameter it lacks → one-line ConfigError.

    ``coerce(value, annotation, field)`` converts config values (the config loader's type check).
    """
    kind_type = index_kind_type(kind, f"{where}: kind")
    values = dict(values or {})
    valid = index_param_names(kind)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: index kind {kind!r} takes no parameter {', '.join(unknown)}; "
                          f"valid: {', '.join(valid) or 'none'}")
    if coerce is not None:
        hints = typing.get_type_hints(kind_type)
        values = {name: coerce(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    try:
        return kind_type(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def kind_of(index: faiss.Index) -> str:
    """The registry name of a (CPU or GPU) faiss index; the class name for foreign types."""
    name = type(index).__name__
    for marker, kind in (("HNSW", "hnsw"), ("IVFPQ", "ivf-pq"), ("IVF", "ivf"), ("Flat", "flat")):
        if marker in name:
            return kind
    return name


def gpu_available() -> bool:
    """Whether this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _want_gpu(use_gpu: UseGpu) -> bool:
    if use_gpu not in ("auto", True, False):
        raise ConfigError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    if use_gpu is True and not gpu_available():
        raise ConfigError("use_gpu=True but faiss has no GPU support or sees no GPU; "
                          "install faiss-gpu or pass use_gpu='auto'")
    return gpu_available() if use_gpu == "auto" else bool(use_gpu)


def _check_vectors(vectors: Any, dim: int | None, what: str, error: type[Exception]) -> np.ndarray:
    """Return ``vectors`` as a C-contiguous float32 (n, dim) array or raise a one-line error."""
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise error(f"{what} must be a numeric array: {one_line_reason(exc)}") from None
    if array.ndim != 2:
        raise error(f"{what} must be a 2-D array (n, dim), got shape {array.shape}")
    if array.shape[1] == 0 or (dim is not None and array.shape[1] != dim):
        raise error(f"{what} have dimension {array.shape[1]}; expected {dim or 'at least 1'}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise error(f"{what} row {int(np.argmin(finite))} contains NaN or infinity")
    return np.ascontiguousarray(array)


def _check_metadata(metadata: Sequence[dict], n: int) -> list[dict]:
    items = list(metadata)
    if len(items) != n:
        raise DataError(f"got {n} vectors but {len(items)} metadata entries; they must match")
    bad = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
    if bad is not None:
        raise DataError(f"metadata entry {bad} must be a dict, got {type(items[bad]).__name__}")
    return items


def _short(value: Any) -> str:
    """repr of a stamp value; long strings (hashes) are cut to 12 characters."""
    return repr(value[:12] + "…" if isinstance(value, str) and len(value) > 12 else value)


def check_stamp(saved: dict, expected: dict, where: str) -> None:
    """Raise a one-line ConfigError if any key of ``expected`` differs in ``saved``."""
    diffs = [f"{key} {_short(saved.get(key, '<missing>'))} but the loaded {key} is {_short(value)}"
             for key, value in expected.items() if saved.get(key) != value]
    if diffs:
        raise ConfigError(f"index {where} was built with {'; '.join(diffs)}; "
                          "rebuild it with `retrieval index`")


SINGLE_THREAD_BELOW = 16  # queries per call under which one OpenMP thread is faster


@contextlib.contextmanager
def _threads_for(num_queries: int) -> Iterator[None]:
    """One faiss thread for a handful of queries: waking a thread team costs more than it saves
    (measured: a single flat query over 100k items took ~30 ms on 2 threads, ~1 ms on 1)."""
    if num_queries >= SINGLE_THREAD_BELOW:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class VectorIndex:
    """A faiss index plus per-item metadata and the stamp of the model that made the vectors."""

    def __init__(self, index: faiss.Index, metadata: list[dict], *, metric: str, stamp: dict,
                 use_gpu: UseGpu = "auto", build_info: dict | None = None,
                 lists_file: Path | None = None) -> None:
        """Wrap a CPU faiss index; prefer :meth:`build`, :func:`build_index_from_chunks` and :meth:`load`.

        ``lists_file``: the file of its on-disk inverted lists, if it has them.
        """
        self._kind = kind_of(index)
        self._metric = metric
        self._stamp = dict(stamp)
        self._metadata = metadata
        self._build_info = dict(build_info) if build_info is not None else None
        self._lists_file = lists_file
        self._gpu_res: Any = None
        self._index = self._maybe_to_gpu(index, _want_gpu(use_gpu))

    @classmethod
    def build(cls, vectors: np.ndarray, metadata: Sequence[dict], *, kind: str | IndexKind = "auto",
              metric: str = "l2", stamp: dict, use_gpu: UseGpu = "auto", seed: int = 0,
              workdir: str | Path | None = None, **params: Any) -> VectorIndex:
        """Build an index over ``vectors`` (n, d) float32; ``metadata[i]`` describes row i.

        ``kind`` is "flat" (exact), "ivf", "ivf-pq", "hnsw" or "auto" (chosen by size and
        ``max_memory``, tuned to ``min_recall``) with that kind's parameters as keywords
        (``nlist=``, ``ef_search=``, ...; one the kind lacks is a ConfigError), or an ``IndexKind``
        holding them (``index`` of a config). ``metric`` is "l2" or "ip" (normalise the vectors
        yourself for cosine). Unset parameters get measured defaults (default_nlist, ...). The same
        build as :func:`build_index_from_chunks` over one chunk.
        """
        array = _check_vectors(vectors, None, "vectors", DataError)
        items = _check_metadata(metadata, len(array))
        if len(array) == 0:
            raise DataError("cannot build an index from 0 vectors")
        return build_index_from_chunks([array], len(array), array.shape[1], items, kind=kind, metric=metric,
                                       stamp=stamp, use_gpu=use_gpu, seed=seed, workdir=workdir, **params)

    def add(self, vectors: np.ndarray, metadata: Sequence[dict]) -> np.ndarray:
        """Append items without rebuilding (IVF keeps its trained quantizer); return their ids.

        An index with on-disk lists cannot grow (ConfigError): rebuild it.
        """
        if self.on_disk:
            raise ConfigError("an index with on-disk inverted lists cannot grow; rebuild it with the new vectors")
        array = _check_vectors(vectors, self.dim, "vectors", DataError)
        items = _check_metadata(metadata, len(array))
        start = len(self)
        self._index.add(array)
        self._metadata.extend(items)
        return np.arange(start, start + len(array), dtype=np.int64)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def kind(self) -> str:
        """"flat", "ivf", "ivf-pq" or "hnsw" (never "auto")."""
        return self._kind

    @property
    def on_disk(self) -> bool:
        """Whether the inverted lists live in a file (``lists_file``) rather than in memory."""
        return self._lists_file is not None

    @property
    def build_info(self) -> dict | None:
        """How the index was chosen and how well it finds neighbours (a copy; None for indexes from before).

        Keys: ``requested`` (the configured kind), ``kind``, ``params`` (nlist, nprobe, pq_m, ef_search
        as built and tuned), ``recall@10`` (measured against exact search on ``recall_queries``
        held-out vectors; 1.0 for flat), ``min_recall`` (auto's target, else None), ``trials``
        (search parameter → recall, in the order tried), ``max_memory``, ``estimated_memory``
        (bytes), ``train_size``, ``on_disk``.
        """
        return json.loads(json.dumps(self._build_info)) if self._build_info is not None else None

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def stamp(self) -> dict:
        """A copy of the caller's stamp."""
        return dict(self._stamp)

    @property
    def on_gpu(self) -> bool:
        return self._gpu_res is not None

    @property
    def search_params(self) -> dict[str, int]:
        """Current search-time parameters (nlist/nprobe (/pq_m) for IVF, ef_search for HNSW, none for flat)."""
        return INDEX_KINDS.get(self._kind).current_search_params(self._index)

    def set_search_params(self, **values: int) -> None:
        """Trade speed for recall after building or loading; a parameter this kind lacks → ConfigError."""
        kind = INDEX_KINDS.get(self._kind)
        unknown = sorted(set(values) - set(kind.search_param_names))
        if unknown:
            raise ConfigError(f"index kind {self._kind!r} has no search parameter {', '.join(unknown)}; "
                              f"valid: {', '.join(kind.search_param_names) or 'none'}")
        _check_positive(**values)
        kind.apply_search_params(self._index, values, self.on_gpu)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-``k`` items per query row; ``k`` is clipped to ``len(self)``."""
        array = _check_vectors(queries, self.dim, "queries", QueryError)
        _check_positive(QueryError, k=k)
        k = min(int(k), len(self))
        if self.on_gpu and k > GPU_MAX_K:
            raise QueryError(f"k={k} exceeds the faiss GPU limit of {GPU_MAX_K}; ask for fewer")
        with _threads_for(len(array)):
            distances, ids = self._index.search(array, k)
        missing = (ids < 0).any(axis=1)
        if missing.any():
            distances[missing], ids[missing] = self._search_wider(array[missing], k)
        keep = int((ids >= 0).sum(axis=1).min())  # < k only for GPU IVF with > 2048 lists
        scores = 0.0 - distances[:, :keep] if self._metric == "l2" else distances[:, :keep]
        return SearchResult(np.ascontiguousarray(scores), np.ascontiguousarray(ids[:, :keep]))

    def _search_wider(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-search rows that came back short: exact over HNSW storage, or all IVF lists."""
        if self._kind == "hnsw":
            return faiss.downcast_index(self._index.storage).search(queries, k)
        nlist = int(self._index.nlist)  # IVF (flat never comes back short): probe all lists
        if not self.on_gpu:  # per-call parameters leave the index untouched (thread-safe)
            return self._index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nlist))
        before = int(self._index.nprobe)
        self.set_search_params(nprobe=nlist)  # capped at GPU_MAX_K
        try:
            return self._index.search(queries, k)
        finally:
            self._index.nprobe = before

    def metadata_for(self, ids: Sequence[int] | np.ndarray) -> list[dict]:
        """Metadata dicts (copies) for a 1-D sequence of ids, in the same order."""
        flat = np.asarray(ids, dtype=np.int64)
        if flat.ndim != 1:
            raise QueryError(f"ids must be 1-D, got shape {flat.shape}; pass result.ids[row]")
        bad = flat[(flat < 0) | (flat >= len(self._metadata))]
        if bad.size:
            raise QueryError(f"id {int(bad[0])} is not in the index (0..{len(self._metadata) - 1})")
        return [dict(self._metadata[i]) for i in flat.tolist()]

    def _maybe_to_gpu(self, index: faiss.Index, on_gpu: bool) -> faiss.Index:
        """Flat/IVF-Flat go to GPU 0 (an untrained IVF trains there); HNSW, IVF-PQ and on-disk lists stay on the CPU."""
        if not on_gpu or self._kind not in ("flat", "ivf") or self.on_disk:
            return index
        self._gpu_res = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
        if self._kind == "ivf":
            gpu_index.nprobe = min(int(index.nprobe), GPU_MAX_K)
        return gpu_index

    def _cpu_index(self) -> faiss.Index:  # faiss can only write CPU indexes
        return faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index

    def save(self, directory: str | Path) -> None:
        """Write index.faiss, metadata.jsonl and stamp.json; the directory appears at once."""
        directory = Path(directory)
        info = {"format": 1, "kind": self._kind, "metric": self._metric,
                "dim": self.dim, "count": len(self), "search_params": self.search_params,
                "on_disk": self.on_disk, "stamp": self._stamp}
        if self._build_info is not None:
            info["build"] = self._build_info
        with atomic_dir(directory) as tmp:
            try:
                if self._lists_file is not None:  # the index file names it; loading looks beside the index file
                    shutil.copyfile(self._lists_file, tmp / ONDISK_LISTS_FILE)
                faiss.write_index(self._cpu_index(), str(tmp / INDEX_FILE))
            except (RuntimeError, OSError) as exc:
                raise DataError(f"cannot write {directory / INDEX_FILE}: {one_line_reason(exc)}") from exc
            _write_metadata(tmp / METADATA_FILE, self._metadata, directory / METADATA_FILE)
            (tmp / STAMP_FILE).write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, *, expected_stamp: dict | None = None,
             use_gpu: UseGpu = "auto") -> VectorIndex:
        """Read a saved index; refuse it (ConfigError) if ``expected_stamp`` differs."""
        directory = Path(directory)
        if not directory.is_dir():
            raise DataError(f"index {directory} does not exist; build it with `retrieval index`")
        info = _read(directory / STAMP_FILE, _parse_info)
        if expected_stamp is not None:
            check_stamp(info["stamp"], expected_stamp, str(directory))
        lists_file = directory / ONDISK_LISTS_FILE if info.get("on_disk") else None
        if lists_file is not None and not lists_file.is_file():
            raise DataError(f"{lists_file} is missing; rebuild the index with `retrieval index`")
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if lists_file is not None else 0
        index = _read(directory / INDEX_FILE, lambda path: faiss.read_index(str(path), flags))
        metadata = _read(directory / METADATA_FILE, _parse_metadata)
        checks = {"count": (index.ntotal, info["count"]), "dim": (index.d, info["dim"]),
                  "kind": (kind_of(index), info["kind"]),
                  "metadata lines": (len(metadata), info["count"])}
        for name, (found, stated) in checks.items():
            if found != stated:
                raise DataError(f"{directory} is inconsistent: {name} is {found!r} "
                                f"but {STAMP_FILE} says {stated!r}; rebuild it")
        return cls(index, metadata, metric=info["metric"], stamp=info["stamp"], use_gpu=use_gpu,
                   build_info=info.get("build"), lists_file=lists_file)


def sample_rows(count: int, queries: int, train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted row numbers in ``0 .. count - 1``: ``queries`` held out for the recall check, ``train``
    for training (the same for the same arguments, however the vectors are split into chunks)."""
    rows = np.random.default_rng(seed).choice(count, size=queries + train, replace=False)
    return np.sort(rows[:queries]), np.sort(rows[queries:])


def recall_query_count(count: int) -> int:
    """Held-out vectors the recall is measured on: RECALL_QUERIES, at most a tenth of the collection."""
    return max(1, min(RECALL_QUERIES, count // 10))


def build_index_from_chunks(chunks: Iterable[np.ndarray], count: int, dim: int,
                            metadata: Iterable[dict] | None = None, *, kind: str | IndexKind = "auto",
                            metric: str = "l2", stamp: dict, use_gpu: UseGpu = "auto", seed: int = 0,
                            workdir: str | Path | None = None, **params: Any) -> VectorIndex:
    """Build an index over ``count`` vectors of ``dim`` dimensions given as chunks, never all at once.

    ``chunks`` must be re-iterable (a list, :class:`NpyChunks`, or any object whose ``__iter__``
    yields the (rows, dim) arrays anew each time, in the same order): the first pass picks the
    training sample and the held-out queries (rows drawn by :func:`sample_rows` with ``seed``), the
    second trains the index and adds chunk after chunk. ``metadata`` (``count`` dicts; default
    empty dicts) describes the rows in order. Other arguments as :meth:`VectorIndex.build`.
    ``workdir``: where on-disk inverted lists and their temporary blocks are written (default the
    system's temporary folder; :meth:`VectorIndex.save` copies the lists into the index folder).
    Memory: the index (see ``IndexKind.memory_bytes``), the training sample and one chunk.
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    if not isinstance(stamp, dict):
        raise ConfigError(f"stamp must be a dict, got {type(stamp).__name__}")
    if isinstance(kind, IndexKind):
        if params:
            raise ConfigError(f"pass the parameters inside the index kind, not as {', '.join(sorted(params))}")
        requested = kind
    else:
        requested = make_index_kind(kind, params, where="VectorIndex.build")
    _check_positive(DataError, count=count, dim=dim)
    if iter(chunks) is chunks:
        raise ConfigError("chunks must be re-iterable (a list or an object whose __iter__ starts again): "
                          "they are read twice, once for the training sample and once to add them")
    items = _check_metadata([{}] * count if metadata is None else metadata, count)
    chosen = requested.resolve(count, dim)
    approximate = not isinstance(chosen, FlatKind)
    held_out = recall_query_count(count) if approximate else 0
    query_rows, train_rows = sample_rows(count, held_out, min(chosen.training_size(count, dim), count - held_out),
                                         seed)
    picked = _gather_rows(chunks, np.concatenate([query_rows, train_rows]), count, dim)
    order = np.argsort(np.concatenate([query_rows, train_rows]), kind="stable")  # picked is in row order
    picked_by_role = np.empty_like(picked)
    picked_by_role[order] = picked
    queries, sample = picked_by_role[: len(query_rows)].copy(), picked_by_role[len(query_rows):]
    del picked, picked_by_role  # sample holds the only reference: freed once trained

    index = VectorIndex(chosen.make(dim, METRICS[metric], count, seed), [], metric=metric, stamp=stamp,
                        use_gpu=False if chosen.on_disk else use_gpu)
    if not index._index.is_trained:
        index._index.train(sample)
    del sample
    exact = _ExactNeighbours(queries, RECALL_K + 1, METRICS[metric]) if len(queries) else None
    if chosen.on_disk:
        _add_on_disk(index, chunks, count, dim, exact, workdir)
    else:
        for offset, array in _checked_chunks(chunks, count, dim):
            index._index.add(array)
            if exact is not None:
                exact.add(array, offset)
    index._metadata = items

    target = requested.min_recall if isinstance(requested, AutoKind) else None
    trials: list[dict] = []
    candidates: list[dict] = []
    recall = 1.0
    if exact is not None:
        recall, trials = _tune(index, chosen, queries, query_rows, exact.ids, target)
    if isinstance(requested, AutoKind) and exact is not None and not index.on_gpu and recall >= requested.min_recall:
        ivf_cost = _distances_per_query(index, queries)
        hnsw_kind = requested.consider_hnsw(chosen, count, dim, ivf_cost)
        if hnsw_kind is not None:
            candidates.append({"kind": index.kind, "params": index.search_params,
                               f"recall@{RECALL_K}": round(recall, 4), "distances_per_query": round(ivf_cost),
                               "cost": round(ivf_cost)})
            ef_search, hnsw_recall, hnsw_trials, hnsw_cost = _tune_hnsw_without_queries(
                hnsw_kind, chunks, count, dim, queries, query_rows, metric, seed, requested.min_recall)
            candidates.append({"kind": "hnsw", "params": {"ef_search": ef_search},
                               f"recall@{RECALL_K}": round(hnsw_recall, 4), "distances_per_query": round(hnsw_cost),
                               "cost": round(HNSW_DISTANCE_COST * hnsw_cost)})
            if hnsw_recall >= requested.min_recall and HNSW_DISTANCE_COST * hnsw_cost < ivf_cost:
                chosen = dataclasses.replace(hnsw_kind, ef_search=ef_search)
                hnsw = VectorIndex(chosen.make(dim, METRICS[metric], count, seed), items, metric=metric, stamp=stamp,
                                   use_gpu=False)
                for _offset, array in _checked_chunks(chunks, count, dim):
                    hnsw._index.add(array)
                index, recall, trials = hnsw, hnsw_recall, hnsw_trials
    index._build_info = {
        "requested": next(name for name in INDEX_KINDS.names() if type(requested) is INDEX_KINDS.get(name)),
        "kind": index.kind, "params": index.search_params, f"recall@{RECALL_K}": round(recall, 4),
        "recall_queries": len(query_rows), "min_recall": target, "trials": trials, "candidates": candidates,
        "max_memory": requested.max_memory_bytes if isinstance(requested, AutoKind) else None,
        "estimated_memory": chosen.memory_bytes(count, dim), "train_size": len(train_rows),
        "on_disk": chosen.on_disk}
    if target is not None and recall < target:
        budget = format_bytes(requested.max_memory_bytes)
        raise ConfigError(f"index.kind auto: {index.kind} {_params_text(index.search_params)} reaches "
                          f"recall@{RECALL_K} {recall:.3f} over all its lists, below index.min_recall {target}; "
                          f"raise index.max_memory (now {budget}) so that a finer index fits, "
                          "or lower index.min_recall")
    return index


class NpyChunks:
    """A re-iterable of the arrays in ``.npy`` files, each memory-mapped when read (for
    :func:`build_index_from_chunks` over embedding shards); ``count`` and ``dim`` come from the headers."""

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.paths = [Path(path) for path in paths]
        shapes = [_read(path, lambda p: np.load(p, mmap_mode="r").shape) for path in self.paths]
        bad = next((path for path, shape in zip(self.paths, shapes) if len(shape) != 2), None)
        if bad is not None:
            raise DataError(f"{bad} does not hold a 2-D (rows, dim) array")
        dims = {shape[1] for shape in shapes}
        if len(dims) > 1:
            raise DataError(f"the .npy files have different dimensions {sorted(dims)}; they must match")
        self.count = sum(shape[0] for shape in shapes)
        self.dim = dims.pop() if dims else 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for path in self.paths:
            yield np.load(path, mmap_mode="r")


def _params_text(params: dict[str, int]) -> str:
    return "(" + ", ".join(f"{name}={value}" for name, value in params.items()) + ")"


def _checked_chunks(chunks: Iterable[np.ndarray], count: int, dim: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 array) per chunk, each checked; a total other than ``count`` is a DataError."""
    offset = 0
    for number, chunk in enumerate(chunks):
        array = _check_vectors(chunk, dim, f"vectors of chunk {number}", DataError)
        if offset + len(array) > count:
            raise DataError(f"the chunks hold more than the {count} vectors announced")
        yield offset, array
        offset += len(array)
    if offset != count:
        raise DataError(f"the chunks hold {offset} vectors but {count} were announced")


def _gather_rows(chunks: Iterable[np.ndarray], rows: np.ndarray, count: int, dim: int) -> np.ndarray:
    """The vectors at ``rows`` (in ascending row order), reading each chunk once and only those rows."""
    wanted = np.sort(rows)
    out = np.empty((len(wanted), dim), dtype=np.float32)
    offset = 0
    for number, chunk in enumerate(chunks):
        shape = np.shape(chunk)
        if len(shape) != 2 or shape[1] != dim:
            raise DataError(f"vectors of chunk {number} have shape {shape}; expected (rows, {dim})")
        lo, hi = np.searchsorted(wanted, [offset, offset + shape[0]])
        if hi > lo:
            out[lo:hi] = _check_vectors(np.asarray(chunk)[wanted[lo:hi] - offset], dim,
                                        f"vectors of chunk {number}", DataError)
        offset += shape[0]
    if offset != count:
        raise DataError(f"the chunks hold {offset} vectors but {count} were announced")
    return out


class _ExactNeighbours:
    """Exact top-k of fixed queries over vectors that arrive chunk by chunk (brute force, merged)."""

    def __init__(self, queries: np.ndarray, k: int, metric: int) -> None:
        self.queries, self.k, self.metric = queries, k, metric
        self.larger_is_better = metric == faiss.METRIC_INNER_PRODUCT
        worst = -np.inf if self.larger_is_better else np.inf
        self.scores = np.full((len(queries), 0), worst, dtype=np.float32)
        self.ids = np.full((len(queries), 0), -1, dtype=np.int64)

    def add(self, vectors: np.ndarray, offset: int | np.ndarray) -> None:
        """Merge in ``vectors``: rows ``offset ..`` (or the row numbers ``offset`` holds)."""
        if len(vectors) == 0:
            return
        scores, ids = faiss.knn(self.queries, vectors, min(self.k, len(vectors)), metric=self.metric)
        ids = ids + offset if np.isscalar(offset) else np.asarray(offset)[ids]
        scores = np.concatenate([self.scores, scores], axis=1)
        ids = np.concatenate([self.ids, ids], axis=1)
        order = np.argsort(-scores if self.larger_is_better else scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(scores, order, axis=1)
        self.ids = np.take_along_axis(ids, order, axis=1)


def _add_on_disk(index: VectorIndex, chunks: Iterable[np.ndarray], count: int, dim: int,
                 exact: _ExactNeighbours | None, workdir: str | Path | None) -> None:
    """Add the chunks as blocks written to disk, then merge them into one inverted-lists file."""
    holder = tempfile.TemporaryDirectory(prefix="ivf-lists-", dir=workdir)
    folder = Path(holder.name)
    trained = index._index
    blocks = []
    for number, (offset, array) in enumerate(_checked_chunks(chunks, count, dim)):
        block = faiss.clone_index(trained)
        block.add_with_ids(array, np.arange(offset, offset + len(array), dtype=np.int64))
        blocks.append(folder / f"block{number}.index")
        faiss.write_index(block, str(blocks[-1]))
        del block
        if exact is not None:
            exact.add(array, offset)
    readers = [faiss.read_index(str(path), faiss.IO_FLAG_MMAP) for path in blocks]
    lists = faiss.InvertedListsPtrVector()
    for reader in readers:
        lists.push_back(reader.invlists)
    on_disk = faiss.OnDiskInvertedLists(trained.nlist, trained.code_size, str(folder / ONDISK_LISTS_FILE))
    total = on_disk.merge_from_multiple(lists.data(), lists.size(), False)
    trained.replace_invlists(on_disk, True)
    on_disk.this.disown()  # the index owns its lists now
    trained.ntotal = total
    del readers, lists
    for path in blocks:
        path.unlink()
    index._lists_file = folder / ONDISK_LISTS_FILE
    index._lists_holder = holder  # the folder lives as long as the index


def _recall(index: VectorIndex, queries: np.ndarray, query_rows: np.ndarray, exact: np.ndarray,
            rows: np.ndarray | None = None) -> float:
    """recall@RECALL_K of ``index`` for held-out vectors of the collection, each query's own row left out
    (``rows``: the row number of each of the index's ids, when they differ)."""
    found = index.search(queries, RECALL_K + 1).ids
    if rows is not None:
        found = rows[found]
    hits = 0
    for own, got, truth in zip(query_rows.tolist(), found.tolist(), exact.tolist()):
        got = [i for i in got if i != own][:RECALL_K]
        truth = [i for i in truth if i != own][:RECALL_K]
        hits += len(set(got) & set(truth))
    return hits / (RECALL_K * len(query_rows))


def _tune_hnsw_without_queries(kind: HnswKind, chunks: Iterable[np.ndarray], count: int, dim: int,
                               queries: np.ndarray, query_rows: np.ndarray, metric: str, seed: int,
                               target: float) -> tuple[int, float, list[dict], float]:
    """Tune efSearch on a graph of every row but the held-out ones (a graph that holds a query finds its
    own links: recall 0.95 on held-in rows was 0.84 on fresh queries, isotropic 20k x 50).

    Returns (efSearch, recall@10, trials, distances per query at that efSearch).
    """
    graph = VectorIndex(kind.make(dim, METRICS[metric], count, seed), [], metric=metric, stamp={}, use_gpu=False)
    exact = _ExactNeighbours(queries, RECALL_K, METRICS[metric])
    kept_rows = []
    for offset, array in _checked_chunks(chunks, count, dim):
        rows = np.setdiff1d(np.arange(offset, offset + len(array)), query_rows, assume_unique=True)
        graph._index.add(np.ascontiguousarray(array[rows - offset]))
        exact.add(array[rows - offset], rows)
        kept_rows.append(rows)
    graph._metadata = [{}] * len(graph)
    recall, trials = _tune(graph, kind, queries, query_rows, exact.ids, target, np.concatenate(kept_rows))
    return graph.search_params["ef_search"], recall, trials, _distances_per_query(graph, queries)


def _distances_per_query(index: VectorIndex, queries: np.ndarray) -> float:
    """Distances faiss computes per query at the current search parameters (IVF: the coarse ones too)."""
    if index.kind == "hnsw":
        stats = faiss.cvar.hnsw_stats
        stats.reset()
        index.search(queries, RECALL_K + 1)
        return stats.ndis / len(queries)
    stats = faiss.cvar.indexIVF_stats
    stats.reset()
    index.search(queries, RECALL_K + 1)
    return stats.ndis / len(queries) + int(index._index.nlist)


def _tune(index: VectorIndex, kind: IndexKind, queries: np.ndarray, query_rows: np.ndarray,
          exact: np.ndarray, target: float | None, rows: np.ndarray | None = None) -> tuple[float, list[dict]]:
    """Measure recall; with a ``target``, raise the kind's search parameter (doubling, then bisecting)
    to the smallest value that meets it, or to its limit. Returns (recall, trials in order)."""
    name = kind.search_param_names[0]
    trials: list[dict] = []

    def measure(value: int | None) -> float:
        if value is not None:
            index.set_search_params(**{name: value})
        recall = _recall(index, queries, query_rows, exact, rows)
        trials.append({name: index.search_params[name], f"recall@{RECALL_K}": round(recall, 4)})
        return recall

    if target is None:
        return measure(None), trials
    limit = kind.search_param_limit(index._index)
    value = min(limit, getattr(kind, name, None) or 1)
    results = {value: measure(value)}
    while results[value] < target and value < limit:
        value = min(limit, value * 2)
        results[value] = measure(value)
    passing = [v for v, r in results.items() if r >= target]
    if passing:  # bisect between the largest failing value below and the smallest passing one
        high = min(passing)
        low = max((v for v, r in results.items() if r < target and v < high), default=None)
        while low is not None and high - low > max(1, high // 20):
            middle = (low + high) // 2
            results[middle] = measure(middle)
            low, high = (low, middle) if results[middle] >= target else (middle, high)
        value = high
    index.set_search_params(**{name: value})
    return results[value], trials


def _check_bool(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")


def _check_positive(error: type[Exception] = ConfigError, **values: Any) -> None:
    for name, value in values.items():
        if value is not None and not (isinstance(value, (int, np.integer)) and value >= 1):
            raise error(f"{name} must be a positive integer, got {value!r}")


def _write_metadata(path: Path, metadata: list[dict], final: Path) -> None:
    with path.open("w", encoding="utf-8") as out:
        for position, item in enumerate(metadata):
            try:
                out.write(json.dumps(item, ensure_ascii=False) + "\n")
            except (TypeError, ValueError) as exc:
                raise DataError(f"{final}: metadata of id {position} is not JSON: {exc}") from None


def _read(path: Path, parse: Callable[[Path], Any]) -> Any:
    """``parse(path)``, turning a missing or unreadable file into a one-line DataError."""
    if not path.is_file():
        raise DataError(f"{path} is missing; rebuild the index with `retrieval index`")
    try:
        return parse(path)
    except (RuntimeError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path} is corrupt ({one_line_reason(exc)}); rebuild the index") from None


def _parse_info(path: Path) -> dict:
    info = json.loads(path.read_text(encoding="utf-8"))
    required = {"kind": str, "metric": str, "dim": int, "count": int, "stamp": dict}
    for key, expected_type in required.items():
        if not isinstance(info, dict) or not isinstance(info.get(key), expected_type):
            raise ValueError(f"no valid {key!r} field")
    if info["metric"] not in METRICS:
        raise ValueError(f"unknown metric {info['metric']!r}")
    return info


def _parse_metadata(path: Path) -> list[dict]:
    items: list[dict] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"line {number}: {exc}") from None
            if not isinstance(item, dict):
                raise ValueError(f"line {number} is not a JSON object")
            items.append(item)
    return items
