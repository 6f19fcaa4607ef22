"""Every loss against values computed in plain Python, against pytorch-metric-learning, and end to end.

References below are plain-Python loops over lists (never the code under test); gradients are
checked against central differences of those references, or against pml's autograd.
"""

from __future__ import annotations

import math
from typing import Annotated

import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import (
    ArcFaceLoss,
    CircleLoss,
    ContrastiveLoss,
    HistogramLoss,
    MultiSimilarityLoss,
    TripletMarginLoss,
)
from pytorch_metric_learning.miners import MultiSimilarityMiner, TripletMarginMiner

from retrieval.config import config_from_dict, load_config
from retrieval.distances import COSINE, DISTANCES, L2, SQUARED_L2
from retrieval.errors import ConfigError
from retrieval.losses import LOSSES, LossFamily, build_loss, create_loss, describe_loss
from retrieval.losses.settings import AtLeast, PositiveInt, checked_settings, settings_of
from retrieval.negatives import NEGATIVE_SAMPLERS, NO_NEGATIVE, NegativeSampler

Rows = list[list[float]]


# ---------------------------------------------------------------- plain-Python helpers
def dist(u: list[float], v: list[float]) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v)))


def cos(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v)) / (math.hypot(*u) * math.hypot(*v))


def avg_nonzero(values: list[float]) -> float:
    kept = [v for v in values if v > 0]
    return sum(kept) / len(kept) if kept else 0.0


def numeric_grad(fn, rows: Rows, eps: float = 1e-6) -> Rows:
    grad = [[0.0] * len(row) for row in rows]
    for i, row in enumerate(rows):
        for j in range(len(row)):
            up = [r[:] for r in rows]
            down = [r[:] for r in rows]
            up[i][j] += eps
            down[i][j] -= eps
            grad[i][j] = (fn(up) - fn(down)) / (2 * eps)
    return grad


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def run(loss, images: Rows, captions: Rows, labels: list[int] | None):
    image = t64(images).requires_grad_(True)
    output = loss(image, t64(captions), None if labels is None else torch.tensor(labels))
    output.value.backward()
    return output, image.grad


def check(loss, images: Rows, captions: Rows, labels: list[int], reference, grad: bool = True):
    """Value equals ``reference(images)`` and autograd equals its central differences."""
    output, image_grad = run(loss, images, captions, labels)
    assert output.value.item() == pytest.approx(reference(images), abs=1e-9)
    if grad:
        assert torch.allclose(image_grad, t64(numeric_grad(reference, images)), atol=1e-6)
    return output


def cross_modal_pairs(labels: torch.Tensor):
    """(a1, p, a2, n) over [images; captions] with only image->caption pairs (for pml without ref_emb)."""
    size = len(labels)
    same = labels[:, None] == labels[None, :]
    a1, p = torch.where(same)
    a2, n = torch.where(~same)
    return a1, p + size, a2, n + size


def random_batch(seed: int, size: int = 8, dim: int = 4):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, dim, generator=generator, dtype=torch.float64)
    captions = torch.randn(size, dim, generator=generator, dtype=torch.float64)
    return images, captions


LABEL_SETS = [list(range(8)), [0, 0, 1, 1, 2, 3, 3, 4]]


def ours_value_and_grad(loss, images: torch.Tensor, captions: torch.Tensor, labels: torch.Tensor):
    leaf = images.clone().requires_grad_(True)
    value = loss(leaf, captions, labels).value
    value.backward()
    return value.detach(), leaf.grad


def pml_concat_value_and_grad(pml_loss, images, captions, labels, indices):
    leaf = images.clone().requires_grad_(True)
    value = pml_loss(torch.cat([leaf, captions]), torch.cat([labels, labels]), indices)
    value.backward()
    return value.detach(), leaf.grad


def assert_agree(ours, theirs) -> None:
    assert torch.allclose(ours[0], theirs[0], atol=1e-5), (ours[0], theirs[0])
    assert torch.allclose(ours[1], theirs[1], atol=1e-5)
    assert ours[1].abs().sum() > 0


# ---------------------------------------------------------------- triplet (existing)
TRIPLET_IMAGES = [[-1.0, -1.0], [0.0, 1.0], [1.0, 1.0]]
TRIPLET_CAPTIONS = [[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]]


def ref_triplet_hard(images: Rows, captions: Rows, labels: list[int], margin: float) -> float:
    total = 0.0
    for b, f in enumerate(images):
        candidates = [c for c in range(len(captions)) if labels[c] != labels[b]]
        n = max(candidates, key=lambda c: dist(captions[b], captions[c]))
        total += max(0.0, margin + dist(f, captions[b]) - dist(f, captions[n]))
    return total / len(images)


def test_triplet_hand_value_and_gradient() -> None:
    # caption distances: |t0-t1| 2, |t0-t2| 3, |t1-t2| sqrt(13): hard negatives are 2, 2, 1
    loss = create_loss("triplet", margin=2.0, negatives="farthest")
    output, grad = run(loss, TRIPLET_IMAGES, TRIPLET_CAPTIONS, None)
    labels = [0, 1, 2]
    assert output.value.item() == pytest.approx(ref_triplet_hard(TRIPLET_IMAGES, TRIPLET_CAPTIONS, labels, 2.0))
    expected = []
    for f, positive, negative in zip(TRIPLET_IMAGES, TRIPLET_CAPTIONS, [TRIPLET_CAPTIONS[i] for i in (2, 2, 1)]):
        d_pos, d_neg = dist(f, positive), dist(f, negative)
        active = 2.0 + d_pos - d_neg > 0
        expected.append(
            [((x - p) / d_pos - (x - n) / d_neg) / 3 if active else 0.0 for x, p, n in zip(f, positive, negative)]
        )
    assert 0 < output.active_fraction < 1  # both the hinge's branches are exercised
    assert torch.allclose(grad, t64(expected), atol=1e-12)
    positive_distances = [dist(f, t) for f, t in zip(TRIPLET_IMAGES, TRIPLET_CAPTIONS)]
    assert output.mean_pos_distance == pytest.approx(sum(positive_distances) / 3)


