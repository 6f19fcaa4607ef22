"""Tests for retrieval.index: exactness, recall at defaults, auto (choice, recall tuning), chunked and
on-disk builds, persistence, add, atomicity."""

from __future__ import annotations

import functools
import json
import re

import faiss
import numpy as np
import pytest

from retrieval import index as index_module
from retrieval.errors import ConfigError, DataError, QueryError, RetrievalError
from retrieval.index import INDEX_FILE, METADATA_FILE, STAMP_FILE, VectorIndex

HNSW_COST = index_module.HNSW_DISTANCE_COST
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


def isotropic(n: int, dim: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


def test_auto_picks_by_size_and_memory_budget():
    auto = index_module.AutoKind
    gb = 10**9
    assert auto(max_memory="1GB").resolve(49_999, 50) == index_module.FlatKind()
    assert auto(max_memory="1GB").resolve(50_000, 50) == index_module.IvfKind()  # large: approximate
    # 1M x 50: IVF-Flat needs 1M * (200 + 8) bytes plus its centroids; 150 MB forces IVF-PQ
    assert auto(max_memory=gb).resolve(10**6, 50) == index_module.IvfKind()
    assert index_module.build_footprint(index_module.IvfKind(), 10**6, 50) > 208 * 10**6
    pq = auto(max_memory="150MB").resolve(10**6, 50)
    assert isinstance(pq, index_module.IvfPqKind)
    larger = [m for m in range(pq.pq_m + 1, 51) if 50 % m == 0][0]  # the next finer code does not fit
    assert index_module.build_footprint(pq, 10**6, 50) <= 150 * 10**6
    assert index_module.build_footprint(index_module.IvfPqKind(pq_m=larger), 10**6, 50) > 150 * 10**6
    assert auto(max_memory="400MB").resolve(10**6, 50) == index_module.IvfKind()
    # a small collection that does not fit flat goes approximate; on_disk always builds IVF lists in a file
    assert auto(max_memory="8.3MB").resolve(40_000, 50) == index_module.FlatKind()  # 8 MB + held-out queries
    with pytest.raises(ConfigError, match="too small"):
        auto(max_memory="8.1MB").resolve(40_000, 50)  # approximate kinds need their training sample too
    assert auto(on_disk=True).resolve(1_000, 50) == index_module.IvfKind(on_disk=True)
    with pytest.raises(ConfigError, match=r"max_memory 1.05 MB is too small for 10000000 vectors.*on_disk") as error:
        auto(max_memory="1MiB").resolve(10**7, 50)
    assert_one_line(error)
    assert set(index_module.INDEX_KINDS.names()) == {"auto", "flat", "hnsw", "ivf", "ivf-pq"}


@pytest.mark.parametrize(("value", "expected"), [(2**20, 2**20), ("4GB", 4 * 10**9), ("512MiB", 512 * 2**20),
                                                 ("1.5 gb", 1_500_000_000), ("3000000", 3_000_000)])
def test_max_memory_is_parsed(value, expected):
    assert index_module.parse_memory(value) == expected
    assert index_module.AutoKind(max_memory=value).max_memory_bytes == expected


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("max_memory", "4 parsecs", "max_memory must be a size"), ("max_memory", "10kB", "at least 1MiB"),
    ("max_memory", True, "max_memory"), ("min_recall", 0, r"min_recall must be a number in \(0, 1\]"),
    ("min_recall", 1.5, "min_recall must be"), ("on_disk", "maybe", "on_disk")])
def test_bad_auto_settings_are_refused_when_the_config_loads(field, value, fragment):
    from retrieval.config import load_config

    with pytest.raises(ConfigError, match=fragment) as error:
        load_config(None, ["index.kind=auto", f"index.{field}={value}"])
    assert_one_line(error)
    assert "index" in str(error.value)


