"""Webdataset shards read where they lie (``data.shards``): img2dataset output or any tar shards, never copied.

``data.shards`` names a folder (its ``*.tar`` files; img2dataset's ``NNNNN.parquet`` and ``NNNNN_stats.json``
beside them are not shards), a brace pattern (``dir/{00000..00099}.tar``), a glob or one tar file.
Such shards carry no split: each sample's split comes from the same rule ``retrieval prepare`` applies
(``data.split_by``: ``hash`` with ``data.val_fraction`` and ``data.split_seed``, or a meta field), decided
while streaming, so the train and val samples are those a prepared copy would hold.

A sample holds an image (jpg, png, webp, ...) and its captions: img2dataset's ``.txt`` (or the ``caption``
field of its ``.json``), or the project's own ``json`` member (``key``, ``captions``, ``meta``). A sample
whose img2dataset json has a ``status`` other than ``success`` is passed over.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import braceexpand

from retrieval.data.shards import SPLITS, assign_split
from retrieval.data.skips import BadItem
from retrieval.data.sources import IMAGE_EXTS, Record, _img2dataset_entry, make_key
from retrieval.errors import DataError

STATS_SUFFIX = "_stats.json"  # img2dataset's per-shard statistics, beside NNNNN.tar


class InPlaceShard(str):
    """The path of a shard read in place, carrying which of its samples to keep.

    ``split`` None keeps every sample; ``"train"``/``"val"`` keeps those :func:`assign_split` puts there.
    It stays itself through ``str()`` and pickling (DataLoader workers), so any code that passes shard
    paths along keeps the selection.
    """

    __slots__ = ("split", "split_by", "val_fraction", "split_seed")

    def __new__(cls, path: str, split: str | None = None, split_by: str = "hash", val_fraction: float = 0.2,
                split_seed: int = 0) -> InPlaceShard:
        shard = super().__new__(cls, path)
        shard.split, shard.split_by, shard.val_fraction, shard.split_seed = split, split_by, val_fraction, split_seed
        return shard

    def __str__(self) -> str:
        return self

    def __reduce__(self):
        return (InPlaceShard, (str.__str__(self), self.split, self.split_by, self.val_fraction, self.split_seed))

    def selection(self) -> list[Any]:
        """What decides this shard's samples (for cache keys): the split and its rule."""
        return [self.split, self.split_by, self.val_fraction, self.split_seed]

    def keeps(self, record: Record) -> bool:
        """Whether ``record`` belongs to this shard's selection (a missing split field → ``BadItem``)."""
        if self.split is None:
            return True
        try:
            return assign_split(record, self.split_by, self.val_fraction, self.split_seed) == self.split
        except BadItem as error:
            raise BadItem(f"{error}; data.split_by: hash splits shards without such a field", error.reason,
                          error.where) from None


def shard_selection(shard: str) -> list[Any]:
    """What besides its file decides a shard's samples: an in-place shard's split rule, else nothing."""
    return shard.selection() if isinstance(shard, InPlaceShard) else []


def resolve_shard_pattern(pattern: str, where: str = "data.shards") -> list[str]:
    """The tar files ``pattern`` names: a folder's ``*.tar``, a brace pattern, a glob or one file (sorted).

    Nothing matched, a missing folder, or a brace-listed file that does not exist → one-line ``DataError``.
    """
    text = str(pattern).strip()
    if not text:
        raise DataError(f"{where}: empty shard pattern")
    path = Path(text)
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.tar") if p.is_file())
        if not files:
            raise DataError(f"{where}: {path} holds no .tar shards")
        return files
    if "{" in text:
        files = list(braceexpand.braceexpand(text))
        missing = [f for f in files if not os.path.isfile(f)]
        if len(missing) == len(files):
            raise DataError(f"{where}: pattern {text} matches no shard file")
        if missing:
            raise DataError(f"{where}: {missing[0]} not found ({len(missing)} of the {len(files)} shards the pattern "
                            "names are missing)")
        return files
    if glob.has_magic(text):
        files = sorted(f for f in glob.glob(text) if os.path.isfile(f))
        if not files:
            raise DataError(f"{where}: pattern {text} matches no shard file")
        return files
    if path.is_file():
        return [text]
    raise DataError(f"{where}: {text} not found (give a shard folder, a pattern like dir/{{00000..00009}}.tar "
                    "or a tar file)")


def in_place_shards(data: Any, split: str) -> list[InPlaceShard]:
    """The shards of ``data.shards`` (a ``DataConfig``) for ``split`` (train, val, or all: every sample)."""
    if split not in (*SPLITS, "all"):
        raise DataError(f"unknown split {split!r}; want train, val or all")
    return [InPlaceShard(path, None if split == "all" else split, data.split_by, data.val_fraction, data.split_seed)
            for path in resolve_shard_pattern(data.shards)]


def stats_count(shard: str | os.PathLike) -> int | None:
    """The samples img2dataset wrote into ``shard`` (``successes`` of its ``NNNNN_stats.json``); None without one."""
    path = Path(shard)
    stats = path.with_name(path.name.removesuffix(".tar") + STATS_SUFFIX)
    if not stats.is_file():
        return None
    try:
        count = json.loads(stats.read_text(encoding="utf-8")).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return int(count) if isinstance(count, int) and count >= 0 else None


def _in_place_record(sample: dict) -> Record | None:
    """The record of one raw tar sample of an in-place shard; None when its img2dataset status is not success."""
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadItem(f"{where}: no image member ({', '.join(IMAGE_EXTS)})", "sample lacks a member", where)
    info = None
    if "txt" not in sample and "json" in sample:
        try:
            info = json.loads(sample["json"])
        except (ValueError, RecursionError):
            info = None
    if isinstance(info, dict) and isinstance(info.get("captions"), list):  # the project's own sample format
        key, captions, meta = str(info.get("key") or sample["__key__"]), info["captions"], info.get("meta") or {}
        if not isinstance(meta, dict):
            raise BadItem(f"{where}: field 'meta' of its json is not an object", "sample does not decode", where)
    else:
        try:
            entry = _img2dataset_entry(sample.get("json"), sample.get("txt"), where)
        except DataError as exc:
            raise BadItem(str(exc), "sample does not decode", where) from None
        if entry is None:
            return None
        key, (captions, meta) = make_key(os.path.basename(sample["__key__"])), entry
    return Record(key, sample[ext], "jpg" if ext == "jpeg" else ext, tuple(captions), dict(meta), origin=where)


def _select_in_place(data: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Raw tar samples of in-place shards as the project's samples (``json`` = key, captions, meta), only those
    of the shard's split; samples of other shards pass through unchanged."""
    for sample in data:
        shard = sample.get("__url__")
        if not isinstance(shard, InPlaceShard):
            yield sample
            continue
        try:
            record = _in_place_record(sample)
            if record is None or not shard.keeps(record):
                continue
        except Exception as exn:
            if not handler(exn):
                break
            continue
        payload = {"key": record.key, "captions": list(record.captions), "meta": record.meta}
        yield {"__key__": record.key, "__url__": shard, record.image_ext: record.image_bytes,
               "json": json.dumps(payload, ensure_ascii=False).encode("utf-8")}