# ---------------------------------------------------------------- regression
def test_sigmoid_ce_hand_value_embed_and_state() -> None:
    loss = create_loss("sigmoid-ce", embedding_dim=2)
    with pytest.raises(ConfigError):
        loss(t64([[0.0, 0.0]]), t64([[0.0, 0.0]]))
    loss.prepare(t64([[0.0, -2.0], [4.0, 2.0], [2.0, 0.0]]))  # min (0, -2), span (4, 4)
    captions = [[1.0, 0.0], [4.0, -2.0]]  # targets (0.25, 0.5) and (1, 0)
    targets = [[0.25, 0.5], [1.0, 0.0]]

    def reference(outputs: Rows) -> float:
        terms = []
        for row, target in zip(outputs, targets):
            for x, y in zip(row, target):
                s = 1 / (1 + math.exp(-x))
                terms.append(-(y * math.log(s) + (1 - y) * math.log(1 - s)))
        return sum(terms) / len(terms)

    check(loss, [[0.0, 1.0], [2.0, -1.0]], captions, [0, 1], reference)
    logits = torch.logit(t64([[0.25, 0.5], [0.9, 0.1]]))
    assert torch.allclose(loss.embed(logits), t64([[1.0, 0.0], [3.6, -1.6]]))
    restored = create_loss("sigmoid-ce", embedding_dim=2)
    restored.load_state_dict(loss.state_dict())
    assert torch.allclose(restored.embed(logits), loss.embed(logits))


def test_mse_and_cosine_hand_values() -> None:
    images, captions = [[1.0, 2.0], [0.0, 0.5]], [[0.0, 0.0], [3.0, 4.0]]
    reference = lambda rows: sum((x - y) ** 2 for f, t in zip(rows, captions) for x, y in zip(f, t)) / 4  # noqa: E731
    output = check(create_loss("mse"), images, captions, [0, 1], reference)
    assert output.mean_pos_distance == pytest.approx((math.sqrt(5) + math.sqrt(9 + 12.25)) / 2)
    assert output.mean_neg_distance == pytest.approx((math.sqrt(4 + 4) + 0.5) / 2)
    images, captions = [[1.0, 0.2], [1.0, 1.5]], [[0.0, 2.0], [2.0, 2.0]]
    reference = lambda rows: sum(1 - cos(f, t) for f, t in zip(rows, captions)) / 2  # noqa: E731
    check(create_loss("cosine"), images, captions, [0, 1], reference)


# ---------------------------------------------------------------- class losses
HEAD_W, HEAD_B = [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], [0.0, 0.5, 0.0]


def ref_softmax(rows: Rows, labels: list[int]) -> list[float]:
    losses = []
    for f, y in zip(rows, labels):
        logits = [sum(w * x for w, x in zip(ws, f)) + b for ws, b in zip(HEAD_W, HEAD_B)]
        losses.append(-logits[y] + math.log(sum(math.exp(z) for z in logits)))
    return losses


def with_head(loss):
    with torch.no_grad():
        loss.head.weight.copy_(t64(HEAD_W))
        loss.head.bias.copy_(t64(HEAD_B))
    return loss


def test_softmax_ce_hand_value() -> None:
    images, labels = [[1.0, 2.0], [0.0, -1.0]], [0, 2]  # logits (1, 2.5, -3) and (0, -0.5, 1)
    loss = with_head(create_loss("softmax-ce", num_classes=3, embedding_dim=2).double())
    output = check(loss, images, [[0.0, 0.0], [1.0, 1.0]], labels, lambda rows: sum(ref_softmax(rows, labels)) / 2)
    assert output.active_fraction == 0.5  # row 0 is classified as class 1
    assert len(list(loss.parameters())) == 2


def test_center_hand_value() -> None:
    images, labels, centers = [[1.0, 2.0], [0.0, -1.0]], [0, 2], [[1.0, 1.0], [0.0, 0.0], [2.0, -1.0]]
    loss = create_loss("center", num_classes=3, embedding_dim=2, weight=0.1).double()
    with_head(loss.softmax)
    with torch.no_grad():
        loss.centers.copy_(t64(centers))

    def reference(rows: Rows) -> float:
        pull = [0.5 * dist(f, centers[y]) ** 2 for f, y in zip(rows, labels)]
        return sum(ref_softmax(rows, labels)) / 2 + 0.1 * sum(pull) / 2

    check(loss, images, [[0.0, 0.0], [1.0, 1.0]], labels, reference)
    assert loss.centers.grad is not None and loss.centers.grad.abs().sum() > 0


