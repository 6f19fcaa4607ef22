"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) as a caption source: each 28x28 item captioned by its class.

Reads the original IDX files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``; plain or gzipped). Debian's package
``dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist``; the environment
variable ``FASHION_MNIST_DIR`` points elsewhere, and any folder can be passed as ``path``.
The data set is MIT-licensed (Copyright 2017 Zalando SE).

Records: a grayscale PNG, the caption = the class name, meta ``{"label": class id, "split": "train" |
"val"}``; the original test set is the val split. With ``zero_shot_classes`` those classes never reach
training: their train items are dropped and their test items are val records with ``"zero_shot": true``,
so text→image retrieval of unseen classes by name can be measured (DeViSE-style).
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval.data.sources import SOURCES, Record, SourceOptions
from retrieval.errors import ConfigError, DataError

CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FASHION_MNIST_DIR"
# Fashion-MNIST's file prefix per split, and the split name used in shards.
SPLIT_PREFIXES = {"train": "train", "val": "t10k"}
LIMIT_FIELD, ZERO_SHOT_FIELD = "data.source_options.limit_per_class", "data.source_options.zero_shot_classes"
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def default_fashion_mnist_dir() -> Path:
    """``$FASHION_MNIST_DIR`` when set, else the folder of Debian's ``dataset-fashion-mnist``."""
    return Path(os.environ.get(ENV_VAR) or DEBIAN_DIR)


def resolve_fashion_mnist_dir(path: str | os.PathLike | None) -> Path:
    """The IDX folder: ``path``, or the default one for None / "" / "default"; missing → DataError."""
    folder = default_fashion_mnist_dir() if path in (None, "", "default") else Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: Fashion-MNIST folder not found (apt-get install dataset-fashion-mnist, "
                        f"set {ENV_VAR} or data.path to a folder of the IDX files)")
    return folder


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: Fashion-MNIST file {stem}.gz (or {stem}) not found")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzipped when its name ends in .gz) as an array of its shape; malformed → DataError."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim, start = data[3], 4 + 4 * data[3]
    if len(data) < start:
        raise DataError(f"{path}: IDX header is truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - start != expected:
        raise DataError(f"{path}: IDX data has {len(data) - start} bytes, header {shape} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=start).reshape(shape)


def load_fashion_mnist(path: str | os.PathLike | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of ``split`` ("train", or "val" = the test set)."""
    if split not in SPLIT_PREFIXES:
        raise ConfigError(f"Fashion-MNIST split must be one of {', '.join(SPLIT_PREFIXES)}, got {split!r}")
    folder = resolve_fashion_mnist_dir(path)
    prefix = SPLIT_PREFIXES[split]
    images_file = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    labels_file = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_file}: expected (N, rows, cols) uint8 images, got {images.shape} {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_file}: expected {len(images)} labels, got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{labels_file}: labels must be 0..{len(CLASS_NAMES) - 1}, found {int(labels.max())}")
    return images, labels.astype(np.int64)


def class_ids(names: Sequence[str], field: str = ZERO_SHOT_FIELD) -> tuple[int, ...]:
    """Class ids of class names (case-insensitive); an unknown name → ConfigError naming ``field``."""
    if isinstance(names, str):
        names = (names,)
    ids = []
    for name in names:
        key = str(name).strip().lower()
        if key not in CLASS_NAMES:
            raise ConfigError(f"{field}: unknown Fashion-MNIST class {name!r}; valid: {', '.join(CLASS_NAMES)}")
        ids.append(CLASS_NAMES.index(key))
    if len(set(ids)) >= len(CLASS_NAMES):
        raise ConfigError(f"{field}: holding out every class leaves nothing to train on")
    return tuple(sorted(set(ids)))


def check_limit_per_class(limit: Any) -> None:
    """``limit_per_class`` must be None or a positive integer (ConfigError naming the option)."""
    if limit is not None and (not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"{LIMIT_FIELD} must be a positive integer or null, got {limit!r}")


def subsample_per_class(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of at most ``limit`` items per class, drawn by a seeded permutation; None keeps all."""
    check_limit_per_class(limit)
    if limit is None:
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    keep = [order[labels[order] == c][:limit] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def png_bytes(pixels: np.ndarray) -> bytes:
    """A uint8 (H, W) array as grayscale PNG bytes (readers convert to RGB)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def item_key(split: str, index: int) -> str:
    """The record key of item ``index`` of a split: ``fmnist-train-00042`` / ``fmnist-test-00042``."""
    return f"fmnist-{'train' if split == 'train' else 'test'}-{index:05d}"


def records_from_fashion_mnist(
    path: str | os.PathLike | None = None,
    *,
    limit_per_class: int | None = None,
    zero_shot_classes: Sequence[str] = (),
    seed: int = 0,
) -> Iterator[Record]:
    """Records of both splits (train first), captioned with the class name.

    ``limit_per_class`` keeps at most that many items per class in each split (a seeded subsample);
    ``zero_shot_classes`` (names from ``CLASS_NAMES``) are left out of train and marked in val.
    """
    held_out = class_ids(zero_shot_classes)
    check_limit_per_class(limit_per_class)  # before reading
    folder = resolve_fashion_mnist_dir(path)
    return _fashion_records(folder, limit_per_class, held_out, seed)


def _fashion_records(folder: Path, limit: int | None, held_out: tuple[int, ...], seed: int) -> Iterator[Record]:
    for split in SPLIT_PREFIXES:
        images, labels = load_fashion_mnist(folder, split)
        keep = subsample_per_class(labels, limit, seed)
        if split == "train":
            keep = keep[~np.isin(labels[keep], held_out)]
        for index in keep.tolist():
            label = int(labels[index])
            meta: dict = {"label": label, "split": split}
            if label in held_out:
                meta["zero_shot"] = True
            key = item_key(split, index)
            yield Record(key, png_bytes(images[index]), "png", (CLASS_NAMES[label],), meta,
                         origin=f"{folder} ({split} item {index})")


@SOURCES.register("fashion-mnist")
@dataclass(frozen=True)
class FashionMnistSource(SourceOptions):
    """Fashion-MNIST items (``records_from_fashion_mnist``); ``data.path``: the IDX folder or "default".

    ``limit_per_class``: at most this many items per class and split (seeded by ``data.split_seed``);
    ``zero_shot_classes``: class names kept out of training (val only; needs ``data.split_by: split``).
    """

    limit_per_class: int | None = None
    zero_shot_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_limit_per_class(self.limit_per_class)
        class_ids(self.zero_shot_classes)

    def check(self, data: Any) -> None:
        if self.zero_shot_classes and data.split_by != "split":
            raise ConfigError(f"data.split_by must be 'split' with {ZERO_SHOT_FIELD} (they must stay out of train)")

    def records(self, path: str | os.PathLike, *, seed: int, val_fraction: float,
                skipped: Any = None) -> Iterator[Record]:
        return records_from_fashion_mnist(path, limit_per_class=self.limit_per_class,
                                          zero_shot_classes=self.zero_shot_classes, seed=seed)
