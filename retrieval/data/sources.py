"""Caption sources: readers that lazily yield one ``Record`` (image bytes + captions) per image.

Supported inputs: a JSON-lines file, a CSV file, a COCO captions json, img2dataset output
(``files`` or ``webdataset`` layout) and Fashion-MNIST's IDX files (items, or 2x2 scenes; see
``fashion_mnist.py``). Every reader fails with a one-line ``DataError`` that
names the file and the line or field at fault.

``SOURCES`` registers each kind by name with its options type (a frozen ``SourceOptions`` dataclass,
the ``data.source_options`` of a config); the Fashion-MNIST modules register theirs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import tarfile
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from retrieval.data.skips import BadItem, SkippedItems, pass_on
from retrieval.errors import ConfigError, DataError, one_line_reason
from retrieval.registry import Registry

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Record:
    """One image with its captions; ``origin`` (file and line) is only used in error messages."""

    key: str
    image_bytes: bytes
    image_ext: str
    captions: tuple[str, ...]
    meta: dict
    origin: str = field(default="", compare=False, repr=False)


def make_key(name: str) -> str:
    """A webdataset-safe key from a file stem or id: no dots, slashes or spaces."""
    return _KEY_UNSAFE.sub("_", str(name)).strip("_")


def check_unique_keys(records: Iterable[Record], skipped: SkippedItems | None = None) -> Iterator[Record]:
    """Pass records through; a key seen twice raises ``DataError`` naming both origins (with ``skipped``: the
    second is skipped)."""
    seen: dict[str, str] = {}
    for record in records:
        if record.key in seen:
            pass_on(BadItem(f"duplicate key {record.key!r}: {seen[record.key] or '?'} and {record.origin or '?'}",
                            "duplicate key", record.origin), skipped)
            continue
        seen[record.key] = record.origin
        yield record


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    """A one-line error for a text file that is not UTF-8, naming its first line that is not."""
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as bad:
            return DataError(f"{path}:{lineno}: not valid UTF-8 text (byte {bad.start + 1} of the line)")
    return DataError(f"{path}: not valid UTF-8 text ({one_line_reason(exc)})")


def _image_ext(path: Path, where: str) -> str:
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        raise BadItem(f"{where}: not an image file name (want one of {', '.join(IMAGE_EXTS)}): {path.name}",
                      "not an image file name", where)
    return "jpg" if ext == "jpeg" else ext


def _read_image(path: Path, where: str) -> tuple[bytes, str]:
    ext = _image_ext(path, where)
    try:
        return path.read_bytes(), ext
    except FileNotFoundError:
        raise BadItem(f"{where}: image file not found: {path}", "image file not found", where) from None
    except (OSError, ValueError) as exc:  # ValueError: a name with a NUL byte
        message = f"{where}: cannot read image {path}: {one_line_reason(exc)}"
        raise BadItem(message, "image file unreadable", where) from None


def _captions(value: Any, where: str, name: str) -> tuple[str, ...]:
    """Validate a caption field (a string or a list of strings); empty → DataError."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise BadItem(f"{where}: field {name!r} is missing or empty", "caption missing or empty", where)
    for i, caption in enumerate(items):
        if not isinstance(caption, str) or not caption.strip():
            raise BadItem(f"{where}: field {name!r} item {i} is not a non-empty string", "caption missing or empty",
                          where)
    return tuple(c.strip() for c in items)


def _make_record(
    image_path: Path, captions: tuple[str, ...], meta: dict, where: str, key: str | None = None
) -> Record:
    data, ext = _read_image(image_path, where)
    safe = make_key(key if key is not None else image_path.stem)
    if not safe:
        raise BadItem(f"{where}: cannot derive a key from {image_path.name!r}", "no key", where)
    return Record(safe, data, ext, captions, meta, origin=where)