def test_arcface_hand_value_and_pml() -> None:
    weights = [[1.0, 0.0, -1.0], [0.2, 1.0, 0.3]]  # (D, C): class j's weight is column j
    images, labels, margin = [[1.0, 0.3], [0.1, 1.0], [-1.0, 0.2]], [0, 1, 2], math.radians(30.0)
    loss = create_loss("arcface", num_classes=3, embedding_dim=2, margin=30.0, scale=2.0).double()
    with torch.no_grad():
        loss.pml_loss.W.copy_(t64(weights))
    columns = [list(c) for c in zip(*weights)]

    def reference(rows: Rows) -> float:
        total = 0.0
        for f, y in zip(rows, labels):
            cosines = [cos(f, w) for w in columns]
            logits = [2.0 * (math.cos(math.acos(c) + margin) if j == y else c) for j, c in enumerate(cosines)]
            total += -logits[y] + math.log(sum(math.exp(z) for z in logits))
        return total / len(rows)

    check(loss, images, [[0.0, 0.0]] * 3, labels, reference)
    pml = ArcFaceLoss(3, 2, margin=30.0, scale=2.0)
    with torch.no_grad():
        pml.W.data = t64(weights)
    images64, label_tensor = t64(images), torch.tensor(labels)
    leaf = images64.clone().requires_grad_(True)
    pml(leaf, label_tensor).backward()
    ours = ours_value_and_grad(loss, images64, t64([[0.0, 0.0]] * 3), label_tensor)
    assert_agree(ours, (pml(images64, label_tensor).detach(), leaf.grad))


# ---------------------------------------------------------------- pair losses
def ref_contrastive(images: Rows, captions: Rows, labels: list[int], pos_margin: float, neg_margin: float) -> float:
    positive, negative = [], []
    for a, f in enumerate(images):
        for b, t in enumerate(captions):
            d = dist(f, t)
            if labels[a] == labels[b]:
                positive.append(max(0.0, d - pos_margin))
            else:
                negative.append(max(0.0, neg_margin - d))
    return avg_nonzero(positive) + avg_nonzero(negative)


CONTRASTIVE_IMAGES = [[0.0, 0.2], [3.0, 0.0], [1.0, 1.0]]
CONTRASTIVE_CAPTIONS = [[0.5, 0.0], [1.0, 0.4], [2.0, 2.0]]


CONTRASTIVE_CASES = [
    ("contrastive", {"margin": 1.5}, (0.0, 1.5)),
    ("double-margin", {"pos_margin": 0.75, "neg_margin": 1.5}, (0.75, 1.5)),
]


@pytest.mark.parametrize("name,kwargs,margins", CONTRASTIVE_CASES)
def test_contrastive_hand_values(name: str, kwargs: dict, margins: tuple[float, float]) -> None:
    labels = [0, 1, 0]
    reference = lambda rows: ref_contrastive(rows, CONTRASTIVE_CAPTIONS, labels, *margins)  # noqa: E731
    output = check(create_loss(name, **kwargs), CONTRASTIVE_IMAGES, CONTRASTIVE_CAPTIONS, labels, reference)
    assert 0 < output.active_fraction < 1


@pytest.mark.parametrize("labels", LABEL_SETS)
@pytest.mark.parametrize("margins", [(0.0, 1.0), (0.5, 2.5)])
def test_contrastive_matches_pml(labels: list[int], margins: tuple[float, float]) -> None:
    images, captions = random_batch(1)
    label_tensor = torch.tensor(labels)
    pml = ContrastiveLoss(pos_margin=margins[0], neg_margin=margins[1], distance=LpDistance(normalize_embeddings=False))
    theirs = pml_concat_value_and_grad(pml, images, captions, label_tensor, cross_modal_pairs(label_tensor))
    ours_loss = create_loss("double-margin", pos_margin=margins[0], neg_margin=margins[1])
    assert_agree(ours_value_and_grad(ours_loss, images, captions, label_tensor), theirs)


# ---------------------------------------------------------------- mined triplets, quadruplet
def ref_mined_triplet(images: Rows, captions: Rows, labels: list[int], margin: float, kind: str) -> float:
    losses = []
    for a, f in enumerate(images):
        for p in (p for p in range(len(captions)) if labels[p] == labels[a]):
            for n in (n for n in range(len(captions)) if labels[n] != labels[a]):
                gap = dist(f, captions[n]) - dist(f, captions[p])
                kinds = {"hard": gap <= 0, "semihard": 0 < gap <= margin, "easy": gap > margin, "all": gap <= margin}
                keep = kinds[kind]
                if keep:
                    losses.append(max(0.0, margin - gap))
    return avg_nonzero(losses)


MINED_IMAGES = [[0.0, 0.0], [2.0, 1.0], [1.0, 3.0], [0.5, 2.0]]
MINED_CAPTIONS = [[0.7, 0.1], [1.5, 0.0], [0.0, 2.6], [1.2, 2.1]]


@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
def test_mined_triplet_hand_values(kind: str) -> None:
    labels = [0, 1, 2, 2]
    reference = lambda rows: ref_mined_triplet(rows, MINED_CAPTIONS, labels, 1.0, kind)  # noqa: E731
    check(create_loss("triplet-mined", margin=1.0, mining=kind), MINED_IMAGES, MINED_CAPTIONS, labels, reference)