def test_auto_settings_load_from_the_config():
    from retrieval.config import load_config

    config = load_config(None, ["index.max_memory=4GB", "index.min_recall=0.9", "index.on_disk=true"])
    assert config.index.params == index_module.AutoKind(max_memory="4GB", min_recall=0.9, on_disk=True)
    with pytest.raises(ConfigError, match="index kind 'flat' takes no parameter|parameters of index kind 'flat'"):
        load_config(None, ["index.kind=flat", "index.min_recall=0.9"])  # never silently ignored


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_auto_reaches_min_recall_where_the_old_choice_did_not(monkeypatch, metric):
    """Isotropic 20k x 50: the old auto (IVF, nprobe 64) finds ~0.7 of the top 10; auto now tunes nprobe."""
    monkeypatch.setattr(index_module, "AUTO_FLAT_MAX", 10_000)  # 20k then gets an approximate index, as 50k+ do
    data = isotropic(20_300, seed=5)
    if metric == "ip":
        data /= np.linalg.norm(data, axis=1, keepdims=True)
    base, queries = data[:20_000], data[20_000:]  # fresh queries, never seen by the build
    exact = brute_force(base, queries, 10, metric)[1]
    old = VectorIndex.build(base, meta(0, 20_000), kind="ivf", nprobe=64, metric=metric, stamp=STAMP)
    assert recall(old.search(queries, 10).ids, exact) < 0.85
    # 12MB holds this IVF and its training sample, not an HNSW index beside it (test_auto_picks_hnsw_...)
    new = VectorIndex.build(base, meta(0, 20_000), kind="auto", metric=metric, max_memory="12MB", stamp=STAMP)
    info = new.build_info
    assert new.kind == info["kind"] == "ivf" and info["requested"] == "auto" and info["min_recall"] == 0.95
    assert info["recall@10"] >= 0.95 and info["params"] == new.search_params
    assert recall(new.search(queries, 10).ids, exact) >= 0.93  # the held-out estimate holds on fresh queries
    # the tuning kept the smallest nprobe that met the target: the trial just below it fell short
    trials = {trial["nprobe"]: trial["recall@10"] for trial in info["trials"]}
    assert trials[new.search_params["nprobe"]] == info["recall@10"]
    assert max(r for n, r in trials.items() if n < new.search_params["nprobe"]) < 0.95


def _held_out_recall(base: np.ndarray, index: VectorIndex, seed: int) -> float:
    """recall@10 of the held-out rows of a build against numpy brute force, each row's own id left out."""
    held_out, _train = index_module.sample_rows(len(base), index_module.recall_query_count(len(base)),
                                                index.build_info["train_size"], seed=seed)
    found = index.search(base[held_out], 11).ids
    exact = brute_force(base, base[held_out], 11, "l2")[1]
    hits = [len({*[i for i in f if i != own][:10]} & {*[i for i in e if i != own][:10]})
            for own, f, e in zip(held_out, found, exact)]
    return sum(hits) / (10 * len(held_out))


@pytest.mark.slow
def test_auto_picks_hnsw_where_ivf_needs_a_large_nprobe(monkeypatch):
    """Isotropic 20k x 50: IVF needs nprobe ~190 of ~490 lists (~10k distances a query); HNSW meets 0.95 with
    far fewer, so auto keeps HNSW, tuned to the smallest efSearch that meets min_recall on queries its graph
    does not hold, and the estimate holds on fresh queries against brute force."""
    monkeypatch.setattr(index_module, "AUTO_FLAT_MAX", 10_000)
    data = isotropic(20_300, seed=5)
    base, queries = data[:20_000], data[20_000:]
    index = VectorIndex.build(base, meta(0, 20_000), kind="auto", stamp=STAMP, seed=4)
    info = index.build_info
    assert index.kind == info["kind"] == "hnsw" and info["params"] == index.search_params
    assert info["recall@10"] >= 0.95
    ivf, hnsw = info["candidates"]
    assert ivf["kind"] == "ivf" and ivf["recall@10"] >= 0.95 and ivf["distances_per_query"] > 4096
    assert hnsw["params"] == index.search_params and hnsw["cost"] < ivf["cost"]
    trials = {trial["ef_search"]: trial["recall@10"] for trial in info["trials"]}
    assert max(r for ef, r in trials.items() if ef < index.search_params["ef_search"]) < 0.95
    assert recall(index.search(queries, 10).ids, brute_force(base, queries, 10, "l2")[1]) >= 0.93
    assert len(index) == 20_000 and index.metadata_for([7])[0]["key"] == "img7"