def records_from_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                       skipped: SkippedItems | None = None) -> Iterator[Record]:
    """Records from JSON lines with ``image`` and ``captions`` (list) or ``caption`` (str).

    ``image`` is relative to ``image_root`` (default: the jsonl's folder); other fields go to meta.
    A bad line raises its one-line ``DataError``; with ``skipped`` it is noted there and passed over.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    return check_unique_keys(_jsonl_records(path, root, skipped), skipped)


def _jsonl_records(path: Path, root: Path, skipped: SkippedItems | None = None) -> Iterator[Record]:
    try:
        lines = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot open captions file: {one_line_reason(exc)}") from None
    with lines:
        for lineno, raw in enumerate(lines, start=1):
            try:
                record = _jsonl_record(raw, f"{path}:{lineno}", root)
            except BadItem as error:
                pass_on(error, skipped)
                continue
            if record is not None:
                yield record


def _jsonl_record(raw: bytes, where: str, root: Path) -> Record | None:
    """The record of one JSON line (None for a blank line); a bad line → ``BadItem``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise BadItem(f"{where}: not valid UTF-8 text (byte {bad.start + 1} of the line)", "caption not UTF-8",
                      where) from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadItem(f"{where}: bad JSON line: {exc.msg} (column {exc.colno})", "bad JSON line", where) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more digits than Python converts
        raise BadItem(f"{where}: bad JSON line: {one_line_reason(exc)}", "bad JSON line", where) from None
    if not isinstance(obj, dict):
        raise BadItem(f"{where}: expected a JSON object, got {type(obj).__name__}", "bad JSON line", where)
    image = obj.get("image")
    if not isinstance(image, str) or not image:
        raise BadItem(f"{where}: field 'image' is missing or not a string", "bad JSON line", where)
    name = "captions" if "captions" in obj else "caption"
    captions = _captions(obj.get(name), where, name)
    meta = {k: v for k, v in obj.items() if k not in ("image", "captions", "caption")}
    return _make_record(root / image, captions, meta, f"{where} ({image})")


def records_from_csv(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                     skipped: SkippedItems | None = None) -> Iterator[Record]:
    """Records from a CSV with ``image`` and ``caption`` columns; rows of one image are grouped.

    Images keep first-seen order; other columns (from an image's first row) go to meta. A bad row raises
    its one-line ``DataError``; with ``skipped`` it is noted there and passed over.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    return check_unique_keys(_csv_records(path, root, skipped), skipped)


def _not_utf8_field(row: Iterable[Any]) -> bool:
    """Whether a row read with ``errors="surrogateescape"`` holds bytes that are not UTF-8."""
    return any(isinstance(value, str) and not value.isascii() and _SURROGATE.search(value) for value in row)


_SURROGATE = re.compile("[\udc80-\udcff]")


def _csv_rows(reader: csv.DictReader, path: Path) -> Iterator[tuple[str, dict | BadItem]]:
    """(where, row) per CSV row, or (where, BadItem) for a row the csv module or UTF-8 rejects."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            where = f"{path}:{reader.line_num}"
            yield where, BadItem(f"{where}: bad CSV row: {one_line_reason(exc)}", "bad CSV row", where)
            continue
        where = f"{path}:{reader.line_num}"
        if _not_utf8_field(list(row.values()) + list(row.get(None) or [])):
            yield where, BadItem(f"{where}: not valid UTF-8 text", "caption not UTF-8", where)
            continue
        yield where, row