@pytest.mark.parametrize("labels", LABEL_SETS)
@pytest.mark.parametrize("kind", ["all", "hard", "semihard"])
def test_mined_triplet_matches_pml(labels: list[int], kind: str) -> None:
    images, captions = random_batch(2)
    label_tensor = torch.tensor(labels)
    distance = LpDistance(normalize_embeddings=False)
    miner = TripletMarginMiner(margin=0.5, type_of_triplets=kind, distance=distance)
    pml = TripletMarginLoss(margin=0.5, distance=distance)
    leaf = images.clone().requires_grad_(True)
    triplets = miner(leaf, label_tensor, captions, label_tensor.clone())
    value = pml(leaf, label_tensor, triplets, captions, label_tensor.clone())
    value.backward()
    ours = ours_value_and_grad(create_loss("triplet-mined", margin=0.5, mining=kind), images, captions, label_tensor)
    assert_agree(ours, (value.detach(), leaf.grad))


def ref_quadruplet(images: Rows, captions: Rows, labels: list[int], m1: float, m2: float) -> float:
    total = 0.0
    for i, f in enumerate(images):
        j = max((j for j in range(len(captions)) if labels[j] == labels[i]), key=lambda j: dist(f, captions[j]))
        k = min((k for k in range(len(captions)) if labels[k] != labels[i]), key=lambda k: dist(f, captions[k]))
        others = [l for l in range(len(images)) if labels[l] not in (labels[i], labels[k])]
        total += max(0.0, m1 + dist(f, captions[j]) - dist(f, captions[k]))
        if others:
            l = min(others, key=lambda l: dist(images[l], captions[k]))
            total += max(0.0, m2 + dist(f, captions[j]) - dist(images[l], captions[k]))
    return total / len(images)


@pytest.mark.parametrize("labels", [[0, 1, 2, 2], [0, 1, 0, 1], [0, 1, 2, 3]])
def test_quadruplet_hand_values(labels: list[int]) -> None:
    reference = lambda rows: ref_quadruplet(rows, MINED_CAPTIONS, labels, 2.0, 1.5)  # noqa: E731
    loss = create_loss("quadruplet", margin=2.0, second_margin=1.5)
    output = check(loss, MINED_IMAGES, MINED_CAPTIONS, labels, reference)
    assert output.value.item() > 0


# ---------------------------------------------------------------- rows without a negative
# A short last batch can hold one image's captions only: no row has a negative caption.
ONE_LABEL_LOSSES = [("triplet", {"negatives": name}) for name in NEGATIVE_SAMPLERS.names()] + [
    ("triplet-offline", {}), ("quadruplet", {}), ("triplet-mined", {}), ("histogram", {}), ("multi-similarity", {})]


@pytest.mark.parametrize("name,settings", ONE_LABEL_LOSSES)
def test_a_batch_of_one_label_gives_a_zero_loss_that_backpropagates(name: str, settings: dict) -> None:
    loss = create_loss(name, **settings)
    loss.prepare(t64([[9.0, 9.0], [8.0, 8.0]]))  # triplet-offline: the batch's captions are not in its bank
    images = t64(TRIPLET_IMAGES).requires_grad_(True)
    output = loss(images, t64(TRIPLET_CAPTIONS), torch.zeros(3, dtype=torch.long))
    assert output.value.item() == 0.0 and output.value.grad_fn is not None
    output.value.backward()
    assert torch.equal(images.grad, torch.zeros_like(images))
    assert output.active_fraction == 0.0


class FixedNegatives(NegativeSampler):
    """A sampler stand-in that gives the negatives it was made with (row 1: none)."""

    def __call__(self, text_emb, labels, generator=None, image_to_text=None):
        return torch.tensor([2, NO_NEGATIVE, 1])


def test_a_row_without_a_negative_is_left_out_of_the_triplet_mean() -> None:
    loss = create_loss("triplet", margin=2.0)
    loss.sampler = FixedNegatives()
    images, captions = TRIPLET_IMAGES, TRIPLET_CAPTIONS

    def reference(rows: Rows) -> float:  # rows 0 and 2 only, halved
        return (max(0.0, 2.0 + dist(rows[0], captions[0]) - dist(rows[0], captions[2]))
                + max(0.0, 2.0 + dist(rows[2], captions[2]) - dist(rows[2], captions[1]))) / 2

    output = check(loss, images, captions, [0, 1, 2], reference)
    assert reference(images) > 0
    assert output.mean_pos_distance == pytest.approx((dist(images[0], captions[0]) + dist(images[2], captions[2])) / 2)
    assert output.mean_neg_distance == pytest.approx((dist(images[0], captions[2]) + dist(images[2], captions[1])) / 2)


def test_triplet_offline_leaves_out_a_row_outside_the_bank_without_a_batch_negative() -> None:
    loss = create_loss("triplet-offline", margin=10.0, bank_size=1)
    loss.prepare(t64([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [6.0, 0.0]]))  # farthest: 3, 3, 0, 0
    # one label: rows 0, 1 draw from their banks ((6, 0) and (0, 0)); row 2 is not a training caption
    # and the batch holds no caption of another label, so it has no term
    images, captions = [[0.0, 1.0], [5.0, 1.0], [2.0, 2.0]], [[0.0, 0.0], [5.0, 0.0], [2.5, 0.0]]
    reference = lambda rows: sum(  # noqa: E731
        max(0.0, 10.0 + dist(f, t) - dist(f, n)) for f, t, n in zip(rows, captions, [[6.0, 0.0], [0.0, 0.0]])
    ) / 2
    check(loss, images, captions, [0, 0, 0], reference)