def test_auto_weighs_hnsw_against_ivf_by_distances(monkeypatch):
    """The rule at a small scale (thresholds lowered): HNSW is built when the IVF scans a lot, and kept only
    when it meets min_recall with fewer weighted distances; the IVF is kept otherwise."""
    monkeypatch.setattr(index_module, "AUTO_FLAT_MAX", 1_000)
    monkeypatch.setattr(index_module, "AUTO_HNSW_MIN_DISTANCES", 100)
    data = isotropic(2_200, dim=16, seed=8)
    base, queries = data[:2_000], data[2_000:]
    index = VectorIndex.build(base, meta(0, 2_000), kind="auto", stamp=STAMP, seed=2)
    ivf, hnsw = index.build_info["candidates"]
    assert index.kind == "hnsw" and HNSW_COST * hnsw["distances_per_query"] == pytest.approx(hnsw["cost"], abs=1)
    assert hnsw["cost"] < ivf["cost"] and index.build_info["recall@10"] == hnsw["recall@10"] >= 0.95
    assert hnsw["params"] == index.search_params == index.build_info["params"]
    assert recall(index.search(queries, 10).ids, brute_force(base, queries, 10, "l2")[1]) >= 0.93
    assert ivf["recall@10"] == round(_held_out_recall(base, VectorIndex.build(
        base, meta(0, 2_000), kind="ivf", nprobe=ivf["params"]["nprobe"], stamp=STAMP, seed=2), 2), 4)
    # an HNSW that cannot reach min_recall (efSearch capped at 1) is never kept, however cheap
    monkeypatch.setattr(index_module.HnswKind, "search_param_limit", lambda self, index: 1)
    index = VectorIndex.build(base, meta(0, 2_000), kind="auto", stamp=STAMP, seed=2)
    ivf, hnsw = index.build_info["candidates"]
    assert index.kind == "ivf" and hnsw["recall@10"] < 0.95 <= ivf["recall@10"] == index.build_info["recall@10"]
    # no room for HNSW beside the IVF, or the IVF scans little: HNSW is not even built
    auto = index_module.AutoKind
    ivf_kind = index_module.IvfKind()
    assert auto(max_memory="1GB").consider_hnsw(ivf_kind, 2_000, 16, 10**6) == index_module.HnswKind()
    assert auto(max_memory="1MiB").consider_hnsw(ivf_kind, 2_000, 16, 10**6) is None
    assert auto(max_memory="1GB").consider_hnsw(ivf_kind, 2_000, 16, 90) is None  # under 5% of 2000
    assert auto(max_memory="1GB").consider_hnsw(index_module.IvfPqKind(pq_m=1), 2_000, 16, 10**6) is None
    assert auto(max_memory="1GB").consider_hnsw(index_module.IvfKind(on_disk=True), 2_000, 16, 10**6) is None


def test_measured_recall_equals_brute_force_on_the_held_out_rows(small):
    """build_info's recall is recall@10 of the held-out rows against numpy brute force, own row left out."""
    base, _ = small
    index = VectorIndex.build(base, meta(0, 3_000), kind="ivf", nlist=40, nprobe=2, stamp=STAMP, seed=3)
    held_out, _train = index_module.sample_rows(3_000, index_module.recall_query_count(3_000),
                                                index.build_info["train_size"], seed=3)
    found = index.search(base[held_out], 11).ids
    exact = brute_force(base, base[held_out], 11, "l2")[1]
    hits = [len({*[i for i in f if i != own][:10]} & {*[i for i in e if i != own][:10]})
            for own, f, e in zip(held_out, found, exact)]
    assert index.build_info["recall@10"] == round(sum(hits) / (10 * len(held_out)), 4) < 1.0
    assert index.build_info["trials"] == [{"nprobe": 2, "recall@10": index.build_info["recall@10"]}]
    assert index.build_info["min_recall"] is None  # an explicit kind is measured, not tuned