def _csv_records(path: Path, root: Path, skipped: SkippedItems | None = None) -> Iterator[Record]:
    groups: dict[str, tuple[int, list[str], dict]] = {}
    try:
        with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f)
            try:
                fieldnames = reader.fieldnames or []
            except csv.Error as exc:
                fieldnames, header_error = [], f"bad CSV header: {one_line_reason(exc)}"
            else:
                header_error = "not valid UTF-8 text" if _not_utf8_field(fieldnames) else ""
            missing = [c for c in ("image", "caption") if c not in fieldnames]
            if header_error or missing:
                problem = header_error or f"CSV header lacks column {missing[0]!r}"
                pass_on(BadItem(f"{path}: {problem}", "bad CSV header", f"{path}:1"), skipped)
                return
            for where, row in _csv_rows(reader, path):
                if isinstance(row, BadItem):
                    pass_on(row, skipped)
                    continue
                image, caption = (row.get("image") or "").strip(), row.get("caption")
                if not image:
                    pass_on(BadItem(f"{where}: column 'image' is empty", "bad CSV row", where), skipped)
                    continue
                if caption is None or not caption.strip():
                    pass_on(BadItem(f"{where}: column 'caption' is empty", "caption missing or empty", where),
                            skipped)
                    continue
                if image not in groups:
                    meta = {k: v for k, v in row.items() if k not in ("image", "caption") and k}
                    groups[image] = (reader.line_num, [], meta)
                groups[image][1].append(caption.strip())
    except OSError as exc:
        raise DataError(f"{path}: cannot read CSV: {one_line_reason(exc)}") from None
    for image, (lineno, captions, meta) in groups.items():
        where = f"{path}:{lineno} ({image})"
        try:
            yield _make_record(root / image, tuple(captions), meta, where)
        except BadItem as error:
            pass_on(error, skipped)


def _load_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {one_line_reason(exc)}") from None
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: bad JSON at line {exc.lineno}: {exc.msg}") from None


def records_from_coco(captions_json: str | os.PathLike, image_dir: str | os.PathLike,
                      skipped: SkippedItems | None = None) -> Iterator[Record]:
    """Records from a COCO captions json (``images`` + ``annotations``), in ``images`` order.

    Meta keeps ``coco_id`` and, where present, license id/name/url and the source urls. With ``skipped``, an
    image that is missing or unreadable is noted there and passed over.
    """
    path = Path(captions_json)
    return check_unique_keys(_coco_records(path, Path(image_dir), skipped), skipped)


