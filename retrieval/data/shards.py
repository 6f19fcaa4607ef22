"""Write records into webdataset tar shards (``train-NNNNNN.tar``, ``val-NNNNNN.tar``) plus a manifest.

Each sample holds ``__key__``, the original image bytes under their extension (never re-encoded)
and ``json`` = {"key", "captions", "meta"}. The output folder appears whole or not at all.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from retrieval.data.images import check_image_bytes, image_error_text
from retrieval.data.skips import BadItem, Skipped, SkippedItems, pass_on
from retrieval.data.sources import Record, check_unique_keys
from retrieval.errors import ConfigError, DataError
from retrieval.io import atomic_dir, atomic_path, write_json
from retrieval.progress import progress_bar

MANIFEST = "manifest.json"
SHORT_SHARD = "shard holds fewer samples than its manifest"  # the reason a skip policy counts
SKIPPED = "skipped.jsonl"  # beside the manifest with data.on_error: skip; one JSON object per skipped item
MANIFEST_FORMAT = "retrieval-shards/1"
SPLITS = ("train", "val")
_VAL_NAMES = ("val", "validation", "test")


@dataclass
class ShardManifest:
    """What ``write_shards`` wrote: per-split sample/caption counts, shard file names (and the samples in
    each) and the split rule."""

    counts: dict[str, int]
    captions: dict[str, int]
    shards: dict[str, list[str]]
    source: str = ""
    shard_size: int = 1000
    split: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    shard_counts: dict[str, int] = field(default_factory=dict)  # shard file name → samples written into it
    skipped: dict[str, int] = field(default_factory=dict)  # reason → items passed over (data.on_error: skip)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def samples_in(self, name: str) -> int | None:
        """How many samples shard file ``name`` was written with; None when the manifest does not list it.

        Manifests written before ``shard_counts`` existed give it from the split's count: every shard of a
        split but its last holds ``shard_size`` samples.
        """
        if name in self.shard_counts:
            return int(self.shard_counts[name])
        for split, names in self.shards.items():
            if name in names:
                return min(self.shard_size, int(self.counts.get(split, 0)) - names.index(name) * self.shard_size)
        return None


def read_manifest(shard_dir: str | os.PathLike) -> ShardManifest:
    """Load ``manifest.json`` from a shard folder; missing or malformed → DataError."""
    path = Path(shard_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found (not a shard folder?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read manifest: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    for name in ("counts", "captions", "shards"):
        if not isinstance(data.get(name), dict):
            raise DataError(f"{path}: field {name!r} is missing or not an object")
    known = set(ShardManifest.__dataclass_fields__)
    return ShardManifest(**{k: v for k, v in data.items() if k in known})


def short_shards(read: Mapping[str, int]) -> dict[str, str]:
    """Shard path → message, for each shard file whose full read gave another number of samples than its manifest lists.

    ``read`` maps each shard path to the samples read from it in one complete pass. A tar file cut at a
    member boundary reads without any error, only short: this is how it is noticed. A shard without a
    manifest is checked against img2dataset's ``NNNNN_stats.json`` beside it, where there is one: it must
    hold at least its ``successes`` (a tar may also hold samples whose status is not success).
    """
    manifests: dict[Path, ShardManifest | None] = {}
    messages = {}
    for shard, count in read.items():
        folder = Path(shard).parent
        if folder not in manifests:
            manifests[folder] = read_manifest(folder) if (folder / MANIFEST).is_file() else None
        manifest = manifests[folder]
        if manifest is not None:
            expected = manifest.samples_in(Path(shard).name)
            wrong = expected is not None and count != expected
        else:  # img2dataset output read in place: its stats file counts the successes it wrote (at least)
            from retrieval.data.in_place import stats_count

            expected = stats_count(shard)
            wrong = expected is not None and count < expected
        if wrong:
            listed = "its manifest lists" if manifest is not None else "its stats file counts"
            messages[shard] = (f"{shard}: holds {count} of the {expected} samples {listed} "
                               "(truncated or replaced?); " + ("prepare the shards again" if manifest is not None
                                                                else "write that shard again"))
    return messages


def check_samples_read(read: Mapping[str, int], handler: Callable[[Exception], bool]) -> None:
    """Hand a ``DataError`` for each of :func:`short_shards` to ``handler`` (a webdataset-style error handler).

    The default handler of the readers raises it; a handler that returns instead lets a reader go on
    (the hook for a policy that skips damaged shards and counts them).
    """
    for shard, message in short_shards(read).items():
        handler(BadItem(message, SHORT_SHARD, shard))


def list_shards(source: str | os.PathLike | Any, split: str) -> list[str]:
    """Sorted shard paths of ``split`` (train, val, or all: both) — the one place a data section's shards are found.

    ``source`` is a prepared shard folder (``{split}-*.tar`` beside a manifest) or a ``DataConfig``: its
    ``data.shards`` read in place (``retrieval.data.in_place``; every shard, its samples selected by split
    while streaming) or else its ``data.shard_dir``. No folder or no shards → DataError.
    """
    if not isinstance(source, (str, os.PathLike)):
        if getattr(source, "shards", None):
            from retrieval.data.in_place import in_place_shards

            return list(in_place_shards(source, split))
        source = source.shard_dir
    if split == "all":
        return [shard for name in SPLITS for shard in list_shards(source, name)]
    folder = Path(source)
    if not folder.is_dir():
        raise DataError(f"{folder}: shard folder not found (looking for {split!r} shards)")
    paths = sorted(folder.glob(f"{split}-*.tar"))
    if not paths:
        raise DataError(f"{folder}: no {split!r} shards ({split}-NNNNNN.tar)")
    return [str(p) for p in paths]


def hash_split(key: str, val_fraction: float, split_seed: int = 0) -> str:
    """``"val"`` or ``"train"`` from a sha1 of (seed, key): stable and independent of record order."""
    digest = hashlib.sha1(f"{split_seed}:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction else "train"


def assign_split(record: Record, split_by: str = "hash", val_fraction: float = 0.2, split_seed: int = 0) -> str:
    """The split of one record: by key hash, or by the meta field named ``split_by``."""
    if split_by == "hash":
        return hash_split(record.key, val_fraction, split_seed)
    where = record.origin or f"key {record.key}"
    if split_by not in record.meta:
        raise BadItem(f"{where}: meta field {split_by!r} (split_by) is missing", "no split", where)
    value = str(record.meta[split_by]).strip().lower()
    if value == "train":
        return "train"
    if value in _VAL_NAMES:
        return "val"
    raise BadItem(
        f"{where}: meta field {split_by!r} is {record.meta[split_by]!r}; want train, val, validation or test",
        "no split", where)


def _verify_image(record: Record) -> None:
    try:
        check_image_bytes(record.image_bytes)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        where = record.origin or record.key
        raise BadItem(f"{where}: image does not decode (key {record.key}): {image_error_text(exc)}",
                      "image does not decode", where) from None


def _sample(record: Record) -> dict[str, Any]:
    try:
        payload = json.dumps(
            {"key": record.key, "captions": list(record.captions), "meta": record.meta}, ensure_ascii=False
        )
    except (TypeError, ValueError) as exc:
        raise DataError(f"{record.origin or record.key}: meta is not JSON-serialisable: {exc}") from None
    return {"__key__": record.key, record.image_ext: record.image_bytes, "json": payload.encode("utf-8")}


class _SplitWriters:
    """One ``wds.ShardWriter`` per split, opened on the split's first sample (no empty shards)."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.writers: dict[str, wds.ShardWriter] = {}
        self.counts = {s: 0 for s in SPLITS}
        self.captions = {s: 0 for s in SPLITS}
        self.names: dict[str, list[str]] = {s: [] for s in SPLITS}
        self.shard_counts: dict[str, int] = {}

    def write(self, split: str, record: Record) -> None:
        if split not in self.writers:
            pattern = str(self.folder).replace("%", "%%") + os.sep + f"{split}-%06d.tar"
            self.writers[split] = wds.ShardWriter(
                pattern,
                maxcount=self.shard_size,
                maxsize=float("inf"),
                verbose=0,
                post=lambda fname: self._finished(split, fname),
                encoder=False,
                mtime=0.0,
            )
        self.writers[split].write(_sample(record))
        self.counts[split] += 1
        self.captions[split] += len(record.captions)

    def _finished(self, split: str, fname: str) -> None:
        """A shard file was closed: note its name and how many samples it holds (for the manifest)."""
        name = os.path.basename(fname)
        self.names[split].append(name)
        self.shard_counts[name] = self.writers[split].count

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


