"""Chunked retrieval metrics against a plain full-matrix reference, hand cases and a memory bound."""

from __future__ import annotations

import contextlib
import math
import tracemalloc

import numpy as np
import pytest

from retrieval.errors import ConfigError, DataError
from retrieval.metrics import (
    RetrievalMetrics,
    _ordered_keys,
    chance_recall,
    retrieval_metrics,
)


def brute_force(queries, items, query_labels, item_labels, ks, distance):
    """Full score matrix in float64, one stable sort per query; non-relevant first among ties."""
    q, x = np.asarray(queries, np.float64), np.asarray(items, np.float64)
    if distance == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    if distance == "l2":
        scores = -((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    else:
        scores = q @ x.T
    recall, precision = {k: [] for k in ks}, {k: [] for k in ks}
    ap, first = [], []
    for i in range(len(q)):
        relevant = np.asarray(item_labels) == query_labels[i]
        order = np.lexsort((relevant, -scores[i]))  # by score desc, then relevant last
        ranks = np.flatnonzero(relevant[order]) + 1
        first.append(ranks[0])
        ap.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        for k in ks:
            recall[k].append(ranks[0] <= k)
            precision[k].append(np.sum(ranks <= k) / k)
    return {
        **{f"R@{k}": np.mean(recall[k]) for k in ks},
        **{f"P@{k}": np.mean(precision[k]) for k in ks},
        "mAP": np.mean(ap),
        "MedR": np.median(first),
        "MeanR": np.mean(first),
        "num_queries": len(q),
    }


def quantized(rng, rows, dim):
    """Multiples of 1/4 in [-2, 2]: every float32 score is exact, so ties are real ties."""
    return (rng.integers(-8, 9, size=(rows, dim)) / 4).astype(np.float32)


def assert_same(result: RetrievalMetrics, expected: dict, exact: bool = True) -> None:
    got = result.as_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if exact:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-9), key


KS = (1, 2, 5, 10, 50)


@pytest.mark.parametrize("distance", ["l2", "ip"])
@pytest.mark.parametrize(
    "q, n, d, per_label",
    [(40, 60, 4, 1), (57, 113, 8, 5), (30, 90, 3, 30), (25, 400, 16, 100), (3, 1, 2, 1)],
)
def test_matches_brute_force_with_small_chunks(distance, q, n, d, per_label):
    """Few (broadcast path) and many (searchsorted path) relevant items, chunks of 7 x 13."""
    rng = np.random.default_rng(q * n + d)
    items, queries = quantized(rng, n, d), quantized(rng, q, d)
    item_labels = np.arange(n) // per_label
    query_labels = rng.choice(item_labels, size=q)
    expected = brute_force(queries, items, query_labels, item_labels, KS, distance)
    result = retrieval_metrics(
        queries, items, query_labels, item_labels, ks=KS, distance=distance, query_chunk=7, item_chunk=13
    )
    assert_same(result, expected)
    default_chunks = retrieval_metrics(queries, items, query_labels, item_labels, ks=KS, distance=distance)
    assert default_chunks == result


@pytest.mark.parametrize("distance", ["l2", "ip"])
@pytest.mark.parametrize("classes", [3, 40])
def test_ties_follow_the_pessimistic_rule(distance, classes):
    """Tiny integer embeddings: most scores are tied, between and within relevant sets."""
    rng = np.random.default_rng(classes)
    items = rng.integers(0, 3, size=(150, 2)).astype(np.float32)
    queries = rng.integers(0, 3, size=(60, 2)).astype(np.float32)
    item_labels = rng.integers(0, classes, size=150)
    query_labels = rng.choice(item_labels, size=60)
    expected = brute_force(queries, items, query_labels, item_labels, KS, distance)
    for chunks in [(7, 13), (60, 150), (1, 1)]:
        result = retrieval_metrics(
            queries, items, query_labels, item_labels, ks=KS, distance=distance,
            query_chunk=chunks[0], item_chunk=chunks[1],
        )
        assert_same(result, expected)


def test_zero_scores_tie_in_the_searchsorted_path():
    """Ten relevant items (more than the broadcast path takes) tie at score 0 with ten others."""
    items = np.array([[-0.0], [0.0]] * 10, dtype=np.float32)
    item_labels = np.arange(20) % 2 == np.arange(20) // 10  # mixes signs among the relevant items
    result = retrieval_metrics(np.ones((1, 1)), items, [1], item_labels.astype(int), ks=(10,), distance="ip")
    # relevant ranks are 11..20: AP = mean(m / (10 + m)), first rank 11, nothing in the top 10
    assert result.mean_average_precision == pytest.approx(np.mean([m / (10 + m) for m in range(1, 11)]))
    assert (result.median_rank, result.recall[10]) == (11.0, 0.0)


def test_integer_keys_order_like_floats():
    """The searchsorted path compares uint32 keys; they must order exactly like the scores."""
    rng = np.random.default_rng(5)
    special = [-np.inf, -3e38, -1.0, -1e-45, 0.0, 1e-45, 1e-38, 1.0, 3e38, np.inf]
    values = np.concatenate([special, rng.normal(size=500), rng.integers(-3, 4, size=500)]).astype(np.float32)
    keys = _ordered_keys(values)
    assert keys.dtype == np.uint32
    assert np.array_equal(keys[:, None] < keys[None, :], values[:, None] < values[None, :])
    assert np.array_equal(keys[:, None] == keys[None, :], values[:, None] == values[None, :])
    canonical_zero = np.array([-0.0], np.float32) + np.float32(0.0)  # what the caller does first
    assert _ordered_keys(canonical_zero)[0] == _ordered_keys(np.zeros(1, np.float32))[0]


def test_cosine_matches_brute_force_and_ignores_norms():
    rng = np.random.default_rng(1)
    items, queries = rng.normal(size=(200, 12)), rng.normal(size=(70, 12))
    item_labels, query_labels = np.arange(200) % 20, rng.integers(0, 20, size=70)
    expected = brute_force(queries, items, query_labels, item_labels, KS, "cosine")
    result = retrieval_metrics(
        queries, items, query_labels, item_labels, ks=KS, distance="cosine", query_chunk=7, item_chunk=13
    )
    assert_same(result, expected, exact=False)
    scaled = retrieval_metrics(
        queries * rng.uniform(0.5, 3, size=(70, 1)), items * rng.uniform(0.5, 3, size=(200, 1)),
        query_labels, item_labels, ks=KS, distance="cosine",
    )
    assert_same(scaled, expected, exact=False)


def test_hand_case_inner_product():
    # score of item j = its value: [5, 4, 3, 2, 1], item labels [0, 1, 0, 2, 1]
    # query label 0: relevant at ranks 1, 3 -> R@1 1, R@2 1, P@2 1/2, AP (1/1 + 2/3)/2 = 5/6
    # query label 1: relevant at ranks 2, 5 -> R@1 0, R@2 1, P@2 1/2, AP (1/2 + 2/5)/2 = 9/20
    # query label 2: relevant at rank 4    -> R@1 0, R@2 0, P@2 0,   AP 1/4
    # means: R@1 1/3, R@2 2/3, P@2 1/3, mAP (5/6 + 9/20 + 1/4)/3 = 23/45, MedR 2, MeanR 7/3
    items = np.array([[5.0], [4.0], [3.0], [2.0], [1.0]])
    labels = np.array([0, 1, 0, 2, 1])
    result = retrieval_metrics(np.ones((3, 1)), items, [0, 1, 2], labels, ks=(1, 2), distance="ip")
    assert result.recall == pytest.approx({1: 1 / 3, 2: 2 / 3})
    assert result.precision[2] == pytest.approx(1 / 3)
    assert result.mean_average_precision == pytest.approx(23 / 45)
    assert (result.median_rank, result.mean_rank) == (2.0, pytest.approx(7 / 3))


def test_hand_case_l2_with_ties():
    # query at 0, items at [0, 1, -1, 2, 3] -> scores [0, -1, -1, -4, -9]; items 1 and 2 tie
    # item labels [0, 1, 0, 2, 1]; among tied items the non-relevant one is ranked first:
    # query label 0: item 0 rank 1, item 2 rank 3 (behind item 1) -> AP (1 + 2/3)/2 = 5/6
    # query label 1: item 1 rank 3 (behind item 2), item 4 rank 5 -> AP (1/3 + 2/5)/2 = 11/30
    # query label 2: item 3 rank 4 -> AP 1/4
    # means: R@1 1/3, R@2 1/3, P@2 (1/2 + 0 + 0)/3 = 1/6, mAP (5/6 + 11/30 + 1/4)/3 = 29/60, MedR 3
    items = np.array([[0.0], [1.0], [-1.0], [2.0], [3.0]])
    result = retrieval_metrics(np.zeros((3, 1)), items, np.array([0, 1, 2]), np.array([0, 1, 0, 2, 1]), ks=(1, 2))
    assert result.recall == pytest.approx({1: 1 / 3, 2: 1 / 3})
    assert result.precision == pytest.approx({1: 1 / 3, 2: 1 / 6})
    assert result.mean_average_precision == pytest.approx(29 / 60)
    assert (result.median_rank, result.mean_rank) == (3.0, pytest.approx(8 / 3))


def test_cross_modal_both_directions_and_torch_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    images = quantized(rng, 30, 6)
    ids = np.concatenate([np.arange(30), rng.integers(0, 30, size=90)])  # 1..~8 captions per image
    captions = images[ids] + quantized(rng, len(ids), 6)
    image_ids = np.arange(30)
    images_t, captions_t, ids_t = torch.from_numpy(images), torch.from_numpy(captions), torch.from_numpy(ids)
    text_to_image = retrieval_metrics(captions_t, images_t, ids_t, torch.from_numpy(image_ids))
    image_to_text = retrieval_metrics(images_t, captions_t, torch.from_numpy(image_ids), ids_t)
    assert_same(text_to_image, brute_force(captions, images, ids, image_ids, (1, 5, 10), "l2"))
    assert_same(image_to_text, brute_force(images, captions, image_ids, ids, (1, 5, 10), "l2"))


def test_chance_recall_hand_values_and_monte_carlo():
    assert chance_recall(3, 10) == pytest.approx(0.3)
    assert chance_recall(2, 5, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert chance_recall(1, 5, 0) == 0.0 and chance_recall(7, 5, 1) == 1.0
    rng = np.random.default_rng(3)
    n, r, k, trials = 40, 5, 3, 20000
    top_k = rng.random((trials, n)).argsort(axis=1)[:, :k]  # the first r items are the relevant ones
    estimate = np.mean((top_k < r).any(axis=1))
    expected = chance_recall(k, n, r)
    assert abs(estimate - expected) < 4 * math.sqrt(expected * (1 - expected) / trials)


def test_errors_are_one_line_and_named():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(DataError, match="2 of 4 queries have no relevant item"):
        retrieval_metrics(x, x, [0, 1, 7, 9], [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="unknown distance 'dot'"):
        retrieval_metrics(x, x, [0, 1, 2, 3], [0, 1, 2, 3], distance="dot")
    with pytest.raises(ConfigError, match="ks"):
        retrieval_metrics(x, x, [0, 1, 2, 3], [0, 1, 2, 3], ks=(0, 5))
    with pytest.raises(DataError, match="dimension"):
        retrieval_metrics(x, np.zeros((4, 3)), [0, 1, 2, 3], [0, 1, 2, 3])
    with pytest.raises(DataError, match="zero vectors"):
        retrieval_metrics(x, x, [0, 1, 2, 3], [0, 1, 2, 3], distance="cosine")


BUDGET = 8 * 2**20


def single_blas_thread():
    """OpenBLAS threads spin badly on many small products when cores are shared; use one if we can."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "q, n, per_label",
    [(20_000, 20_000, 1), (4_000, 6_000, 300)],  # full float32 matrices: 1.6 GB and 96 MB
)
def test_peak_memory_stays_within_budget(q, n, per_label):
    """Broadcast (1 relevant item) and searchsorted (300) counting, traced with tracemalloc."""
    rng = np.random.default_rng(4)
    items = rng.normal(size=(n, 8)).astype(np.float32)
    queries = items[rng.integers(0, n, size=q)] + rng.normal(scale=0.3, size=(q, 8)).astype(np.float32)
    item_labels = np.arange(n) // per_label
    query_labels = rng.choice(item_labels, size=q)
    assert q * n * 4 > 10 * BUDGET
    with single_blas_thread():
        tracemalloc.start()
        try:
            result = retrieval_metrics(queries, items, query_labels, item_labels, max_bytes=BUDGET)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < BUDGET, f"peak {peak / 2**20:.1f} MiB for an {BUDGET / 2**20:.0f} MiB budget"
    assert result.num_queries == q and 1 <= result.median_rank <= n
