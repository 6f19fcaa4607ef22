"""The query grammar: a caption, or word arithmetic such as "dog - grass + snow".

A query is a sequence of terms joined by operators:

- plus: ``+`` (also the fullwidth ``＋``); minus: ``-``, the minus sign ``−`` (U+2212), the en dash
  ``–`` (U+2013) and the fullwidth ``－``; spaces around an operator are optional;
- an ASCII ``-`` between two letters or digits is a hyphen, part of the term ("t-shirt", "x-ray");
  every other minus character is an operator ("dog−cat", "dog -cat", "dog- cat");
- the first term is positive unless an operator precedes it ("-dog", "+ snow - grass");
- a query with no operator is one positive term: a plain caption.

Every term must hold some text: "", "-", "dog +" and "+ - cat" are refused with a ``QueryError``.
"""

from __future__ import annotations

import re

from retrieval.errors import QueryError

PLUS_SIGNS = "+\uff0b"  # + ＋
MINUS_SIGNS = "-\u2212\u2013\uff0d"  # - − – －
_ALWAYS_OPERATORS = PLUS_SIGNS + MINUS_SIGNS.replace("-", "")  # every sign but the ASCII hyphen-minus
_ALNUM = r"[^\W_]"  # a letter or digit, as in ``tokenize``
# One operator: a plus or minus sign, except an ASCII '-' with a letter/digit on both sides.
_OPERATOR = re.compile(rf"[{re.escape(_ALWAYS_OPERATORS)}]|(?<!{_ALNUM})-|-(?!{_ALNUM})")


def parse_arithmetic(query: str) -> list[tuple[int, str]]:
    """Signed terms of ``query``: "red car - red + blue" -> [(1, "red car"), (-1, "red"), (1, "blue")].

    Terms are stripped of surrounding whitespace, never empty and never contain an operator; a
    query without operators gives one term, ``[(1, query.strip())]``. Raises ``QueryError`` (one
    line) for an empty query or a missing term ("dog +", "+ - cat", "-").
    """
    if not query.strip():
        raise QueryError("empty query: type some words")
    operators = list(_OPERATOR.finditer(query))
    ends = [match.start() for match in operators] + [len(query)]
    terms: list[tuple[int, str]] = []
    first = query[:ends[0]].strip()
    if first:
        terms.append((1, first))
    for match, end in zip(operators, ends[1:]):
        term = query[match.end():end].strip()
        if not term:
            raise QueryError(f"missing term after {match.group()!r} in query {query!r}")
        terms.append((1 if match.group() in PLUS_SIGNS else -1, term))
    return terms


def join_terms(terms: list[tuple[int, str]]) -> str:
    """The query text of signed terms, "dog - grass + snow"; ``parse_arithmetic`` reads it back."""
    text = " ".join(f"{'+' if sign > 0 else '-'} {term}" for sign, term in terms)
    return text[2:] if terms and terms[0][0] > 0 else text