# ---------------------------------------------------------------- offline bank
def test_triplet_offline_bank_value_fallback_and_refresh() -> None:
    training = t64([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [6.0, 0.0]])  # farthest: 3, 3, 0, 0
    loss = create_loss("triplet-offline", margin=10.0, bank_size=1)
    loss.prepare(training)
    assert loss.bank.squeeze(1).tolist() == [3, 3, 0, 0]
    images, captions = [[0.0, 1.0], [5.0, 1.0]], [[0.0, 0.0], [5.0, 0.0]]  # negatives (6, 0) and (0, 0)
    reference = lambda rows: sum(  # noqa: E731
        max(0.0, 10.0 + dist(f, t) - dist(f, n)) for f, t, n in zip(rows, captions, [[6.0, 0.0], [0.0, 0.0]])
    ) / 2
    check(loss, images, captions, [0, 1], reference)
    # a caption outside the training set falls back to the batch's farthest caption
    output, _ = run(loss, [[0.0, 1.0], [9.0, 9.0]], [[0.5, 0.0], [7.0, 0.0]], None)
    assert output.mean_neg_distance == pytest.approx((dist([0.0, 1.0], [7.0, 0.0]) + dist([9.0, 9.0], [0.5, 0.0])) / 2)
    pooled = create_loss("triplet-offline", bank_size=1, pool_size=2, seed=1)
    pooled.prepare(training)
    banks = set()
    for epoch in range(1, 21):
        before = pooled.bank
        pooled.on_epoch_start(epoch)
        assert (pooled.bank is before) == (epoch == 1)  # prepare() made the first epoch's bank
        banks.add(tuple(pooled.bank.squeeze(1).tolist()))
    assert len(banks) > 1  # a fresh random pool each epoch


# ---------------------------------------------------------------- similarity losses
def ref_histogram(images: Rows, captions: Rows, labels: list[int], bins: int) -> float:
    def histogram(values: list[float]) -> list[float]:
        h = [0.0] * (bins + 1)
        for s in values:
            x = (s + 1) * bins / 2
            r = min(math.floor(x), bins - 1)
            h[r] += 1 - (x - r)
            h[r + 1] += x - r
        return [v / len(values) for v in h]

    pairs = [(labels[a] == labels[b], cos(f, t)) for a, f in enumerate(images) for b, t in enumerate(captions)]
    positive = histogram([s for same, s in pairs if same])
    negative = histogram([s for same, s in pairs if not same])
    return sum(negative[r] * sum(positive[: r + 1]) for r in range(bins + 1))


def test_histogram_hand_value() -> None:
    labels = [0, 1, 2, 2]
    reference = lambda rows: ref_histogram(rows, MS_CAPTIONS, labels, 4)  # noqa: E731
    output = check(create_loss("histogram", n_bins=4), MS_IMAGES, MS_CAPTIONS, labels, reference)
    assert 0 < output.value.item() < 1


@pytest.mark.parametrize("labels", LABEL_SETS)
def test_histogram_matches_pml_on_cross_modal_triplets(labels: list[int]) -> None:
    images, captions = random_batch(4)
    label_tensor = torch.tensor(labels)
    a1, p, a2, n = cross_modal_pairs(label_tensor)
    triplet_rows, triplet_cols = torch.where(a1[:, None] == a2[None, :])
    triplets = (a1[triplet_rows], p[triplet_rows], n[triplet_cols])
    theirs = pml_concat_value_and_grad(HistogramLoss(n_bins=10), images, captions, label_tensor, triplets)
    assert_agree(ours_value_and_grad(create_loss("histogram", n_bins=10), images, captions, label_tensor), theirs)


def ref_multi_similarity(images: Rows, captions: Rows, labels: list[int]) -> float:
    threshold, eps, alpha, beta = 0.5, 0.1, 2.0, 50.0  # the paper's (and our) defaults
    total = 0.0
    for a, f in enumerate(images):
        sims = [(labels[a] == labels[b], cos(f, t)) for b, t in enumerate(captions)]
        positive = [s for same, s in sims if same]
        negative = [s for same, s in sims if not same]
        kept_neg = [s for s in negative if s + eps > min(positive)]
        kept_pos = [s for s in positive if s - eps < max(negative)]
        total += math.log(1 + sum(math.exp(-alpha * (s - threshold)) for s in kept_pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (s - threshold)) for s in kept_neg)) / beta
    return total / len(images)


MS_IMAGES = [[1.0, 0.6, 0.0], [0.7, 1.0, 0.3], [0.0, 0.4, 1.0], [0.9, 0.2, 0.5]]  # rows 0, 1 have mined pairs
MS_CAPTIONS = [[1.0, 0.5, 0.2], [0.3, 1.0, 0.0], [0.1, 0.2, 1.0], [1.0, 0.0, 0.3]]


def test_multi_similarity_hand_value() -> None:
    labels = [0, 1, 2, 0]
    reference = lambda rows: ref_multi_similarity(rows, MS_CAPTIONS, labels)  # noqa: E731
    output = check(create_loss("multi-similarity"), MS_IMAGES, MS_CAPTIONS, labels, reference)
    assert 0 < output.active_fraction < 1  # the miner drops some pairs


@pytest.mark.parametrize("labels", LABEL_SETS)
def test_multi_similarity_matches_pml(labels: list[int]) -> None:
    images, captions = random_batch(5)
    label_tensor = torch.tensor(labels)
    leaf = images.clone().requires_grad_(True)
    pairs = MultiSimilarityMiner(epsilon=0.1)(leaf, label_tensor, captions, label_tensor.clone())
    value = MultiSimilarityLoss(alpha=2, beta=50, base=0.5)(leaf, label_tensor, pairs, captions, label_tensor.clone())
    value.backward()
    ours = ours_value_and_grad(create_loss("multi-similarity"), images, captions, label_tensor)
    assert_agree(ours, (value.detach(), leaf.grad))