def test_unreachable_min_recall_is_a_one_line_error(monkeypatch):
    data = isotropic(5_000, dim=8, seed=6)
    # as if the budget left room for 1-byte codes only (see test_auto_picks_by_size_and_memory_budget):
    # 8 dims in one byte cannot reach 0.95, whatever nprobe
    monkeypatch.setattr(index_module.AutoKind, "resolve", lambda self, n, dim: index_module.IvfPqKind(pq_m=1))
    with pytest.raises(ConfigError, match=r"ivf-pq \(nlist=\d+, nprobe=\d+, pq_m=1\) reaches recall@10 0\.\d+ "
                                          r"over all its lists, below index.min_recall 0.95; raise") as error:
        VectorIndex.build(data, meta(0, 5_000), kind="auto", max_memory="1GB", stamp=STAMP)
    assert_one_line(error)
    lists, probed = re.search(r"nlist=(\d+), nprobe=(\d+)", str(error.value)).groups()
    # the budget has room for HNSW, but auto considers it only beside an IVF-Flat that met min_recall
    assert lists == probed  # tuned up to every list before giving up
    # lowering min_recall explicitly accepts the coarse index, and its stamp says how coarse it is
    index = VectorIndex.build(data, meta(0, 5_000), kind="auto", min_recall=0.05, stamp=STAMP)
    assert index.kind == "ivf-pq" and 0.05 <= index.build_info["recall@10"] < 0.95


def test_stamp_records_the_choice_and_the_recall(tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "AUTO_FLAT_MAX", 1_000)
    data = clustered(4_000, seed=7)
    index = VectorIndex.build(data, meta(0, 4_000), kind="auto", min_recall=0.9, stamp=STAMP)
    index.save(tmp_path / "ix")
    info = json.loads((tmp_path / "ix" / STAMP_FILE).read_text())
    assert info["build"] == index.build_info and info["build"]["recall@10"] >= 0.9
    assert info["build"]["params"] == info["search_params"] == index.search_params
    assert info["stamp"] == STAMP  # the model identity is unchanged
    assert VectorIndex.load(tmp_path / "ix", expected_stamp=STAMP).build_info == index.build_info
    flat = VectorIndex.build(data[:500], meta(0, 500), stamp=STAMP)
    assert flat.kind == "flat" and flat.build_info["recall@10"] == 1.0 and flat.build_info["trials"] == []


