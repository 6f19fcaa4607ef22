"""ConSE: the probability-weighted mean of the top-T class-name vectors, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors
from torch import nn

from retrieval.conse import conse_embeddings, imagenet_class_names
from retrieval.errors import ConfigError, DataError
from retrieval.text import CaptionEncoder

WORDS = {"cat": [1.0, 0.0, 0.0], "dog": [0.0, 1.0, 0.0], "sports": [0.0, 0.0, 2.0], "car": [0.0, 0.0, 4.0]}
NAMES = ["cat", "dog", "sports car", "zyzzyva"]  # the last has no known word


@pytest.fixture(scope="module")
def encoder() -> CaptionEncoder:
    kv = KeyedVectors(vector_size=3)
    kv.add_vectors(list(WORDS), np.asarray(list(WORDS.values()), dtype=np.float32))
    return CaptionEncoder(kv)


def identity_head(n: int = 4) -> nn.Linear:
    head = nn.Linear(n, n)
    with torch.no_grad():
        head.weight.copy_(torch.eye(n))
        head.bias.zero_()
    return head


def expected(logits: np.ndarray, top_t: int) -> np.ndarray:
    """ConSE by hand: softmax, drop the unknown class, top-T, renormalise, weighted mean."""
    name_vectors = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 3], [0, 0, 0]], dtype=np.float64)  # "sports car" = mean
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs[:, 3] = 0.0
    out = []
    for row in probs:
        top = np.argsort(-row, kind="stable")[:top_t]
        weights = row[top] / row[top].sum()
        out.append(weights @ name_vectors[top])
    return np.asarray(out)


def test_weighted_mean_of_top_t(encoder: CaptionEncoder) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 5.0], [0.0, 3.0, 1.0, -1.0], [1.0, 1.2, 0.9, 1.0]])
    for top_t in (1, 2, 3):
        got = conse_embeddings(logits, identity_head(), encoder, top_t=top_t, class_names=NAMES)
        assert got.dtype == np.float32 and got.shape == (3, 3)
        np.testing.assert_allclose(got, expected(logits.numpy().astype(np.float64), top_t), rtol=1e-5, atol=1e-6)
    # top-1 is exactly the vector of the most likely class with a known name (the unknown one is skipped)
    top1 = conse_embeddings(logits[:1], identity_head(), encoder, top_t=1, class_names=NAMES)
    np.testing.assert_allclose(top1[0], [1.0, 0.0, 0.0])
    # a T beyond the known classes uses all of them
    np.testing.assert_allclose(conse_embeddings(logits, identity_head(), encoder, top_t=50, class_names=NAMES),
                               expected(logits.numpy().astype(np.float64), 3), rtol=1e-5, atol=1e-6)


def test_two_class_mix_by_hand(encoder: CaptionEncoder) -> None:
    logits = torch.tensor([[np.log(3.0), 0.0, -30.0, -30.0]])  # p(cat) : p(dog) = 3 : 1
    got = conse_embeddings(logits, identity_head(), encoder, top_t=2, class_names=NAMES)
    np.testing.assert_allclose(got[0], [0.75, 0.25, 0.0], atol=1e-6)


def test_classifier_mode_restored_and_batches(encoder: CaptionEncoder) -> None:
    head = nn.Sequential(nn.Dropout(0.9), identity_head())
    head.train()
    features = torch.randn(37, 4, generator=torch.Generator().manual_seed(0))
    whole = conse_embeddings(features, head, encoder, top_t=2, class_names=NAMES)
    chunked = conse_embeddings(features, head, encoder, top_t=2, class_names=NAMES, batch_size=5)
    assert head.training  # eval() only while embedding; dropout was off
    np.testing.assert_allclose(whole, chunked, rtol=1e-6)
    np.testing.assert_allclose(whole, expected(features.numpy().astype(np.float64), 2), rtol=1e-5, atol=1e-6)


def test_errors(encoder: CaptionEncoder) -> None:
    features = torch.zeros(2, 4)
    with pytest.raises(ConfigError, match="top_t"):
        conse_embeddings(features, identity_head(), encoder, top_t=0, class_names=NAMES)
    with pytest.raises(ConfigError, match="4 outputs but 3 class names"):
        conse_embeddings(features, identity_head(), encoder, class_names=NAMES[:3])
    with pytest.raises(DataError, match="no class name has a known word"):
        conse_embeddings(features, identity_head(), encoder, class_names=["x", "y", "z", "w"])


def test_imagenet_names_offline() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[963] == "pizza" and names[404] == "airliner"