def ref_circle(images: Rows, captions: Rows, labels: list[int], m: float, gamma: float) -> float:
    losses = []
    for a, f in enumerate(images):
        sims = [(labels[a] == labels[b], cos(f, t)) for b, t in enumerate(captions)]
        pos = [-gamma * max(0.0, 1 + m - s) * (s - (1 - m)) for same, s in sims if same]
        neg = [gamma * max(0.0, s + m) * (s - m) for same, s in sims if not same]
        lse = math.log(sum(math.exp(x) for x in pos)) + math.log(sum(math.exp(x) for x in neg))
        losses.append(math.log1p(math.exp(lse)))
    return avg_nonzero(losses)


def test_circle_hand_value() -> None:
    # pml detaches the self-paced weights, so the gradient is checked against pml instead
    labels = [0, 1, 2, 0]
    reference = lambda rows: ref_circle(rows, MS_CAPTIONS, labels, 0.25, 4.0)  # noqa: E731
    check(create_loss("circle", m=0.25, gamma=4.0), MS_IMAGES, MS_CAPTIONS, labels, reference, grad=False)


@pytest.mark.parametrize("labels", LABEL_SETS)
def test_circle_matches_pml(labels: list[int]) -> None:
    images, captions = random_batch(6)
    label_tensor = torch.tensor(labels)
    pml = CircleLoss(m=0.4, gamma=10)
    theirs = pml_concat_value_and_grad(pml, images, captions, label_tensor, cross_modal_pairs(label_tensor))
    assert_agree(ours_value_and_grad(create_loss("circle", m=0.4, gamma=10), images, captions, label_tensor), theirs)


# ---------------------------------------------------------------- errors and the whole registry
def test_unknown_loss_name_is_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        create_loss("tripplet")
    assert "\n" not in str(error.value) and "triplet-mined" in str(error.value)


@pytest.mark.parametrize("name", [n for n in LOSSES.names() if LOSSES.get(n).needs_classes])
def test_class_losses_need_classes(name: str) -> None:
    with pytest.raises(ConfigError) as missing:
        create_loss(name)
    assert "\n" not in str(missing.value) and "num_classes" in str(missing.value)
    loss = create_loss(name, num_classes=3, embedding_dim=2)
    with pytest.raises(ConfigError) as caption_only:
        loss(torch.zeros(2, 2), torch.zeros(2, 2), None)
    assert "\n" not in str(caption_only.value)
    with pytest.raises(ConfigError):
        loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 3]))


def test_bad_options_are_config_errors() -> None:
    bad = [("triplet-mined", {"mining": "hardest"}), ("mse", {"margin": 1.0}), ("quadruplet", {"second_margin": 3.0})]
    for name, kwargs in bad:
        with pytest.raises(ConfigError) as error:
            create_loss(name, **kwargs)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_trains_on_a_random_batch(name: str) -> None:
    generator = torch.Generator().manual_seed(7)
    training = torch.randn(32, 6, generator=generator)
    needs_classes = LOSSES.get(name).needs_classes
    loss = create_loss(name, num_classes=3, embedding_dim=6)  # the builder's values; a loss takes what it needs
    loss.prepare(training)
    images = torch.randn(8, 6, generator=generator, requires_grad=True)
    captions = training[:8].clone().requires_grad_(True)
    labels = torch.arange(8) % 3 if needs_classes else None
    output = loss(images, captions, labels)
    output.value.backward()
    assert torch.isfinite(output.value) and output.value.item() > 0
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert captions.grad is None  # the caption vectors are targets only
    assert 0.0 <= output.active_fraction <= 1.0
    assert math.isfinite(output.mean_pos_distance) and math.isfinite(output.mean_neg_distance)
    assert loss.embed(images).shape == images.shape


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_reloads_from_its_state_dict_without_prepare(name: str) -> None:
    # what retrieval.checkpoint does at search time: build the loss (sized by class count and
    # embedding size), then load_state_dict(...), with no prepare()
    kwargs = {"num_classes": 3, "embedding_dim": 5}
    generator = torch.Generator().manual_seed(8)
    training, outputs = torch.randn(16, 5, generator=generator), torch.randn(4, 5, generator=generator)
    trained = create_loss(name, **kwargs)
    trained.prepare(training)
    restored = create_loss(name, **kwargs)
    restored.load_state_dict(trained.state_dict())
    assert torch.allclose(restored.embed(outputs), trained.embed(outputs))
    assert restored.distance in DISTANCES.values()
    if restored.distance is COSINE:  # search compares unit vectors
        assert torch.allclose(restored.embed(outputs).norm(dim=1), torch.ones(4))
    if LOSSES.get(name).needs_classes:
        labels = torch.tensor([0, 1, 2, 0])
        values = [loss(outputs, training[:4], labels).value for loss in (restored, trained)]
        assert torch.allclose(*values)