@pytest.mark.slow
def test_ivf_pq_round_trip_and_code_size(tmp_path, small):
    base, queries = small
    index = VectorIndex.build(base, meta(0, 3_000), kind="ivf-pq", pq_m=10, nlist=20, nprobe=20, stamp=STAMP)
    assert index.kind == "ivf-pq" and index.search_params == {"nlist": 20, "nprobe": 20, "pq_m": 10}
    assert recall(index.search(queries, 10).ids, brute_force(base, queries, 10, "l2")[1]) >= 0.5
    index.save(tmp_path / "pq")
    loaded = VectorIndex.load(tmp_path / "pq")
    np.testing.assert_array_equal(loaded.search(queries, 10).ids, index.search(queries, 10).ids)
    with pytest.raises(ConfigError, match="pq_m must divide the dimension 50, got 7"):
        VectorIndex.build(base, meta(0, 3_000), kind="ivf-pq", pq_m=7, stamp=STAMP)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_chunked_build_equals_one_shot_build(small, kind):
    base, queries = small
    chunks = [base[:700], base[700:701], base[701:2_500], base[2_500:]]
    one_shot = VectorIndex.build(base, meta(0, 3_000), kind=kind, stamp=STAMP, seed=4)
    chunked = index_module.build_index_from_chunks(chunks, 3_000, 50, meta(0, 3_000), kind=kind, stamp=STAMP,
                                                   seed=4)
    a, b = one_shot.search(queries, 10), chunked.search(queries, 10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert chunked.metadata_for([2_999]) == meta(2_999, 3_000) and chunked.build_info == one_shot.build_info
    if kind == "ivf":  # the same as faiss trained on the sampled rows and filled with everything
        held_out, train = index_module.sample_rows(3_000, 300, min(chunked.build_info["train_size"], 2_700), 4)
        assert len(train) == chunked.build_info["train_size"] and not set(held_out) & set(train)
        reference = index_module.IvfKind().make(50, faiss.METRIC_L2, 3_000, seed=4)
        reference.train(base[train])
        reference.add(base)
        reference.nprobe = chunked.search_params["nprobe"]
        np.testing.assert_array_equal(reference.search(queries, 10)[1], b.ids)


def test_chunked_build_never_holds_all_vectors(small):
    """Chunks are read twice (sample, then add); only the sampled rows are copied in the first pass."""
    base, _ = small
    reads = []

    class Chunks:
        def __iter__(self):
            for start in range(0, 3_000, 500):
                reads.append(start)
                yield base[start:start + 500]

    index = index_module.build_index_from_chunks(Chunks(), 3_000, 50, kind="ivf", nlist=10, stamp=STAMP)
    assert len(index) == 3_000 and reads == list(range(0, 3_000, 500)) * 2
    with pytest.raises(ConfigError, match="re-iterable"):
        index_module.build_index_from_chunks(iter([base]), 3_000, 50, kind="flat", stamp=STAMP)
    with pytest.raises(DataError, match="hold 2500 vectors but 3000 were announced"):
        index_module.build_index_from_chunks([base[:2_500]], 3_000, 50, kind="flat", stamp=STAMP)
    with pytest.raises(DataError, match=r"chunk 1 have shape \(10, 3\)"):
        index_module.build_index_from_chunks([base[:10], np.zeros((10, 3))], 20, 50, kind="ivf", stamp=STAMP)


def test_npy_chunks_build(tmp_path, small):
    base, queries = small
    paths = []
    for number, start in enumerate(range(0, 3_000, 1_000)):
        paths.append(tmp_path / f"part{number}.npy")
        np.save(paths[-1], base[start:start + 1_000].astype(np.float16))  # embedding shards may be float16
    chunks = index_module.NpyChunks(paths)
    assert (chunks.count, chunks.dim) == (3_000, 50)
    index = index_module.build_index_from_chunks(chunks, chunks.count, chunks.dim, kind="flat", stamp=STAMP)
    expected = VectorIndex.build(base.astype(np.float16).astype(np.float32), meta(0, 3_000), kind="flat",
                                 stamp=STAMP)
    np.testing.assert_array_equal(index.search(queries, 10).ids, expected.search(queries, 10).ids)


@pytest.mark.parametrize("kind", ["ivf", "ivf-pq"])
def test_on_disk_lists_round_trip(tmp_path, small, kind):
    base, queries = small
    params = {"nlist": 30, "nprobe": 5, **({"pq_m": 5} if kind == "ivf-pq" else {})}
    in_memory = VectorIndex.build(base, meta(0, 3_000), kind=kind, stamp=STAMP, **params)
    chunks = [base[:1_000], base[1_000:2_200], base[2_200:]]
    on_disk = index_module.build_index_from_chunks(chunks, 3_000, 50, meta(0, 3_000), kind=kind, on_disk=True,
                                                   stamp=STAMP, workdir=tmp_path, **params)
    assert on_disk.on_disk and not in_memory.on_disk and on_disk.build_info["on_disk"]
    expected = in_memory.search(queries, 10)
    for index in (on_disk, None):
        if index is None:  # written, then reopened from the folder
            on_disk.save(tmp_path / "ix")
            assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == sorted(
                [INDEX_FILE, METADATA_FILE, STAMP_FILE, index_module.ONDISK_LISTS_FILE])
            index = VectorIndex.load(tmp_path / "ix", expected_stamp=STAMP)
            assert index.on_disk and index.kind == kind and index.metadata_for([7]) == meta(7, 8)
        found = index.search(queries, 10)
        np.testing.assert_array_equal(found.ids, expected.ids)
        np.testing.assert_allclose(found.scores, expected.scores, rtol=1e-6)
    with pytest.raises(ConfigError, match="on-disk inverted lists cannot grow"):
        index.add(base[:2], meta(0, 2))
    (tmp_path / "ix" / index_module.ONDISK_LISTS_FILE).unlink()
    with pytest.raises(DataError, match="index.ivfdata is missing"):
        VectorIndex.load(tmp_path / "ix")


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
