"""Typed results as JSON: dataclasses that write themselves as plain JSON and read themselves back, checked.

A :class:`JsonRecord` dataclass becomes a JSON object with one key per field, in field order.
Field metadata shapes the object: :data:`OMIT_IF_NONE` leaves the key out while the value is None,
:data:`INLINE` writes a nested record's keys beside the others instead of under its own key.
Reading back is the config machinery's (:func:`retrieval.config.build_dataclass`): an unknown,
missing or mistyped field is a one-line :class:`DataError` naming it. JSON has no NaN or infinity:
such floats are written as null.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Self

import numpy as np

from retrieval.config import build_dataclass
from retrieval.errors import ConfigError, DataError

OMIT_IF_NONE = {"omit_if_none": True}
INLINE = {"inline": True}


class JsonRecord:
    """Mixin for dataclasses: :meth:`to_json` and :meth:`from_json`."""

    def to_json(self) -> dict[str, Any]:
        """A plain JSON object (dicts, lists, str, numbers, bools, None)."""
        data: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if value is None and field.metadata.get("omit_if_none"):
                continue
            if field.metadata.get("inline"):
                data.update(value.to_json())
            else:
                data[field.name] = plain(value)
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "results") -> Self:
        """Read what :meth:`to_json` wrote; a field that is unknown, missing or of the wrong type is a DataError."""
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        values = dict(data)
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if field.metadata.get("inline"):
                names = {inner.name for inner in dataclasses.fields(hints[field.name])}
                values[field.name] = {name: values.pop(name) for name in list(values) if name in names}
        try:
            return build_dataclass(cls, values, where)
        except ConfigError as error:
            raise DataError(str(error)) from None


def plain(value: Any) -> Any:
    """``value`` as plain JSON data: records, tuples and numpy scalars converted, non-finite floats as None."""
    if isinstance(value, JsonRecord):
        return value.to_json()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