# ---------------------------------------------------------------- settings: from the config to the loss
# A non-default value for every setting of every registered loss (a new setting must be added here).
CHANGED_SETTINGS = {
    "arcface": {"margin": 10.0, "scale": 16.0},
    "center": {"weight": 0.5},
    "circle": {"m": 0.2, "gamma": 20.0},
    "contrastive": {"margin": 2.5, "normalize": True},
    "cosine": {},
    "double-margin": {"pos_margin": 0.25, "neg_margin": 2.0, "normalize": True},
    "histogram": {"n_bins": 10},
    "mse": {},
    "multi-similarity": {"threshold": 0.2, "epsilon": 0.5, "alpha": 4.0, "beta": 10.0},
    "quadruplet": {"margin": 1.5, "second_margin": 0.2, "squared": True},
    "sigmoid-ce": {},
    "softmax-ce": {},
    "triplet": {"margin": 2.5, "squared": True, "negatives": "random", "far_quantile": 0.9, "far_distance": 4.0,
                "anchors": "caption", "hinge": "sum"},
    "triplet-mined": {"margin": 2.5, "mining": "hard", "squared": True},
    "triplet-offline": {"margin": 2.5, "squared": True, "bank_size": 2, "pool_size": 24},
}
# Settings that act only beside another one: both the default and the changed loss get it.
SETTING_CONTEXT = {("triplet", "far_quantile"): {"negatives": "far-hardest"},
                   ("triplet", "far_distance"): {"negatives": "far-hardest"},
                   ("triplet", "hinge"): {"negatives": "random"}}


def configured_loss(name: str, **settings):
    """A loss built as a run builds it: YAML-like values through the config, then ``build_loss``."""
    config = config_from_dict({"loss": {"name": name, **settings}})
    return build_loss(config.loss, seed=0, num_classes=3, embedding_dim=6)


def behaviour(loss) -> tuple[float, ...]:
    """What a loss does on a fixed batch: its value, logged signals and search-space embedding."""
    generator = torch.Generator().manual_seed(11)
    training = torch.randn(32, 6, generator=generator)
    images = torch.randn(9, 6, generator=generator)
    loss.prepare(training)
    loss.on_epoch_start(1)
    output = loss(images, training[:9], torch.arange(9) % 3)
    embedded = loss.embed(images)
    return (round(output.value.item(), 6), output.active_fraction, round(output.mean_pos_distance, 6),
            round(output.mean_neg_distance, 6), round(float(embedded.norm()), 6))


def test_the_settings_table_covers_every_setting_of_every_registered_loss() -> None:
    assert set(CHANGED_SETTINGS) <= set(LOSSES.names())
    for name in LOSSES.names():
        assert list(CHANGED_SETTINGS.get(name, {})) == list(settings_of(LOSSES.get(name))), name


@pytest.mark.parametrize("name,setting", [(n, s) for n, changed in CHANGED_SETTINGS.items() for s in changed])
def test_every_setting_of_every_loss_takes_effect(name: str, setting: str) -> None:
    value = CHANGED_SETTINGS[name][setting]
    context = SETTING_CONTEXT.get((name, setting), {})
    default = configured_loss(name, **context)
    changed = configured_loss(name, **context, **{setting: value})
    assert behaviour(changed) != behaviour(default), f"{name}: {setting}={value!r} changed nothing"


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_rejects_an_unknown_setting_in_one_line(name: str) -> None:
    valid = list(settings_of(LOSSES.get(name)))
    for attempt in (lambda: configured_loss(name, marign=1.0), lambda: create_loss(name, marign=1.0)):
        with pytest.raises(ConfigError) as error:
            attempt()
        message = str(error.value)
        assert "\n" not in message and f"loss {name!r}" in message and "'marign'" in message
        assert f"its settings: {', '.join(valid) or 'none'}" in message


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_declares_its_family_and_distance(name: str) -> None:
    loss = configured_loss(name)
    assert isinstance(LOSSES.get(name).family, LossFamily)
    assert loss.distance in DISTANCES.values()


def test_a_margin_set_in_the_config_reaches_every_margin_loss() -> None:
    # the bug this guards against: loss.margin reached only "triplet"; every other loss kept 1.0
    labels = [0, 1, 2, 2]
    quadruplet = load_config(None, ["loss.name=quadruplet", "loss.margin=3.0"])
    loss = build_loss(quadruplet.loss, seed=0, num_classes=None, embedding_dim=2)
    assert loss.margin == 3.0
    check(loss, MINED_IMAGES, MINED_CAPTIONS, labels,
          lambda rows: ref_quadruplet(rows, MINED_CAPTIONS, labels, 3.0, 0.5))

    mined = load_config(None, ["loss.name=triplet-mined", "loss.margin=2.5"])
    loss = build_loss(mined.loss, seed=0, embedding_dim=2)
    assert loss.margin == 2.5
    check(loss, MINED_IMAGES, MINED_CAPTIONS, labels,
          lambda rows: ref_mined_triplet(rows, MINED_CAPTIONS, labels, 2.5, "all"))

    offline = load_config(None, ["loss.name=triplet-offline", "loss.margin=4.0", "loss.bank_size=1"])
    loss = build_loss(offline.loss, seed=0, embedding_dim=2)
    assert loss.margin == 4.0
    loss.prepare(t64([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [6.0, 0.0]]))  # farthest: 3, 3, 0, 0
    images, captions = [[0.0, 1.0], [5.0, 1.0]], [[0.0, 0.0], [5.0, 0.0]]  # negatives (6, 0) and (0, 0)
    check(loss, images, captions, [0, 1], lambda rows: sum(
        max(0.0, 4.0 + dist(f, t) - dist(f, n)) for f, t, n in zip(rows, captions, [[6.0, 0.0], [0.0, 0.0]])) / 2)

    triplet = load_config(None, ["loss.margin=2.0"])  # the default loss, triplet
    loss = build_loss(triplet.loss, seed=0, embedding_dim=2)
    output, _ = run(loss, TRIPLET_IMAGES, TRIPLET_CAPTIONS, None)
    assert output.value.item() == pytest.approx(ref_triplet_hard(TRIPLET_IMAGES, TRIPLET_CAPTIONS, [0, 1, 2], 2.0))


