"""The query grammar and the tokenizer: hand-written cases and hypothesis properties on any text."""

from __future__ import annotations

import numpy as np
import pytest
from gensim.models import KeyedVectors
from hypothesis import example, given, settings
from hypothesis import strategies as st

from retrieval.errors import QueryError
from retrieval.text import CaptionEncoder, join_terms, parse_arithmetic, tokenize
from retrieval.text.query import MINUS_SIGNS, PLUS_SIGNS

# Characters that exercise every rule of the grammar: letters, a digit, underscore, spaces, every
# operator, and dashes that are not operators (em dash, Unicode hyphen).
GRAMMAR_ALPHABET = "ab1_é .\t\n" + PLUS_SIGNS + MINUS_SIGNS + "\u2014\u2010"
grammar_text = st.text(alphabet=GRAMMAR_ALPHABET, max_size=30)
any_text = st.text(max_size=60)
WORDS = ["cat", "dog", "red", "blue", "t", "shirt"]


def toy_vectors() -> KeyedVectors:
    vectors = KeyedVectors(vector_size=4)
    rng = np.random.default_rng(0)
    vectors.add_vectors(WORDS, rng.normal(size=(len(WORDS), 4)).astype(np.float32))
    return vectors


ENCODERS = [CaptionEncoder(toy_vectors()), CaptionEncoder(toy_vectors(), normalize=True)]


@pytest.mark.parametrize(
    "query, terms",
    [
        ("dog -cat", [(1, "dog"), (-1, "cat")]),
        ("dog- cat", [(1, "dog"), (-1, "cat")]),
        ("dog - cat", [(1, "dog"), (-1, "cat")]),
        ("dog+cat", [(1, "dog"), (1, "cat")]),
        ("dog\u2212cat", [(1, "dog"), (-1, "cat")]),  # minus sign
        ("dog \u2013 cat", [(1, "dog"), (-1, "cat")]),  # en dash
        ("\uff0bsnow \uff0dgrass", [(1, "snow"), (-1, "grass")]),  # fullwidth plus and minus
        ("t-shirt", [(1, "t-shirt")]),
        ("an x-ray of covid-19", [(1, "an x-ray of covid-19")]),
        ("a dog \u2014 running", [(1, "a dog \u2014 running")]),  # an em dash is punctuation
        ("-dog", [(-1, "dog")]),
        ("  a red bus  ", [(1, "a red bus")]),
    ],
)
def test_grammar_examples(query, terms):
    assert parse_arithmetic(query) == terms


@pytest.mark.parametrize(
    "query, message",
    [
        ("", "empty query: type some words"),
        ("   ", "empty query: type some words"),
        ("-", "missing term after '-' in query '-'"),
        ("dog +", "missing term after '+' in query 'dog +'"),
        ("+ - cat", "missing term after '+' in query '+ - cat'"),
        ("dog-", "missing term after '-' in query 'dog-'"),
        ("dog -\n", "missing term after '-' in query 'dog -\\n'"),
    ],
)
def test_grammar_errors_are_one_line(query, message):
    with pytest.raises(QueryError) as error:
        parse_arithmetic(query)
    assert str(error.value) == message


def test_join_terms():
    assert join_terms([(1, "red car"), (-1, "red"), (1, "blue")]) == "red car - red + blue"
    assert join_terms([(-1, "dog"), (1, "x-ray")]) == "- dog + x-ray"


@pytest.mark.parametrize("encoder", ENCODERS, ids=["mean", "normalized"])
def test_arithmetic_is_the_signed_sum_and_one_term_is_a_caption(encoder):
    cat, dog, red = (encoder.encode(word).astype(np.float64) for word in ("cat", "dog", "red"))
    for query in ("dog -cat + red", "dog- cat+red", "dog\u2212cat \uff0b red"):
        expected = dog - cat + red
        if encoder.normalize:
            expected /= np.linalg.norm(expected)
        np.testing.assert_allclose(encoder.encode_arithmetic(query), expected, rtol=1e-6)
    for query in ("a red t-shirt", "+ a red t-shirt", " a red t-shirt "):
        np.testing.assert_array_equal(encoder.encode_arithmetic(query), encoder.encode_query("a red t-shirt"))
    negative = -dog / np.linalg.norm(dog) if encoder.normalize else -dog
    np.testing.assert_allclose(encoder.encode_arithmetic("-dog"), negative, rtol=1e-6)


# -- properties ----------------------------------------------------------------------------------

def _parse_or_none(query: str) -> list[tuple[int, str]] | None:
    """The terms of ``query``, or None when the grammar refuses it with a one-line QueryError."""
    try:
        return parse_arithmetic(query)
    except QueryError as error:
        assert "\n" not in str(error)
        return None


@settings(deadline=None, max_examples=300)
@given(st.one_of(grammar_text, any_text))
@example("dog -cat")
@example("+ - cat")
def test_grammar_properties(query):
    terms = _parse_or_none(query)
    if terms is None:
        return
    assert terms
    for sign, term in terms:
        assert sign in (1, -1)
        assert term and term == term.strip()
        assert parse_arithmetic(term) == [(1, term)]  # a term holds no operator
    assert parse_arithmetic(join_terms(terms)) == terms


@settings(deadline=None)
@given(st.text(alphabet=st.characters(exclude_characters=PLUS_SIGNS + MINUS_SIGNS), max_size=40))
def test_text_without_signs_is_one_term(query):
    if query.strip():
        assert parse_arithmetic(query) == [(1, query.strip())]
    else:
        assert _parse_or_none(query) is None


@settings(deadline=None, max_examples=200)
@given(st.one_of(grammar_text, st.text(alphabet="catdogredblueshirt -+\u2212", max_size=30)))
def test_encoders_raise_only_query_errors(query):
    for encoder in ENCODERS:
        try:
            vector = encoder.encode_arithmetic(query)
        except QueryError as error:
            assert "\n" not in str(error)
        else:
            assert vector.shape == (4,) and np.isfinite(vector).all()


@settings(deadline=None, max_examples=300)
@given(any_text)
@example("A man's T-shirt, isn't it?")
@example("\u0130stanbul \u03a3\u039f\u03a3")
def test_tokenizer_properties(text):
    tokens = tokenize(text)
    for token in tokens:
        assert token and token.isalnum() and token == token.lower()
    assert tokenize(" ".join(tokens)) == tokens
