"""How two embeddings are compared: one small strategy object per geometry.

A :class:`Distance` gives the (A, B) distance matrix and the row-wise distances (torch, for the
losses), the faiss metric that an index of its search-space vectors compares by, and the mapping
of a vector into that search space. Cosine maps every side (images, captions, queries) to unit
length, so that the inner product of mapped vectors ranks exactly like cosine similarity; the
other distances leave vectors as they are (squared L2 ranks like L2).

A loss owns its distance (``loss.distance``): training, evaluation, the index build and search all
take it from there, so the geometry a model was trained for is the one it is searched with.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.errors import ConfigError

Vectors = TypeVar("Vectors", np.ndarray, torch.Tensor)


class Distance:
    """Base class; subclasses set :attr:`name` and :attr:`faiss_metric` and implement the matrices."""

    #: the name configs and records use (``index.metric``, evaluation reports)
    name: str = ""
    #: what a faiss index of search-space vectors compares by: ``l2`` (squared L2) or ``ip`` (inner product)
    faiss_metric: str = "l2"
    #: whether search-space vectors have unit length (a zero vector then has no direction)
    unit_length: bool = False

    def matrix(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(A, B) distances between every row of ``a`` and every row of ``b``."""
        raise NotImplementedError

    def paired(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B,) distances between row ``i`` of ``a`` and row ``i`` of ``b``."""
        raise NotImplementedError

    def to_search_space(self, vectors: Vectors) -> Vectors:
        """Rows (numpy or torch, 1-D for one vector) as an index of this distance stores them: unchanged."""
        return vectors

    def __repr__(self) -> str:
        return f"<distance {self.name}>"


class EuclideanDistance(Distance):
    """``||a - b||``."""

    name = "l2"

    def matrix(self, a, b):
        return torch.cdist(a, b)

    def paired(self, a, b):
        return (a - b).pow(2).sum(dim=1).clamp_min(1e-12).sqrt()  # clamped: a finite gradient at a == b


class SquaredEuclideanDistance(Distance):
    """``||a - b||^2``: ranks like L2, penalises far pairs more in a loss."""

    name = "squared-l2"

    def matrix(self, a, b):
        return torch.cdist(a, b).pow(2)

    def paired(self, a, b):
        return (a - b).pow(2).sum(dim=1)


class CosineDistance(Distance):
    """``1 - cos(a, b)``; search compares unit vectors by inner product."""

    name, faiss_metric, unit_length = "cosine", "ip", True

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(A, B) cosine similarities: what similarity-based losses (circle, multi-similarity) work on."""
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T

    def matrix(self, a, b):
        return 1.0 - self.similarity(a, b)

    def paired(self, a, b):
        return 1.0 - F.cosine_similarity(a, b, dim=1)

    def to_search_space(self, vectors: Vectors) -> Vectors:
        """Each row divided by its L2 norm (a zero row stays zero)."""
        if isinstance(vectors, torch.Tensor):
            return F.normalize(vectors, dim=-1)
        norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
        return (vectors / np.maximum(norms, 1e-12)).astype(vectors.dtype, copy=False)


class InnerProductDistance(Distance):
    """``-a.b``: not a metric, but it ranks like maximum inner-product search on raw vectors."""

    name, faiss_metric = "ip", "ip"

    def matrix(self, a, b):
        return -(a @ b.T)

    def paired(self, a, b):
        return -(a * b).sum(dim=1)


L2 = EuclideanDistance()
SQUARED_L2 = SquaredEuclideanDistance()
COSINE = CosineDistance()
INNER_PRODUCT = InnerProductDistance()
DISTANCES: dict[str, Distance] = {d.name: d for d in (L2, SQUARED_L2, COSINE, INNER_PRODUCT)}


def distance_named(name: str | Distance, where: str = "distance") -> Distance:
    """The distance called ``name`` (a :class:`Distance` passes through); one-line ConfigError otherwise."""
    if isinstance(name, Distance):
        return name
    try:
        return DISTANCES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"{where}: unknown distance {name!r}; choose one of: {', '.join(DISTANCES)}") from None


def search_distance(trained: Distance, configured: str = "auto") -> Distance:
    """What an index compares by: the loss's own distance (``auto``) or the one ``index.metric`` names."""
    if configured == "auto":
        return trained
    if configured not in DISTANCES:
        raise ConfigError(f"index.metric: unknown {configured!r}; choose auto (the loss's distance) or one of: "
                          f"{', '.join(DISTANCES)}")
    return DISTANCES[configured]
