"""Tests for retrieval.index: exactness, recall at defaults, auto, persistence, add, atomicity."""

from __future__ import annotations

import functools
import json

import faiss
import numpy as np
import pytest

from retrieval import index as index_module
from retrieval.errors import ConfigError, DataError, QueryError, RetrievalError
from retrieval.index import INDEX_FILE, METADATA_FILE, STAMP_FILE, VectorIndex

STAMP = {"model": "ab12" * 10, "vectors": "glove-6b-50d", "dim": 50}


def clustered(n: int, dim: int = 50, *, seed: int = 0, clusters: int = 1000) -> np.ndarray:
    """Gaussian mixture like benchmarks/bench_index.py: centres N(0, I), std in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    scales = rng.uniform(0.5, 1.5, size=clusters).astype(np.float32)
    labels = rng.integers(clusters, size=n)
    noise = rng.standard_normal((n, dim), dtype=np.float32) * scales[labels, None]
    return noise + centres[labels]


def meta(start: int, stop: int) -> list[dict]:
    return [{"key": f"img{i}", "captions": [f"caption {i}"], "image": f"{i}.jpg"}
            for i in range(start, stop)]


def brute_force(base: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """Exact top-k in float64 numpy: (scores higher-is-better, ids)."""
    b, q = base.astype(np.float64), queries.astype(np.float64)
    if metric == "ip":
        scores = q @ b.T
    else:
        scores = -((q**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * q @ b.T)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / exact.shape[1] for f, e in zip(found, exact)]))


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value) and str(error.value)


@pytest.fixture(scope="module")
def big():
    """100k x 50 clustered vectors, 300 queries from the same mixture and exact top-10."""
    data = clustered(100_300, seed=1)
    base, queries = data[:100_000], data[100_000:]
    flat = faiss.IndexFlatL2(50)
    flat.add(base)
    return base, queries, flat.search(queries, 10)[1]


@pytest.fixture(scope="module")
def small():
    data = clustered(3_050, seed=2)
    return data[:3_000], data[3_000:]


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_flat_equals_brute_force(small, metric):
    base, queries = small
    if metric == "ip":
        base = base / np.linalg.norm(base, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    index = VectorIndex.build(base, meta(0, len(base)), kind="flat", metric=metric, stamp=STAMP)
    result = index.search(queries, 10)
    scores, ids = brute_force(base, queries, 10, metric)
    np.testing.assert_array_equal(result.ids, ids)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-4, atol=1e-3)
    assert result.scores.shape == (len(queries), 10) and result.ids.dtype == np.int64
    assert (np.diff(result.scores, axis=1) <= 0).all()  # best first, higher is better


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_default_recall_at_10(big, kind):
    base, queries, exact = big
    index = VectorIndex.build(base, meta(0, len(base)), kind=kind, stamp=STAMP)
    found = index.search(queries, 10).ids
    assert recall(found, exact) >= 0.95, index.search_params
    # new items are findable after an incremental add (IVF reuses its trained quantizer)
    extra = clustered(500, seed=3)
    new_ids = index.add(extra, meta(len(base), len(base) + 500))
    np.testing.assert_array_equal(index.search(extra, 1).ids[:, 0], new_ids)
    assert index.metadata_for(new_ids[:2])[1]["key"] == f"img{len(base) + 1}"


def test_auto_picks_by_size(monkeypatch):
    assert index_module.auto_kind(49_999) == "flat"
    assert index_module.auto_kind(50_000) == index_module.AUTO_LARGE_KIND == "ivf"
    monkeypatch.setattr(index_module, "AUTO_FLAT_MAX", 2_000)  # same rule, cheaper sizes
    data = clustered(2_000, seed=4)
    assert VectorIndex.build(data[:1_999], meta(0, 1_999), stamp=STAMP).kind == "flat"
    large = VectorIndex.build(data, meta(0, 2_000), kind="auto", stamp=STAMP)
    assert large.kind == index_module.AUTO_LARGE_KIND
    assert set(index_module.INDEX_KINDS.names()) == {"auto", "flat", "hnsw", "ivf"}


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, small, kind):
    base, queries = small
    index = VectorIndex.build(base, meta(0, len(base)), kind=kind, metric="ip", stamp=STAMP)
    index.save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted(
        [INDEX_FILE, METADATA_FILE, STAMP_FILE])
    loaded = VectorIndex.load(tmp_path / "index", expected_stamp=STAMP)
    before, after = index.search(queries, 10), loaded.search(queries, 10)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_allclose(after.scores, before.scores)
    assert (loaded.kind, loaded.metric, loaded.dim, len(loaded)) == (kind, "ip", 50, len(base))
    assert loaded.stamp == STAMP and loaded.search_params == index.search_params
    assert loaded.metadata_for([5, 0]) == meta(5, 6) + meta(0, 1)
    info = json.loads((tmp_path / "index" / STAMP_FILE).read_text())
    assert info["count"] == len(base) and info["stamp"] == STAMP and info["kind"] == kind


def test_mismatched_stamp_is_refused(tmp_path, small):
    VectorIndex.build(small[0], meta(0, 3_000), kind="flat", stamp=STAMP).save(tmp_path / "ix")
    with pytest.raises(ConfigError, match="built with model 'ab12ab12ab12…' but the loaded"
                                          " model is 'cd34'.*retrieval index") as error:
        VectorIndex.load(tmp_path / "ix", expected_stamp={"model": "cd34", "dim": 50})
    assert_one_line(error)
    VectorIndex.load(tmp_path / "ix", expected_stamp={"vectors": "glove-6b-50d"})  # subset ok


@pytest.mark.parametrize("damage", ["garbage index", "truncated index", "bad metadata line",
                                    "missing stamp", "bad stamp json", "metadata count",
                                    "foreign index type"])
def test_corrupt_files_raise_data_error(tmp_path, small, damage):
    folder = tmp_path / "ix"
    VectorIndex.build(small[0], meta(0, 3_000), kind="ivf", stamp=STAMP).save(folder)
    index_bytes = (folder / INDEX_FILE).read_bytes()
    lines = (folder / METADATA_FILE).read_text().splitlines()
    culprit = {"garbage index": INDEX_FILE, "truncated index": INDEX_FILE,
               "bad metadata line": METADATA_FILE, "missing stamp": STAMP_FILE,
               "bad stamp json": STAMP_FILE, "metadata count": METADATA_FILE,
               "foreign index type": INDEX_FILE}[damage]
    if damage == "garbage index":
        (folder / INDEX_FILE).write_bytes(b"not a faiss index at all" * 10)
    elif damage == "truncated index":
        (folder / INDEX_FILE).write_bytes(index_bytes[: len(index_bytes) // 2])
    elif damage == "bad metadata line":
        (folder / METADATA_FILE).write_text("\n".join(lines[:7] + ["{oops"] + lines[8:]) + "\n")
    elif damage == "missing stamp":
        (folder / STAMP_FILE).unlink()
    elif damage == "bad stamp json":
        (folder / STAMP_FILE).write_text("{")
    elif damage == "foreign index type":
        lsh = faiss.IndexLSH(50, 16)
        lsh.add(small[0])
        faiss.write_index(lsh, str(folder / INDEX_FILE))
    else:
        (folder / METADATA_FILE).write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError) as error:
        VectorIndex.load(folder)
    assert_one_line(error)
    inconsistent = damage in ("metadata count", "foreign index type")  # named by folder
    named = str(folder) if inconsistent else str(folder / culprit)
    assert named in str(error.value)


def test_flat_incremental_add_equals_full_build(small):
    base, queries = small
    full = VectorIndex.build(base, meta(0, 3_000), kind="flat", stamp=STAMP)
    part = VectorIndex.build(base[:1_000], meta(0, 1_000), kind="flat", stamp=STAMP)
    new_ids = part.add(base[1_000:], meta(1_000, 3_000))
    np.testing.assert_array_equal(new_ids, np.arange(1_000, 3_000))
    a, b = full.search(queries, 10), part.search(queries, 10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert part.metadata_for(b.ids[0]) == full.metadata_for(a.ids[0])


def test_atomic_save_keeps_previous_index(tmp_path, small, monkeypatch):
    folder = tmp_path / "ix"
    VectorIndex.build(small[0][:100], meta(0, 100), kind="flat", stamp=STAMP).save(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken_write(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    newer = VectorIndex.build(small[0], meta(0, 3_000), kind="flat", stamp={"model": "new"})
    with pytest.raises(DataError, match="disk full"):
        newer.save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]  # no temporary leftovers
    assert len(VectorIndex.load(folder, expected_stamp=STAMP)) == 100


def test_k_is_clipped_and_minus_one_never_returned(small):
    base, queries = small
    tiny = VectorIndex.build(base[:20], meta(0, 20), kind="hnsw", stamp=STAMP)
    result = tiny.search(queries, 50)
    assert result.ids.shape == (len(queries), 20)
    assert all(sorted(row) == list(range(20)) for row in result.ids.tolist())
    # IVF with one probed list of ~60 items cannot fill k=200 alone: short rows are re-searched
    ivf = VectorIndex.build(base, meta(0, 3_000), kind="ivf", nlist=50, nprobe=1, stamp=STAMP)
    wide = ivf.search(queries, 200)
    assert wide.ids.shape == (len(queries), 200) and (wide.ids >= 0).all()
    assert recall(wide.ids, brute_force(base, queries, 200, "l2")[1]) >= 0.99  # all lists probed


TINY = np.arange(12, dtype=np.float32).reshape(3, 4)
build = functools.partial(VectorIndex.build, stamp=STAMP)


def tiny_flat() -> VectorIndex:
    return build(TINY, meta(0, 3), kind="flat")


BAD_CALLS = {  # name: (call, error type, fragment of the one-line message)
    "metadata length": (lambda: build(TINY, meta(0, 2)), DataError, "2 metadata"),
    "3-D vectors": (lambda: build(TINY[None], meta(0, 1)), DataError, "2-D"),
    "NaN vectors": (lambda: build(np.full((3, 4), np.nan), meta(0, 3)), DataError, "NaN"),
    "unknown kind": (lambda: build(TINY, meta(0, 3), kind="annoy"), ConfigError, "flat, hnsw"),
    "unknown metric": (lambda: build(TINY, meta(0, 3), metric="cos"), ConfigError, "metric"),
    "nlist > n": (lambda: build(TINY, meta(0, 3), kind="ivf", nlist=9), ConfigError, "nlist"),
    "bad nprobe": (lambda: build(TINY, meta(0, 3), kind="ivf", nprobe=0), ConfigError, "nprobe"),
    "query dim": (lambda: tiny_flat().search(np.zeros((2, 5)), 3), QueryError, "dimension 5"),
    "1-D query": (lambda: tiny_flat().search(np.zeros(4), 3), QueryError, "2-D"),
    "k = 0": (lambda: tiny_flat().search(np.zeros((1, 4)), 0), QueryError, "k must"),
    "add dim": (lambda: tiny_flat().add(np.zeros((1, 3)), meta(0, 1)), DataError, "dimension 3"),
    "unknown id": (lambda: tiny_flat().metadata_for([7]), QueryError, "id 7"),
    "missing dir": (lambda: VectorIndex.load("no/such/dir"), DataError, "no/such/dir"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_invalid_inputs_give_one_line_errors(case):
    call, error_type, fragment = BAD_CALLS[case]
    with pytest.raises(error_type, match=fragment) as error:
        call()
    assert_one_line(error)
    assert isinstance(error.value, RetrievalError)


@pytest.mark.skipif(index_module.gpu_available(), reason="a GPU is present")
def test_use_gpu_true_without_gpu_is_a_config_error(small):
    with pytest.raises(ConfigError, match="use_gpu=True") as error:
        VectorIndex.build(small[0], meta(0, 3_000), kind="flat", stamp=STAMP, use_gpu=True)
    assert_one_line(error)
    assert not VectorIndex.build(small[0], meta(0, 3_000), kind="flat", stamp=STAMP).on_gpu


def test_gpu_plumbing_with_a_fake_gpu(monkeypatch, tmp_path, small):
    """Flat/IVF go through index_cpu_to_gpu, HNSW stays on the CPU, save copies back."""
    moved, copied_back = [], []

    def to_gpu(resources, device, index):
        moved.append(index_module.kind_of(index))
        return faiss.clone_index(index)  # stands in for a GPU index

    def to_cpu(index):
        copied_back.append(index_module.kind_of(index))
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", to_cpu, raising=False)
    base, queries = small
    for kind in ["flat", "ivf", "hnsw"]:
        index = VectorIndex.build(base, meta(0, 3_000), kind=kind, stamp=STAMP, use_gpu=True)
        assert index.on_gpu == (kind != "hnsw")
        assert (index.search(queries, 200).ids >= 0).all()
        index.save(tmp_path / kind)
    assert moved == ["flat", "ivf"] and copied_back == ["flat", "ivf"]
    with pytest.raises(QueryError, match="GPU limit"):
        VectorIndex.load(tmp_path / "flat", expected_stamp=STAMP).search(queries, 2_049)
    assert moved == ["flat", "ivf", "flat"]
