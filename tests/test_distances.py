"""Distance strategies: matrices against plain Python, the faiss metric, the mapping into search space."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrieval.distances import COSINE, DISTANCES, INNER_PRODUCT, L2, SQUARED_L2, distance_named, search_distance
from retrieval.errors import ConfigError
from retrieval.index import VectorIndex
from retrieval.metrics import retrieval_metrics


def plain(name: str, u: list[float], v: list[float]) -> float:
    """The distance between two vectors, written out."""
    dot = sum(a * b for a, b in zip(u, v))
    squared = sum((a - b) ** 2 for a, b in zip(u, v))
    return {"l2": math.sqrt(squared), "squared-l2": squared, "ip": -dot,
            "cosine": 1.0 - dot / (math.hypot(*u) * math.hypot(*v))}[name]


def batch(seed: int, rows: int, dim: int = 5) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", DISTANCES)
def test_matrix_and_paired_match_brute_force(name):
    distance, a, b = DISTANCES[name], batch(0, 4), batch(1, 6)
    expected = [[plain(name, u, v) for v in b.tolist()] for u in a.tolist()]
    assert torch.allclose(distance.matrix(a, b), torch.tensor(expected, dtype=torch.float64), atol=1e-9)
    rows = [plain(name, u, v) for u, v in zip(a.tolist(), b[:4].tolist())]
    assert torch.allclose(distance.paired(a, b[:4]), torch.tensor(rows, dtype=torch.float64), atol=1e-9)


def test_faiss_metric_and_search_space():
    assert {name: d.faiss_metric for name, d in DISTANCES.items()} == {
        "l2": "l2", "squared-l2": "l2", "cosine": "ip", "ip": "ip"}
    rows = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]], np.float32)
    unit = COSINE.to_search_space(rows)
    assert unit.dtype == np.float32 and np.allclose(unit, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]])  # zero stays zero
    assert np.allclose(COSINE.to_search_space(rows[0]), [0.6, 0.8])  # one vector (a query)
    assert torch.allclose(COSINE.to_search_space(torch.from_numpy(rows)), torch.from_numpy(unit))
    for distance in (L2, SQUARED_L2, INNER_PRODUCT):
        assert distance.to_search_space(rows) is rows


@pytest.mark.parametrize("name", DISTANCES)
def test_an_index_of_search_space_vectors_ranks_like_the_distance_matrix(name):
    distance = DISTANCES[name]
    items, queries = batch(2, 40).float(), batch(3, 5).float()
    index = VectorIndex.build(distance.to_search_space(items.numpy()), [{"i": i} for i in range(40)], kind="flat",
                              metric=distance.faiss_metric, stamp={}, use_gpu=False)
    found = index.search(distance.to_search_space(queries.numpy()), 10).ids
    expected = distance.matrix(queries.double(), items.double()).argsort(dim=1)[:, :10].numpy()
    assert (found == expected).all()


def test_retrieval_metrics_take_a_distance():
    rng = np.random.default_rng(4)
    items, queries = rng.normal(size=(60, 6)), rng.normal(size=(20, 6))
    labels = np.arange(60) % 10
    query_labels = rng.integers(0, 10, size=20)
    by_name = retrieval_metrics(queries, items, query_labels, labels, distance="l2")
    assert retrieval_metrics(queries, items, query_labels, labels, distance=SQUARED_L2) == by_name  # same ranking
    assert retrieval_metrics(queries, items, query_labels, labels, distance=COSINE) == retrieval_metrics(
        COSINE.to_search_space(queries), COSINE.to_search_space(items), query_labels, labels, distance=INNER_PRODUCT)


def test_names_are_checked_in_one_line():
    assert distance_named("cosine") is COSINE and distance_named(L2) is L2
    with pytest.raises(ConfigError, match="metric: unknown distance 'dot'; choose one of: l2, squared-l2, cosine, ip"):
        distance_named("dot", "metric")
    assert search_distance(COSINE, "auto") is COSINE and search_distance(COSINE, "l2") is L2
    with pytest.raises(ConfigError) as error:
        search_distance(L2, "euclid")
    assert str(error.value).startswith("index.metric: unknown 'euclid'; choose auto") and "\n" not in str(error.value)