def test_squared_switches_the_distance_everywhere() -> None:
    assert configured_loss("triplet").distance is L2
    squared = configured_loss("triplet", squared=True)
    assert squared.distance is SQUARED_L2
    output, _ = run(squared, TRIPLET_IMAGES, TRIPLET_CAPTIONS, None)
    assert output.mean_pos_distance == pytest.approx(
        sum(dist(f, t) ** 2 for f, t in zip(TRIPLET_IMAGES, TRIPLET_CAPTIONS)) / 3)


def test_settings_out_of_range_or_contradicting_are_refused_in_one_line() -> None:
    cases = [({"name": "triplet", "margin": -0.5}, "loss.margin: must be >= 0.0"),
             ({"name": "histogram", "n_bins": 1}, "loss.n_bins: must be >= 2"),
             ({"name": "circle", "gamma": 0}, "loss.gamma: must be > 0.0"),
             ({"name": "quadruplet", "second_margin": 2.0}, "second_margin <= margin"),
             ({"name": "double-margin", "pos_margin": 2.0}, "pos_margin < neg_margin"),
             ({"name": "triplet-offline", "pool_size": 8}, "bank_size < pool_size"),
             ({"name": "triplet-offline", "pool_size": -4}, "loss.pool_size: must be >= 1, got -4"),
             ({"name": "triplet-offline", "pool_size": 0}, "loss.pool_size: must be >= 1, got 0"),
             ({"name": "triplet", "negatives": "far-hardest", "far_quantile": 1.5},
              "loss.far_quantile: must be a quantile in [0, 1]"),
             ({"name": "triplet", "negatives": "far-hardest", "far_distance": -1.0},
              "loss.far_distance: must be >= 0.0"),
             ({"name": "triplet", "negatives": "hardest"}, "loss.negatives: unknown negative sampler"),
             ({"name": "triplet-mined", "mining": "hardest"}, "loss.mining: unknown triplet mining"),
             ({"name": "triplet", "squared": "yes"}, "loss.squared: expected bool")]
    for section, needle in cases:
        with pytest.raises(ConfigError) as error:
            config_from_dict({"loss": section})
        assert needle in str(error.value) and "\n" not in str(error.value), section


class OptionalSettings:
    """A stand-in loss class with optional settings checked inside and outside the ``| None``."""

    def __init__(self, inside: PositiveInt | None = None, outside: Annotated[float | None, AtLeast(0.0)] = None,
                 plain: int | None = None) -> None: ...

    @classmethod
    def check_settings(cls, settings) -> None: ...


def test_ranges_of_optional_settings_are_checked_when_given() -> None:
    settings = settings_of(OptionalSettings)
    assert settings["inside"].annotation == int | None and settings["plain"].checks == ()
    for key, value in (("inside", 0), ("outside", -1.0)):
        with pytest.raises(ConfigError, match=f"^loss.{key}: must be >= "):
            checked_settings(OptionalSettings, "optional", {key: value})
    given = {"inside": None, "outside": None, "plain": -5}
    assert checked_settings(OptionalSettings, "optional", given) == given
    assert checked_settings(OptionalSettings, "optional", {"inside": 3}) == {"inside": 3}
    # a pool smaller than 1 is refused by its own range, before the rule that joins it to bank_size
    with pytest.raises(ConfigError) as error:
        load_config(None, ["loss={name: triplet-offline, pool_size: -4}"])
    assert str(error.value) == "config.loss.pool_size: must be >= 1, got -4"

    class Ambiguous:
        def __init__(self, size: PositiveInt | str = 1) -> None: ...

    with pytest.raises(TypeError, match="X | None"):  # a check inside another union: to which type?
        settings_of(Ambiguous)


def test_builder_values_are_not_settings() -> None:
    for injected in ("seed", "num_classes", "embedding_dim"):
        with pytest.raises(ConfigError, match="has no setting"):
            config_from_dict({"loss": {"name": "triplet-offline", injected: 3}})
    with pytest.raises(ConfigError, match="needs num_classes") as error:
        build_loss(config_from_dict({"loss": {"name": "arcface"}}).loss, seed=0, num_classes=None, embedding_dim=4)
    assert "\n" not in str(error.value)
    arcface = build_loss(config_from_dict({"loss": {"name": "arcface"}}).loss, num_classes=5, embedding_dim=4)
    assert tuple(arcface.pml_loss.W.shape) == (4, 5)  # sized when built: a checkpoint loads straight into it
    assert tuple(configured_loss("center").centers.shape) == (3, 6)
    assert tuple(configured_loss("sigmoid-ce").low.shape) == (6,)


def test_describe_loss_lists_every_setting_in_effect() -> None:
    config = load_config(None, ["loss.name=quadruplet", "loss.margin=0.8"])
    assert describe_loss(config.loss) == "quadruplet (margin=0.8, second_margin=0.5, squared=False)"
    assert describe_loss(load_config(None, ["loss={name: mse}"]).loss) == "mse"
