"""One interface over faiss indexes (flat, IVF, HNSW, auto) with metadata and a model stamp.

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
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
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
AUTO_FLAT_MAX = 50_000  # "auto" builds an exact index below this many items
AUTO_LARGE_KIND = "ivf"  # ... and this kind at or above it (see benchmarks/bench_index.py)
DEFAULT_HNSW_M = 32
HNSW_EF_CONSTRUCTION = 128  # 40 (faiss default) tops out at recall@10 0.94 on 1M items
DEFAULT_EF_SEARCH = 512  # recall@10 >= 0.95 up to 1M items at d=50 (bench_index)
MIN_POINTS_PER_LIST = 39  # faiss k-means warns below 39 training points per centroid
MAX_NLIST = 65_536
GPU_MAX_K = 2048  # faiss GPU k-selection limit (k and nprobe)
UseGpu = bool | Literal["auto"]


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

    def make(self, dim: int, metric: int, n: int, seed: int = 0) -> faiss.Index:
        """An untrained CPU index for ``n`` vectors of ``dim`` dimensions (``build`` trains and fills it)."""
        raise NotImplementedError

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
    search_param_names: ClassVar[tuple[str, ...]] = ("nprobe",)

    def __post_init__(self) -> None:
        _check_positive(nlist=self.nlist, nprobe=self.nprobe)

    def make(self, dim: int, metric: int, n: int, seed: int = 0) -> faiss.Index:
        nlist = self.nlist if self.nlist is not None else default_nlist(n)
        if not 1 <= nlist <= n:
            raise ConfigError(f"nlist must be between 1 and the number of vectors ({n}), got {nlist}")
        quantizer = faiss.IndexFlat(dim, metric)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
        quantizer.this.disown()  # the IVF index owns (and frees) its quantizer
        index.own_fields = True
        index.cp.seed = seed
        index.cp.spherical = metric == faiss.METRIC_INNER_PRODUCT  # k-means on the unit sphere
        index.nprobe = min(nlist, self.nprobe) if self.nprobe is not None else default_nprobe(nlist)
        return index

    @staticmethod
    def current_search_params(index: faiss.Index) -> dict[str, int]:
        return {"nlist": int(index.nlist), "nprobe": int(index.nprobe)}

    @staticmethod
    def apply_search_params(index: faiss.Index, values: dict[str, int], on_gpu: bool) -> None:
        if "nprobe" in values:
            limit = GPU_MAX_K if on_gpu else int(index.nlist)
            index.nprobe = min(values["nprobe"], int(index.nlist), limit)


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

    @staticmethod
    def current_search_params(index: faiss.Index) -> dict[str, int]:
        return {"ef_search": int(index.hnsw.efSearch)}

    @staticmethod
    def apply_search_params(index: faiss.Index, values: dict[str, int], on_gpu: bool) -> None:
        if "ef_search" in values:
            index.hnsw.efSearch = values["ef_search"]


def auto_kind(n: int) -> str:
    """The kind "auto" builds for ``n`` items: flat below AUTO_FLAT_MAX, else AUTO_LARGE_KIND."""
    return "flat" if n < AUTO_FLAT_MAX else AUTO_LARGE_KIND


@INDEX_KINDS.register("auto")
@dataclass(frozen=True)
class AutoKind(IndexKind):
    """Exact search below AUTO_FLAT_MAX items, approximate (AUTO_LARGE_KIND, IVF) above.

    ``nlist`` and ``nprobe`` are the IVF parameters for collections of AUTO_FLAT_MAX items or more.
    """

    nlist: int | None = None
    nprobe: int | None = None

    def __post_init__(self) -> None:
        _check_positive(nlist=self.nlist, nprobe=self.nprobe)

    def make(self, dim: int, metric: int, n: int, seed: int = 0) -> faiss.Index:
        kind = auto_kind(n)
        params = dataclasses.asdict(self) if kind == AUTO_LARGE_KIND else {}
        return INDEX_KINDS.create(kind, **params).make(dim, metric, n, seed)


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
    for marker, kind in (("HNSW", "hnsw"), ("IVF", "ivf"), ("Flat", "flat")):
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
                 use_gpu: UseGpu = "auto") -> None:
        """Wrap a CPU faiss index; prefer :meth:`build` and :meth:`load`."""
        self._kind = kind_of(index)
        self._metric = metric
        self._stamp = dict(stamp)
        self._metadata = metadata
        self._gpu_res: Any = None
        self._index = self._maybe_to_gpu(index, _want_gpu(use_gpu))

    @classmethod
    def build(cls, vectors: np.ndarray, metadata: Sequence[dict], *, kind: str | IndexKind = "auto",
              metric: str = "l2", stamp: dict, use_gpu: UseGpu = "auto", seed: int = 0,
              **params: Any) -> VectorIndex:
        """Build an index over ``vectors`` (n, d) float32; ``metadata[i]`` describes row i.

        ``kind`` is "flat" (exact), "ivf", "hnsw" or "auto" (flat below AUTO_FLAT_MAX items,
        else AUTO_LARGE_KIND) with that kind's parameters as keywords (``nlist=``, ``ef_search=``,
        ...; one the kind lacks is a ConfigError), or an ``IndexKind`` holding them (``index`` of a
        config). ``metric`` is "l2" or "ip" (normalise the vectors yourself for cosine). Unset
        parameters get measured defaults (default_nlist, ...).
        """
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
        if not isinstance(stamp, dict):
            raise ConfigError(f"stamp must be a dict, got {type(stamp).__name__}")
        if isinstance(kind, IndexKind):
            if params:
                raise ConfigError(f"pass the parameters inside the index kind, not as {', '.join(sorted(params))}")
            index_kind = kind
        else:
            index_kind = make_index_kind(kind, params, where="VectorIndex.build")
        array = _check_vectors(vectors, None, "vectors", DataError)
        items = _check_metadata(metadata, len(array))
        if len(array) == 0:
            raise DataError("cannot build an index from 0 vectors")
        n, dim = array.shape
        index = index_kind.make(dim, METRICS[metric], n, seed)
        self = cls(index, [], metric=metric, stamp=stamp, use_gpu=use_gpu)
        if not self._index.is_trained:
            self._index.train(array)
        self.add(array, items)
        return self

    def add(self, vectors: np.ndarray, metadata: Sequence[dict]) -> np.ndarray:
        """Append items without rebuilding (IVF keeps its trained quantizer); return their ids."""
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
        """"flat", "ivf" or "hnsw" (never "auto")."""
        return self._kind

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
        """Current search-time parameters (nlist/nprobe for IVF, ef_search for HNSW, none for flat)."""
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
        """Flat/IVF go to GPU 0 (an untrained IVF trains there); HNSW stays on the CPU."""
        if not on_gpu or self._kind == "hnsw":
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
                "stamp": self._stamp}
        with atomic_dir(directory) as tmp:
            try:
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
        index = _read(directory / INDEX_FILE, lambda path: faiss.read_index(str(path)))
        metadata = _read(directory / METADATA_FILE, _parse_metadata)
        checks = {"count": (index.ntotal, info["count"]), "dim": (index.d, info["dim"]),
                  "kind": (kind_of(index), info["kind"]),
                  "metadata lines": (len(metadata), info["count"])}
        for name, (found, stated) in checks.items():
            if found != stated:
                raise DataError(f"{directory} is inconsistent: {name} is {found!r} "
                                f"but {STAMP_FILE} says {stated!r}; rebuild it")
        return cls(index, metadata, metric=info["metric"], stamp=info["stamp"], use_gpu=use_gpu)


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
