"""Miners over a cross-modal distance matrix, plus the pair masks the losses share.

Rows of a distance matrix are image anchors ``f(i_a)``, columns are caption vectors ``t_b``; image
``a`` and caption ``b`` are positives iff ``labels[a] == ref_labels[b]``. Every function takes the
matrix and labels (no embeddings), so it can be checked on a hand-made matrix.

Triplet types follow pytorch-metric-learning's ``TripletMarginMiner`` exactly (``g = d_an - d_ap``):

- ``hard``: ``g <= 0`` (the negative is at least as close as the positive);
- ``semihard``: ``0 < g <= margin``;
- ``easy``: ``g > margin`` (these have zero hinge loss: a diagnostic, not a training choice);
- ``all``: ``g <= margin``, i.e. every margin-violating triplet (hard and semi-hard).
"""

from __future__ import annotations

import torch

from retrieval.errors import ConfigError

TRIPLET_TYPES = ("all", "hard", "semihard", "easy")
_ALIASES = {"semi-hard": "semihard", "semi_hard": "semihard"}


def positive_mask(labels: torch.Tensor, ref_labels: torch.Tensor | None = None) -> torch.Tensor:
    """(A, R) boolean matrix: True where anchor ``a`` and reference ``b`` share a label."""
    ref_labels = labels if ref_labels is None else ref_labels
    return labels[:, None] == ref_labels[None, :]


def split_pairs(matrix: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The entries of an (image, caption) matrix on positive pairs and on negative pairs."""
    positives = positive_mask(labels)
    return matrix[positives], matrix[~positives]


def triplet_type(name: str) -> str:
    """Validate a triplet type name (``semi-hard`` is accepted for ``semihard``)."""
    name = _ALIASES.get(name, name)
    if name not in TRIPLET_TYPES:
        raise ConfigError(f"unknown triplet mining {name!r}; choose one of: {', '.join(TRIPLET_TYPES)}")
    return name


def all_triplets(
    labels: torch.Tensor, ref_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (anchor, positive, negative) index triple, in pytorch-metric-learning's order.

    Built from the positive pairs and each anchor's negatives in O(#triplets), never through the
    (A, R, R) mask that ``torch.where`` would need (16M entries at batch 256).
    """
    positives = positive_mask(labels, ref_labels)
    anchor, positive = torch.where(positives)
    _, negative_column = torch.where(~positives)  # row-major: grouped by anchor, ascending
    negatives_per_row = (~positives).sum(dim=1)
    first_negative = torch.cumsum(negatives_per_row, dim=0) - negatives_per_row
    repeats = negatives_per_row[anchor]
    pair_start = torch.cumsum(repeats, dim=0) - repeats
    offset = torch.arange(int(repeats.sum()), device=labels.device) - pair_start.repeat_interleave(repeats)
    anchor, positive = anchor.repeat_interleave(repeats), positive.repeat_interleave(repeats)
    return anchor, positive, negative_column[first_negative[anchor] + offset]


def triplet_selection(
    distances: torch.Tensor,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None = None,
    margin: float = 0.2,
    kind: str = "all",
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """All triplets of the matrix and a boolean mask of those of type ``kind``."""
    kind = triplet_type(kind)
    anchor, positive, negative = all_triplets(labels, ref_labels)
    gap = distances[anchor, negative] - distances[anchor, positive]
    if kind == "easy":
        keep = gap > margin
    else:
        keep = gap <= margin
        if kind == "hard":
            keep &= gap <= 0
        elif kind == "semihard":
            keep &= gap > 0
    return (anchor, positive, negative), keep


def hardest_negatives(distances: torch.Tensor, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the closest column among ``negatives`` and whether the row has any negative."""
    masked = distances.masked_fill(~negatives, float("inf"))
    return masked.argmin(dim=1), negatives.any(dim=1)


def farthest_k(distances: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the column indices of the ``k`` largest distances (``exclude``d entries never)."""
    if exclude is not None:
        distances = distances.masked_fill(exclude, float("-inf"))
    return distances.topk(k, dim=1).indices


def farthest_bank(
    vectors: torch.Tensor, k: int, pool: torch.Tensor | None = None, chunk_size: int = 2048
) -> torch.Tensor:
    """(N, k) indices of the ``k`` farthest vectors of each vector, searched within ``pool``.

    ``pool`` (indices into ``vectors``) bounds the cost to O(N * len(pool)); ``None`` searches all
    vectors. A vector is never its own bank entry. Rows are processed in chunks to bound memory.
    """
    columns = torch.arange(len(vectors), device=vectors.device) if pool is None else pool.to(vectors.device)
    if not 1 <= k < len(columns):
        raise ConfigError(f"bank size must be between 1 and {len(columns) - 1}, got {k}")
    candidates = vectors[columns]
    banks = []
    for start in range(0, len(vectors), chunk_size):
        rows = torch.arange(start, min(start + chunk_size, len(vectors)), device=vectors.device)
        distances = torch.cdist(vectors[rows], candidates)
        chosen = farthest_k(distances, k, exclude=rows[:, None] == columns[None, :])
        banks.append(columns[chosen])
    return torch.cat(banks)


def sample_from_bank(bank: torch.Tensor, rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One uniformly random bank entry for each of ``rows``."""
    slot = torch.randint(bank.shape[1], (len(rows),), generator=generator)
    return bank[rows.cpu(), slot]
