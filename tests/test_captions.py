"""Caption/query encoding on a toy vocabulary; expected values are computed by hand."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from gensim.models import KeyedVectors

from retrieval.errors import ConfigError, DataError, QueryError
from retrieval.text import CaptionEncoder, OOVStats, parse_arithmetic, tokenize

CAT = np.array([1.0, 0.0, 0.0])
DOG = np.array([0.0, 2.0, 0.0])
RED = np.array([0.0, 0.0, 4.0])
BLUE = np.array([1.0, 1.0, 1.0])
CORPUS = ["cat dog", "cat red", "cat", "dog red dog"]  # N=4; df: cat 3, dog 2, red 2, blue 0


@pytest.fixture
def kv() -> KeyedVectors:
    vectors = KeyedVectors(vector_size=3)
    vectors.add_vectors(["cat", "dog", "red", "blue"], np.stack([CAT, DOG, RED, BLUE]).astype(np.float32))
    return vectors


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("A Red CAT, on the sofa!", ["a", "red", "cat", "on", "the", "sofa"]),
        ("a man's T-shirt", ["a", "man", "t", "shirt"]),
        ("Isn't it? We can't, they won't", ["is", "not", "it", "we", "can", "not", "they", "will", "not"]),
        ("DON’T", ["do", "not"]),
        ("it's 3.5 kids' toys_box café", ["it", "3", "5", "kids", "toys", "box", "café"]),
        ("... --- !!!", []),
    ],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


def test_mean_counts_repeats_and_drops_unknown(kv):
    encoder = CaptionEncoder(kv)
    vector = encoder.encode("Red cat, cat xyzzy")
    assert vector.dtype == np.float32 and encoder.dim == 3
    np.testing.assert_allclose(vector, (2 * CAT + RED) / 3, rtol=1e-6)  # [2/3, 0, 4/3]
    assert encoder.encode("xyzzy !") is None


def test_mean_normalized(kv):
    vector = CaptionEncoder(kv, normalize=True).encode("dog red")
    np.testing.assert_allclose(vector, np.array([0.0, 1.0, 2.0]) / math.sqrt(5), rtol=1e-6)


def test_tfidf_hand_computed(kv):
    encoder = CaptionEncoder(kv, weighting="tfidf")
    encoder.fit_idf(CORPUS)
    idf_cat, idf_dog = math.log(5 / 4) + 1, math.log(5 / 3) + 1
    assert encoder.idf == pytest.approx({"cat": idf_cat, "dog": idf_dog, "red": idf_dog})
    # tf counts repeats: "cat" twice, "red" once.
    expected = (2 * idf_cat * CAT + idf_dog * RED) / (2 * idf_cat + idf_dog)
    np.testing.assert_allclose(encoder.encode("cat red cat"), expected, rtol=1e-6)
    # "blue" is absent from the corpus and gets the largest idf (that of dog/red).
    expected = (idf_dog * BLUE + idf_cat * CAT) / (idf_dog + idf_cat)
    np.testing.assert_allclose(encoder.encode("blue cat"), expected, rtol=1e-6)


def test_tfidf_with_given_idf_and_state_dict_roundtrip(kv):
    encoder = CaptionEncoder(kv, weighting="tfidf", idf={"cat": 1.0, "dog": 3.0}, normalize=True)
    expected = (CAT + 3 * DOG) / 4
    np.testing.assert_allclose(encoder.encode("cat dog"), expected / np.linalg.norm(expected), rtol=1e-6)
    state = json.loads(json.dumps(encoder.state_dict()))
    assert state == {"weighting": "tfidf", "normalize": True, "idf": {"cat": 1.0, "dog": 3.0}}
    restored = CaptionEncoder.from_state_dict(kv, state)
    np.testing.assert_array_equal(restored.encode("red cat dog"), encoder.encode("red cat dog"))
    with pytest.raises(ConfigError, match="'weighting'"):
        CaptionEncoder.from_state_dict(kv, {"idf": None})


def test_weighting_errors(kv):
    with pytest.raises(ConfigError, match="unknown caption weighting 'bm25'; choose one of: mean, tfidf"):
        CaptionEncoder(kv, weighting="bm25")
    with pytest.raises(ConfigError, match="fit_idf"):
        CaptionEncoder(kv, weighting="tfidf").encode("cat")
    with pytest.raises(DataError, match="empty"):
        CaptionEncoder(kv, weighting="tfidf").fit_idf([])


def test_encode_batch_mask_and_oov_stats(kv):
    captions = ["cat frisbe", "frisbe skatbord frisbe", "dog dog red", "!!!"]
    vectors, mask, stats = CaptionEncoder(kv).encode_batch(captions)
    assert vectors.shape == (4, 3) and vectors.dtype == np.float32
    assert mask.tolist() == [True, False, True, False]
    np.testing.assert_allclose(vectors[0], CAT)
    np.testing.assert_allclose(vectors[2], (2 * DOG + RED) / 3, rtol=1e-6)
    assert not vectors[1].any() and not vectors[3].any()
    assert (stats.total_tokens, stats.unknown_tokens, stats.captions) == (8, 4, 4)
    assert stats.unknown_words == Counter({"frisbe": 3, "skatbord": 1})
    assert stats.empty_captions == ["frisbe skatbord frisbe", "!!!"]
    assert stats.summary() == (
        "4/8 tokens unknown (50.0%), 2/4 captions with no known word; "
        "most common unknown: 'frisbe'(3), 'skatbord'(1)"
    )
    assert OOVStats().summary() == "0/0 tokens unknown (0.0%), 0/0 captions with no known word"


def test_encode_query(kv):
    np.testing.assert_allclose(CaptionEncoder(kv).encode_query("a red dog"), (RED + DOG) / 2)
    with pytest.raises(QueryError) as err:
        CaptionEncoder(kv).encode_query("xqzt blorf xqzt")
    assert str(err.value) == "no known word in query 'xqzt blorf xqzt': unknown words: xqzt, blorf"
    with pytest.raises(QueryError, match="contains no words"):
        CaptionEncoder(kv).encode_query("?!")


@pytest.mark.parametrize(
    "query, terms",
    [
        ("dog - grass + snow", [(1, "dog"), (-1, "grass"), (1, "snow")]),
        ("red car - red + blue", [(1, "red car"), (-1, "red"), (1, "blue")]),
        ("-dog+cat", [(-1, "dog"), (1, "cat")]),
        ("+ a t-shirt -x-ray", [(1, "a t-shirt"), (-1, "x-ray")]),
    ],
)
def test_parse_arithmetic(query, terms):
    assert parse_arithmetic(query) == terms


@pytest.mark.parametrize("query", ["", "   ", "dog +", "dog + - cat", "-"])
def test_parse_arithmetic_errors(query):
    with pytest.raises(QueryError):
        parse_arithmetic(query)


def test_encode_arithmetic(kv):
    encoder = CaptionEncoder(kv)
    np.testing.assert_allclose(encoder.encode_arithmetic("cat - dog + red"), [1.0, -2.0, 4.0])
    np.testing.assert_allclose(encoder.encode_arithmetic("red cat - cat"), (RED + CAT) / 2 - CAT)
    unit = CaptionEncoder(kv, normalize=True).encode_arithmetic("cat - dog")
    np.testing.assert_allclose(unit, np.array([1.0, -1.0, 0.0]) / math.sqrt(2), rtol=1e-6)
    with pytest.raises(QueryError) as err:
        encoder.encode_arithmetic("cat - xqzt blorf")
    assert str(err.value) == (
        "no known word in term 'xqzt blorf' of query 'cat - xqzt blorf': unknown words: xqzt, blorf"
    )
    with pytest.raises(QueryError, match="zero vector"):
        encoder.encode_arithmetic("dog - dog")