def _coco_records(path: Path, image_dir: Path, skipped: SkippedItems | None = None) -> Iterator[Record]:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for name in ("images", "annotations"):
        if not isinstance(data.get(name), list):
            raise DataError(f"{path}: field {name!r} is missing or not a list")
    licenses = {lic.get("id"): lic for lic in data.get("licenses") or [] if isinstance(lic, dict)}
    captions: dict[Any, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise DataError(f"{path}: annotations[{i}] lacks field 'image_id'")
        caption = ann.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{path}: annotations[{i}]: field 'caption' is missing or empty")
        captions.setdefault(ann["image_id"], []).append(caption.strip())
    for i, image in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(image, dict) or "id" not in image or not image.get("file_name"):
            raise DataError(f"{where} lacks field 'id' or 'file_name'")
        where = f"{where} ({image['file_name']})"
        if image["id"] not in captions:
            raise DataError(f"{where}: no captions in 'annotations' for image id {image['id']}")
        try:
            yield _make_record(
                image_dir / image["file_name"], tuple(captions[image["id"]]), _coco_meta(image, licenses), where
            )
        except BadItem as error:
            pass_on(error, skipped)


def _coco_meta(image: dict, licenses: dict) -> dict:
    meta: dict[str, Any] = {"coco_id": image["id"]}
    if "license" in image:
        lic = licenses.get(image["license"], {})
        meta["license_id"] = image["license"]
        if "name" in lic:
            meta["license"] = lic["name"]
        if "url" in lic:
            meta["license_url"] = lic["url"]
    for name in ("flickr_url", "coco_url"):
        if name in image:
            meta[name] = image[name]
    return meta


def records_from_img2dataset(path: str | os.PathLike) -> Iterator[Record]:
    """Records from img2dataset output: ``files`` layout (``00000/key.jpg`` + ``.txt`` + ``.json``)
    or ``webdataset`` layout (``*.tar``). Entries whose json status is not ``success`` are skipped.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".tar":
        return check_unique_keys(_img2dataset_tars([path]))
    if not path.is_dir():
        raise DataError(f"{path}: img2dataset output folder not found")
    tars = sorted(path.glob("*.tar"))
    if tars:
        return check_unique_keys(_img2dataset_tars(tars))
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{path}: no img2dataset output (expected NNNNN/ folders or *.tar shards)")
    return check_unique_keys(_img2dataset_files(folders))


def _img2dataset_entry(
    meta_json: bytes | None, caption_txt: bytes | None, where: str
) -> tuple[tuple[str, ...], dict] | None:
    """Captions and meta of one img2dataset entry, or None when its status is not success."""
    meta: dict = {}
    if meta_json is not None:
        try:
            meta = json.loads(meta_json)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}.json: bad JSON: {one_line_reason(exc)}") from None
        if not isinstance(meta, dict):
            raise DataError(f"{where}.json: expected a JSON object")
        if meta.get("status", "success") != "success":
            return None
    if caption_txt is not None:
        caption: Any = caption_txt.decode("utf-8", errors="replace")
        name = f"{where}.txt"
    elif "caption" in meta:
        caption, name = meta["caption"], f"{where}.json"
    else:
        raise DataError(f"{where}.txt: caption file missing (and no 'caption' field in its .json)")
    captions = _captions(caption, name, "caption")
    return captions, {k: v for k, v in meta.items() if k != "caption"}


def _img2dataset_files(folders: list[Path]) -> Iterator[Record]:
    for folder in folders:
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS):
            stem = image.with_suffix("")
            txt, js = stem.with_suffix(".txt"), stem.with_suffix(".json")
            entry = _img2dataset_entry(
                js.read_bytes() if js.exists() else None, txt.read_bytes() if txt.exists() else None, str(stem)
            )
            if entry is not None:
                yield _make_record(image, entry[0], entry[1], str(image))


_AT_STREAM = re.compile(r" @ <[^>]*?name='([^']*)'[^>]*>")


def wds_error_text(exc: BaseException) -> str:
    """One line from an exception raised inside webdataset, naming the shard when it is known.

    webdataset appends the shard url (and stream) to ``exc.args`` or ``" @ <stream>"`` to the message.
    """
    args = getattr(exc, "args", ())
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(args[0]) if args else ""
    text = (text.strip().splitlines() or [type(exc).__name__])[0]
    urls = [a for a in args[1:] if isinstance(a, str)]
    match = _AT_STREAM.search(text)
    if match:
        text = text[: match.start()] + text[match.end() :]
        urls.append(match.group(1))
    return f"{urls[-1]}: {text}" if urls and urls[-1] not in text else text


def _img2dataset_tars(tars: list[Path]) -> Iterator[Record]:
    samples = wds.DataPipeline(wds.SimpleShardList([str(t) for t in tars]), wds.tarfile_to_samples())
    try:
        for sample in samples:
            record = _tar_record(sample)
            if record is not None:
                yield record
    except (OSError, ValueError, EOFError, tarfile.TarError) as exc:
        raise DataError(f"cannot read img2dataset tar: {wds_error_text(exc)}") from None


def _tar_record(sample: dict) -> Record | None:
    where = f"{sample['__url__']}:{sample['__key__']}"
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise DataError(f"{where}: no image member ({', '.join(IMAGE_EXTS)})")
    entry = _img2dataset_entry(sample.get("json"), sample.get("txt"), where)
    if entry is None:
        return None
    key = make_key(os.path.basename(sample["__key__"]))
    return Record(key, sample[ext], "jpg" if ext == "jpeg" else ext, entry[0], entry[1], origin=where)


# -- the source registry: each kind with its own typed options (``data.source_options``) ----------
@dataclass(frozen=True)
class SourceOptions:
    """A source kind's own settings (``data.source_options``) and how it reads its records.

    Subclasses are frozen dataclasses registered in ``SOURCES``; their fields are the options the
    config may set, range-checked in ``__post_init__``. ``check`` compares them with the rest of the
    data section; ``records`` opens ``data.path`` lazily.
    """

    def check(self, data: Any) -> None:
        """Refuse (ConfigError) a data section these options cannot serve; ``data`` is a ``DataConfig``."""

    def records(self, path: str | os.PathLike, *, seed: int, val_fraction: float,
                skipped: SkippedItems | None = None) -> Iterator[Record]:
        """The records at ``path``; ``seed`` and ``val_fraction`` are ``data.split_seed``/``data.val_fraction``.

        ``skipped`` (the ``data.on_error: skip`` policy) collects the items a reader passes over; None raises.
        """
        raise NotImplementedError


SOURCES: Registry[SourceOptions] = Registry("source kind")


@SOURCES.register("jsonl")
@dataclass(frozen=True)
class JsonlSource(SourceOptions):
    """JSON lines (``records_from_jsonl``); ``image_root``: folder of the images (default: the file's)."""

    image_root: str | None = None

    def records(self, path: str | os.PathLike, *, seed: int, val_fraction: float,
                skipped: SkippedItems | None = None) -> Iterator[Record]:
        return records_from_jsonl(path, self.image_root, skipped)


@SOURCES.register("csv")
@dataclass(frozen=True)
class CsvSource(SourceOptions):
    """A CSV file (``records_from_csv``); ``image_root``: folder of the images (default: the file's)."""

    image_root: str | None = None

    def records(self, path: str | os.PathLike, *, seed: int, val_fraction: float,
                skipped: SkippedItems | None = None) -> Iterator[Record]:
        return records_from_csv(path, self.image_root, skipped)


@SOURCES.register("coco")
@dataclass(frozen=True)
class CocoSource(SourceOptions):
    """A COCO captions json (``records_from_coco``); ``image_root``: the image folder (default: the json's)."""

    image_root: str | None = None

    def records(self, path: str | os.PathLike, *, seed: int, val_fraction: float,
                skipped: SkippedItems | None = None) -> Iterator[Record]:
        return records_from_coco(path, self.image_root if self.image_root is not None else Path(path).parent,
                                 skipped)


@SOURCES.register("img2dataset")
@dataclass(frozen=True)
class Img2datasetSource(SourceOptions):
    """img2dataset output, ``files`` or ``webdataset`` layout (``records_from_img2dataset``); no options."""

    def records(self, path: str | os.PathLike, *, seed: int, val_fraction: float,
                skipped: SkippedItems | None = None) -> Iterator[Record]:
        return records_from_img2dataset(path)  # its entries fail whole; skipping covers the images (at write)


def source_type(kind: str, where: str = "data.source") -> type[SourceOptions]:
    """The options type of source ``kind``; an unknown kind → one-line ConfigError naming ``where``."""
    if kind not in SOURCES:
        raise ConfigError(f"{where}: unknown source kind {kind!r}; choose one of: {', '.join(SOURCES.names())}")
    return SOURCES.get(kind)


def source_option_names(kind: str) -> tuple[str, ...]:
    """The options source ``kind`` takes (unknown kind → ConfigError listing the kinds)."""
    return tuple(f.name for f in dataclasses.fields(source_type(kind)))


def make_source_options(kind: str, values: Mapping[str, Any] | None = None, *, where: str = "data.source_options",
                        coerce: Callable[[Any, Any, str], Any] | None = None) -> SourceOptions:
    """The typed options of source ``kind`` from a mapping; an option it does not take → one-line ConfigError.

    ``coerce(value, annotation, field)`` converts config values (the config loader's type check).
    """
    options_type = source_type(kind)
    values = dict(values or {})
    valid = source_option_names(kind)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise ConfigError(f"{where}: source {kind!r} takes no option {', '.join(unknown)}; valid: {listed}")
    if coerce is not None:
        hints = typing.get_type_hints(options_type)
        values = {name: coerce(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    return options_type(**values)


def open_source(kind: str, path: str | os.PathLike, *, seed: int = 0, val_fraction: float = 0.2,
                **options: Any) -> Iterator[Record]:
    """Records of one source by kind, with that kind's ``options`` (e.g. coco's ``image_root``).

    ``seed`` and ``val_fraction`` play the part of ``data.split_seed`` and ``data.val_fraction``.
    """
    return make_source_options(kind, options, where="open_source").records(path, seed=seed,
                                                                               val_fraction=val_fraction)
