"""Miners select exactly the triplets, negatives and bank entries they claim, on hand-made inputs."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.miners import TripletMarginMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from retrieval.errors import ConfigError
from retrieval.losses.miners import (
    all_triplets,
    farthest_bank,
    farthest_k,
    hardest_negatives,
    positive_mask,
    sample_from_bank,
    split_pairs,
    triplet_selection,
    triplet_type,
)

# Rows: image anchors; columns: captions; identity labels; margin 0.5. Gap g = d_an - d_ap:
#   row 0: d_ap 1.0, n=1: 0.8 (g=-0.2 hard),      n=2: 1.7 (g=0.7 easy)
#   row 1: d_ap 1.0, n=0: 1.0 (g=0 hard, boundary), n=2: 1.5 (g=0.5 semihard, boundary)
#   row 2: d_ap 0.5, n=0: 2.0 (g=1.5 easy),       n=1: 0.75 (g=0.25 semihard)
DISTANCES = torch.tensor([[1.0, 0.8, 1.7], [1.0, 1.0, 1.5], [2.0, 0.75, 0.5]], dtype=torch.float64)
IDENTITY = torch.arange(3)
EXPECTED = {
    "hard": {(0, 0, 1), (1, 1, 0)},
    "semihard": {(1, 1, 2), (2, 2, 1)},
    "easy": {(0, 0, 2), (2, 2, 0)},
}
EXPECTED["all"] = EXPECTED["hard"] | EXPECTED["semihard"]


def mine_triplets(distances, labels, ref_labels, margin, kind):
    """The (anchor, positive, negative) triplets that ``triplet_selection`` keeps (what triplet-mined trains on)."""
    (anchor, positive, negative), keep = triplet_selection(distances, labels, ref_labels, margin, kind)
    return anchor[keep], positive[keep], negative[keep]


def as_set(triplets: tuple[torch.Tensor, ...]) -> set[tuple[int, ...]]:
    return set(zip(*(t.tolist() for t in triplets)))


@pytest.mark.parametrize("kind", ["hard", "semihard", "easy", "all"])
def test_mine_triplets_selects_exactly_the_hand_made_types(kind: str) -> None:
    assert as_set(mine_triplets(DISTANCES, IDENTITY, IDENTITY, margin=0.5, kind=kind)) == EXPECTED[kind]


def test_semi_hard_alias_and_unknown_type() -> None:
    assert triplet_type("semi-hard") == "semihard"
    with pytest.raises(ConfigError) as error:
        triplet_type("hardest")
    assert "\n" not in str(error.value) and "semihard" in str(error.value)


def test_all_triplets_with_shared_labels() -> None:
    labels = torch.tensor([0, 0, 1])
    # images 0 and 1 have captions 0 and 1 as positives and caption 2 as negative; image 2 the reverse
    expected = {(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2), (2, 2, 0), (2, 2, 1)}
    assert as_set(all_triplets(labels, labels)) == expected
    assert positive_mask(labels).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    positive, negative = split_pairs(DISTANCES, labels)
    assert sorted(positive.tolist()) == sorted([1.0, 0.8, 1.0, 1.0, 0.5])
    assert sorted(negative.tolist()) == sorted([1.7, 1.5, 2.0, 0.75])


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [0, 0, 1, 2, 2, 2, 3], [1, 1, 1], [3, 0, 3, 1, 0]])
def test_all_triplets_equals_pml_in_order(labels: list[int]) -> None:
    label_tensor = torch.tensor(labels)
    ours = all_triplets(label_tensor, label_tensor)
    theirs = lmu.get_all_triplets_indices(label_tensor, label_tensor.clone())
    assert all(torch.equal(mine, their) for mine, their in zip(ours, theirs))


@pytest.mark.parametrize("kind", ["hard", "semihard", "easy", "all"])
def test_mine_triplets_matches_pytorch_metric_learning(kind: str) -> None:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(10, 4, generator=generator, dtype=torch.float64)
    captions = torch.randn(10, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 5, 5])
    distance = LpDistance(normalize_embeddings=False)
    pml = TripletMarginMiner(margin=0.3, type_of_triplets=kind, distance=distance)
    expected = pml(images, labels, captions, labels.clone())
    ours = mine_triplets(torch.cdist(images, captions), labels, labels, margin=0.3, kind=kind)
    assert len(ours[0]) > 0
    for mine, theirs in zip(ours, expected):
        assert torch.equal(mine, theirs)


def test_hardest_negatives_picks_the_closest_non_positive() -> None:
    negatives = ~positive_mask(torch.tensor([0, 0, 1]))
    chosen, has_negative = hardest_negatives(DISTANCES, negatives)
    assert chosen.tolist() == [2, 2, 1]  # row 2: min(2.0, 0.75) is column 1
    assert has_negative.all()
    _, has_negative = hardest_negatives(DISTANCES, ~positive_mask(torch.zeros(3, dtype=torch.long)))
    assert not has_negative.any()


def test_farthest_k_never_returns_an_excluded_entry() -> None:
    distances = torch.tensor([[9.0, 1.0, 2.0], [1.0, 9.0, 3.0], [2.0, 3.0, 9.0]])
    assert farthest_k(distances, 1, exclude=torch.eye(3, dtype=torch.bool)).squeeze(1).tolist() == [2, 2, 1]


def test_farthest_bank_on_points_of_a_line() -> None:
    vectors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [6.0, 0.0]])
    bank = farthest_bank(vectors, 2, chunk_size=3)  # two chunks
    assert [set(row) for row in bank.tolist()] == [{3, 2}, {3, 2}, {0, 1}, {0, 1}]
    pooled = farthest_bank(vectors, 1, pool=torch.tensor([0, 1, 2]))
    assert pooled.squeeze(1).tolist() == [2, 2, 0, 0]  # caption 3 is outside the pool
    assert farthest_bank(vectors, 1, pool=torch.tensor([2, 3])).squeeze(1).tolist() == [3, 3, 3, 2]  # never itself
    with pytest.raises(ConfigError):
        farthest_bank(vectors, 4)


def test_sample_from_bank_draws_only_and_all_bank_entries() -> None:
    bank = torch.tensor([[3, 2], [3, 2], [0, 1], [0, 1]])
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 2])
    draws = torch.stack([sample_from_bank(bank, rows, generator) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {2, 3}
    assert set(draws[:, 1].tolist()) == {0, 1}
