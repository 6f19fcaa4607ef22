"""The ``data.on_error: skip`` policy: bad items are set aside, counted by reason and listed, not fatal.

With ``stop`` (the default) every bad item raises its one-line ``DataError``. With ``skip`` the readers hand
each such error to a :class:`SkippedItems` instead, and go on with the next item.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass

from tqdm.auto import tqdm

from retrieval.errors import DataError
from retrieval.io import atomic_path

ON_ERROR = ("stop", "skip")


class BadItem(DataError):
    """A ``DataError`` about one item (image, caption line, CSV row, shard sample) that a skip policy may pass over.

    ``reason`` is a short fixed phrase for counting ("image does not decode"); ``where`` names the item
    (file and line, or shard and key). ``str()`` is the usual one-line message.
    """

    def __init__(self, message: str, reason: str = "bad item", where: str = "") -> None:
        super().__init__(message)
        self.reason, self.where = reason, where

    def __reduce__(self):  # DataLoader workers send errors back pickled
        return (BadItem, (str(self.args[0]) if self.args else "", self.reason, self.where))


@dataclass
class Skipped:
    """One item that was passed over."""

    where: str
    reason: str
    message: str


class SkippedItems:
    """What a skip policy passed over: each item with its reason, counted by reason.

    ``warn`` prints each item's line (to stderr, beside any progress bar) as it is skipped.
    """

    def __init__(self, warn: bool = False) -> None:
        self.items: list[Skipped] = []
        self.warn = warn

    def add(self, error: DataError) -> None:
        """Note ``error``'s item as skipped (a plain ``DataError`` counts as "bad item")."""
        message = (str(error.args[0]) if error.args else str(error)).strip()
        message = (message.splitlines() or [type(error).__name__])[0]
        item = Skipped(getattr(error, "where", "") or message.split(": ")[0], getattr(error, "reason", "bad item"),
                       message)
        self.items.append(item)
        if self.warn:
            tqdm.write(f"warning: skipped ({item.reason}): {message}", file=sys.stderr)  # not into a bar's line

    def counts(self) -> dict[str, int]:
        """Reason → how many items were skipped for it, most frequent first."""
        return dict(Counter(item.reason for item in self.items).most_common())

    def __len__(self) -> int:
        return len(self.items)

    def write(self, path: str | os.PathLike) -> None:
        """One JSON object per skipped item (``where``, ``reason``, ``message``), written atomically."""
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            for item in self.items:
                handle.write(json.dumps({"where": item.where, "reason": item.reason, "message": item.message},
                                        ensure_ascii=False) + "\n")


def skipped_summary(counts: dict[str, int], listed_in: str | os.PathLike | None = None) -> str:
    """``"skipped 3 items: 2 image does not decode, 1 caption not UTF-8; see <dir>/skipped.jsonl"``."""
    total = sum(counts.values())
    if not total:
        return "skipped no items"
    reasons = ", ".join(f"{count} {reason}" for reason, count in counts.items())
    where = f"; see {listed_in}" if listed_in is not None else ""
    return f"skipped {total} item{'s' if total != 1 else ''}: {reasons}{where}"


def pass_on(error: DataError, skipped: SkippedItems | None) -> None:
    """Raise ``error`` (stop policy: ``skipped`` is None), or note it in ``skipped`` and return."""
    if skipped is None:
        raise error
    skipped.add(error)