@dataclass
class _WrittenShard:
    """What a worker process wrote: one shard file, or none when every record in it was bad (skip policy)."""

    split: str
    name: str
    count: int
    captions: int
    bad: list[tuple[int, BadItem]]  # (the record's place in the shard's list, its error)


def _write_one_shard(folder: str, split: str, name: str, records: list[Record], skip: bool) -> _WrittenShard:
    """Verify ``records`` and write the good ones as shard ``name`` in ``folder`` (temp file + rename); in a worker.

    Bad records come back in ``bad``; without ``skip`` the first one ends the shard and nothing is written.
    """
    good, bad = [], []
    for place, record in enumerate(records):
        try:
            _verify_image(record)
        except BadItem as error:
            bad.append((place, error))
            if not skip:
                return _WrittenShard(split, name, 0, 0, bad)
            continue
        good.append(record)
    if good:
        with atomic_path(Path(folder) / name) as tmp, open(tmp, "wb") as stream:
            with contextlib.closing(wds.TarWriter(stream, encoder=False, mtime=0.0)) as writer:
                for record in good:
                    writer.write(_sample(record))
    return _WrittenShard(split, name, len(good), sum(len(r.captions) for r in good), bad)


def _process_context() -> Any:
    """Fork where the platform has it (workers start at once, nothing re-imported), else spawn."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _write_in_processes(records: Iterable[Record], folder: Path, workers: int, shard_size: int,
                        skipped: SkippedItems | None, split_of: Callable[[Record], str]) -> _SplitWriters:
    """Group ``records`` by split into the shards one process would write, and verify and write each shard in
    one of ``workers`` processes. Returns the tally (names, counts) that :func:`write_shards` reads.

    At most ``workers + 1`` shards' records wait in memory; results are taken in the order shards were
    handed out, so names do not depend on which process finished first. Errors come out as from one
    process: without ``skipped`` the error of the first bad record (in reading order) is raised; with it,
    ``skipped`` lists the items in reading order.
    """
    tally = _SplitWriters(folder, shard_size)
    pending: dict[str, list[tuple[Record, tuple[int, int]]]] = {s: [] for s in SPLITS}
    numbers = {s: 0 for s in SPLITS}
    queue: collections.deque = collections.deque()
    late: list[tuple[tuple[int, int], Skipped]] = []  # bad images: (items skipped before it was read, record number)
    failures: list[tuple[float, DataError]] = []  # stop policy: (record number, error)

    def collect(result: _WrittenShard, places: list[tuple[int, int]]) -> None:
        for place, error in result.bad:
            if skipped is None:
                failures.append((places[place][1], error))
                continue
            skipped.add(error)
            late.append((places[place], skipped.items.pop()))
        if result.count:
            tally.names[result.split].append(result.name)
            tally.shard_counts[result.name] = result.count
            tally.counts[result.split] += result.count
            tally.captions[result.split] += result.captions

    def stop_at_first_error() -> None:
        """Stop policy: finish what was handed out, check what was not, raise the earliest record's error."""
        while queue:
            task, places = queue.popleft()
            collect(task.get(), places)
        for waiting in pending.values():
            for record, (_, number) in waiting:
                try:
                    _verify_image(record)
                except BadItem as error:
                    failures.append((number, error))
                    break
        raise min(failures, key=lambda failure: failure[0])[1]

    with _process_context().Pool(workers) as pool:
        def hand_out(split: str) -> None:
            name = f"{split}-{numbers[split]:06d}.tar"
            numbers[split] += 1
            chunk = [record for record, _ in pending[split]]
            task = pool.apply_async(_write_one_shard, (str(folder), split, name, chunk, skipped is not None))
            queue.append((task, [place for _, place in pending[split]]))
            pending[split] = []
            while len(queue) > workers:
                task, places = queue.popleft()
                collect(task.get(), places)
            if failures:
                stop_at_first_error()

        stream, number = iter(records), -1
        while True:
            try:
                record = next(stream)
            except StopIteration:
                break
            except DataError as error:  # the source stopped: after the records read so far
                if skipped is None:
                    failures.append((number + 0.5, error))
                    stop_at_first_error()
                raise
            number += 1
            try:
                split = split_of(record)
            except BadItem as error:
                if skipped is None:
                    failures.append((number, error))
                    stop_at_first_error()
                pass_on(error, skipped)
                continue
            pending[split].append((record, (len(skipped) if skipped is not None else 0, number)))
            if len(pending[split]) == shard_size:
                hand_out(split)
        for split in SPLITS:
            if pending[split]:
                hand_out(split)
        while queue:
            task, places = queue.popleft()
            collect(task.get(), places)
        if failures:
            stop_at_first_error()
    if skipped is not None and late:
        skipped.items = _merge_skips(skipped.items, sorted(late, key=lambda item: item[0]))
    return tally


