"""Typed results as JSON: field order, left-out and inlined fields, non-finite numbers, one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from retrieval.errors import DataError
from retrieval.typed_json import INLINE, OMIT_IF_NONE, JsonRecord


@dataclass
class Score(JsonRecord):
    name: str
    value: float
    note: str | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class Where(JsonRecord):
    split: str
    images: int


@dataclass
class Sheet(JsonRecord):
    title: str
    scores: list[Score]
    by_name: dict[str, Score]
    best: Score | None
    where: Where = field(metadata=INLINE)
    curve: list[float | None] = field(default_factory=list)


def sheet() -> Sheet:
    return Sheet("t", [Score("R@1", 0.5), Score("MedR", 3.0, note="rank")], {"a": Score("mAP", 0.25)}, None,
                 Where("val", 25), [0.1, float("nan"), 0.3])


def test_to_json_writes_fields_in_order_leaves_out_none_and_inlines():
    data = sheet().to_json()
    assert list(data) == ["title", "scores", "by_name", "best", "split", "images", "curve"]
    assert data["scores"] == [{"name": "R@1", "value": 0.5}, {"name": "MedR", "value": 3.0, "note": "rank"}]
    assert data["best"] is None  # None is written unless the field says to leave it out
    assert data["split"] == "val" and data["images"] == 25
    assert data["curve"] == [0.1, None, 0.3]  # JSON has no NaN
    assert json.loads(json.dumps(data, allow_nan=False)) == data


def test_from_json_reads_back_what_to_json_wrote():
    data = sheet().to_json()
    again = Sheet.from_json(json.loads(json.dumps(data)))
    assert again.to_json() == data
    assert again.where == Where("val", 25) and again.by_name["a"] == Score("mAP", 0.25)
    assert Score.from_json({"name": "R@5", "value": 1}).value == 1.0 and isinstance(Score.from_json(
        {"name": "R@5", "value": 1}).value, float)  # an integer where a float belongs reads as a float


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d.pop("title"), "title"),
    (lambda d: d.pop("images"), "images"),
    (lambda d: d["scores"][1].update(value="high"), "scores[1].value"),
    (lambda d: d["by_name"].update(b=[1]), "by_name.b"),
    (lambda d: d.update(best={"name": "x"}), "best"),
    (lambda d: d.update(scores={"name": "x"}), "scores"),
])
def test_what_does_not_fit_is_a_one_line_error_naming_the_field(change, needle):
    data = json.loads(json.dumps(sheet().to_json()))
    change(data)
    with pytest.raises(DataError) as error:
        Sheet.from_json(data, "sheet.json")
    assert str(error.value).startswith("sheet.json") and needle in str(error.value)
    assert "\n" not in str(error.value)


def test_a_non_object_is_refused():
    with pytest.raises(DataError, match="expected a JSON object"):
        Sheet.from_json([1, 2], "sheet.json")