def _merge_skips(early: list[Skipped], late: list[tuple[tuple[int, int], Skipped]]) -> list[Skipped]:
    """``early`` (noted as records were read) with each of ``late`` placed after the first ``before`` of them."""
    merged, position = [], 0
    for (before, _), item in late:
        merged += early[position:before]
        position = max(position, before)
        merged.append(item)
    return merged + early[position:]


def _check_args(shard_size: int, val_fraction: float, split_by: str) -> None:
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be a positive integer, got {shard_size!r}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction!r}")
    if not split_by:
        raise ConfigError("split_by must be 'hash' or a meta field name, got an empty string")


def write_shards(
    records: Iterable[Record],
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    split_by: str = "hash",
    source: str = "",
    progress: bool = True,
    skipped: SkippedItems | None = None,
    workers: int = 1,
) -> ShardManifest:
    """Write ``records`` as train/val tar shards plus ``manifest.json`` into ``out_dir``, atomically.

    ``split_by="hash"`` splits by a seeded hash of the key (``val_fraction`` of records go to val);
    any other value names a meta field whose value is train or val/validation/test. Every image is
    verified and fully decoded (a truncated file fails here, naming its record); keys must be unique.
    Any failure leaves ``out_dir`` untouched. With ``skipped`` (the ``data.on_error: skip`` policy) a bad
    record is noted there and passed over instead, and the folder gets ``skipped.jsonl`` listing every item
    ``skipped`` holds (the readers' too).

    ``workers`` > 1 verifies and writes in that many processes (:func:`_write_in_processes`): the same
    samples, keys, splits and shard files as one process; with ``skipped`` a shard that lost bad records
    holds fewer than ``shard_size`` samples (one process fills it from the next ones).
    """
    _check_args(shard_size, val_fraction, split_by)
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        bar = progress_bar(check_unique_keys(records, skipped), desc=f"writing {out.name}", unit="img",
                           enabled=progress)
        if workers > 1:
            writers = _write_in_processes(bar, tmp, workers, shard_size, skipped,
                                          lambda record: assign_split(record, split_by, val_fraction, split_seed))
        else:
            writers = _SplitWriters(tmp, shard_size)
            with contextlib.closing(writers):
                for record in bar:
                    try:
                        _verify_image(record)
                        split = assign_split(record, split_by, val_fraction, split_seed)
                    except BadItem as error:
                        pass_on(error, skipped)
                        continue
                    writers.write(split, record)
        if sum(writers.counts.values()) == 0:
            raise DataError(f"{source or out}: no records to write")
        split_rule: dict[str, Any] = {"by": split_by}
        if split_by == "hash":
            split_rule.update(val_fraction=val_fraction, seed=split_seed, hash="sha1")
        manifest = ShardManifest(
            counts=writers.counts,
            captions=writers.captions,
            shards=writers.names,
            source=source,
            shard_size=shard_size,
            split=split_rule,
            shard_counts=writers.shard_counts,
            skipped=skipped.counts() if skipped is not None else {},
        )
        write_json(tmp / MANIFEST, manifest.to_json())
        if skipped is not None:
            skipped.write(tmp / SKIPPED)
    return manifest
