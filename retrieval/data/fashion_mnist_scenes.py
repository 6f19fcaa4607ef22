"""Fashion-MNIST scenes: 2x2 grids (56x56) of four random items captioned with their names in reading order.

"a sneaker, a bag, a shirt and a dress" describes the top-left, top-right, bottom-left and
bottom-right items. Train scenes are built from the train items, val scenes from the test items,
so no val scene shares an item with training. Scenes are a pure function of the seed: the same
``seed`` and counts give the same images and captions. Records carry no ``label`` (caption-only
data: a caption is relevant to its own scene), but meta lists the items (``item_labels``,
``item_keys``) for analyses by content.

With ``zero_shot_classes`` those items never reach training: the train pool leaves them out, so no
train caption names them, and each val scene that shows one lists the held-out names it shows in
``meta["zero_shot_items"]`` ("a sandal"). Evaluation then queries with each held-out name alone
and counts every val scene showing that item as relevant (zero-shot retrieval on caption data).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.fashion_mnist import (
    CLASS_NAMES,
    check_limit_per_class,
    class_ids,
    item_key,
    load_fashion_mnist,
    png_bytes,
    resolve_fashion_mnist_dir,
    subsample_per_class,
)
from retrieval.data.sources import SOURCES, Record, SourceOptions
from retrieval.errors import ConfigError

ITEMS_PER_SCENE = 4
_SPLIT_STREAMS = {"train": 0, "val": 1}


def with_article(name: str) -> str:
    """ "a sneaker", "an ankle boot"."""
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def scene_caption(labels: Sequence[int]) -> str:
    """The caption of items ``labels`` in reading order: "a sneaker, a bag, a shirt and a dress"."""
    names = [with_article(CLASS_NAMES[int(label)]) for label in labels]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def compose_scene(items: np.ndarray) -> np.ndarray:
    """Four (h, w) images → one (2h, 2w) image: top-left, top-right, bottom-left, bottom-right."""
    if len(items) != ITEMS_PER_SCENE:
        raise ValueError(f"a scene needs {ITEMS_PER_SCENE} items, got {len(items)}")
    return np.concatenate([np.concatenate(items[:2], axis=1), np.concatenate(items[2:], axis=1)], axis=0)


def scene_counts(scene_count: int, val_fraction: float) -> dict[str, int]:
    """Scenes per split: ``round(scene_count * val_fraction)`` val scenes, the rest train."""
    if not isinstance(scene_count, (int, np.integer)) or isinstance(scene_count, bool) or scene_count < 1:
        raise ConfigError(f"data.source_options.scene_count must be a positive integer, got {scene_count!r}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ConfigError(f"data.val_fraction must be between 0 and 1, got {val_fraction!r}")
    val = int(round(scene_count * val_fraction))
    return {"train": scene_count - val, "val": val}


def scene_items(pool_size: int, count: int, seed: int, split: str) -> np.ndarray:
    """(count, 4) pool positions: four distinct items per scene, drawn from a generator of (seed, split)."""
    if pool_size < ITEMS_PER_SCENE:
        raise ConfigError(f"Fashion-MNIST {split} split has {pool_size} items; a scene needs {ITEMS_PER_SCENE}")
    rng = np.random.default_rng([int(seed), _SPLIT_STREAMS[split]])
    picks = rng.integers(0, pool_size, size=(count, ITEMS_PER_SCENE))
    for row in np.flatnonzero([len(set(p)) < ITEMS_PER_SCENE for p in picks.tolist()]):
        picks[row] = rng.choice(pool_size, ITEMS_PER_SCENE, replace=False)
    return picks


def records_from_fashion_mnist_scenes(
    path: str | os.PathLike | None = None,
    *,
    scene_count: int = 20000,
    val_fraction: float = 0.2,
    seed: int = 0,
    limit_per_class: int | None = None,
    zero_shot_classes: Sequence[str] = (),
) -> Iterator[Record]:
    """``scene_count`` scenes (``val_fraction`` of them val, from test items), train first.

    ``limit_per_class`` first restricts each split's item pool (a seeded subsample per class);
    ``zero_shot_classes`` (names from ``CLASS_NAMES``) are left out of the train pool.
    """
    counts = scene_counts(scene_count, val_fraction)
    check_limit_per_class(limit_per_class)  # before reading
    held_out = class_ids(zero_shot_classes)
    folder = resolve_fashion_mnist_dir(path)
    return _scene_records(folder, counts, seed, limit_per_class, held_out)


def _scene_records(folder: Path, counts: dict[str, int], seed: int, limit: int | None,
                   held_out: tuple[int, ...] = ()) -> Iterator[Record]:
    for split, count in counts.items():
        if count == 0:
            continue
        images, labels = load_fashion_mnist(folder, split)
        pool = subsample_per_class(labels, limit, seed)
        if split == "train" and held_out:
            pool = pool[~np.isin(labels[pool], held_out)]
        for number, picks in enumerate(scene_items(len(pool), count, seed, split)):
            chosen = pool[picks]
            item_labels = [int(label) for label in labels[chosen]]
            meta = {"split": split, "item_labels": item_labels, "item_keys": [item_key(split, int(i)) for i in chosen]}
            shown = sorted({with_article(CLASS_NAMES[label]) for label in item_labels if label in held_out})
            if shown:
                meta["zero_shot_items"] = shown
            yield Record(f"scene-{split}-{number:06d}", png_bytes(compose_scene(images[chosen])), "png",
                         (scene_caption(item_labels),), meta, origin=f"{folder} ({split} scene {number})")


@SOURCES.register("fashion-mnist-scenes")
@dataclass(frozen=True)
class FashionMnistScenesSource(SourceOptions):
    """2x2 Fashion-MNIST scenes (``records_from_fashion_mnist_scenes``); needs ``data.split_by: split``.

    ``scene_count``: scenes in all (``data.val_fraction`` of them val); ``limit_per_class``: each
    split's item pool restricted to this many items per class (seeded by ``data.split_seed``);
    ``zero_shot_classes``: item names kept out of every train scene (queried alone at evaluation).
    """

    scene_count: int = 20000
    limit_per_class: int | None = None
    zero_shot_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        scene_counts(self.scene_count, 0.0)
        check_limit_per_class(self.limit_per_class)
        class_ids(self.zero_shot_classes)

    def check(self, data: Any) -> None:
        if data.split_by != "split":
            raise ConfigError("data.split_by must be 'split' for fashion-mnist-scenes (val scenes use test items only)")
        scene_counts(self.scene_count, data.val_fraction)

    def records(self, path: str | os.PathLike, *, seed: int, val_fraction: float,
                skipped: Any = None) -> Iterator[Record]:
        return records_from_fashion_mnist_scenes(path, scene_count=self.scene_count, val_fraction=val_fraction,
                                                 seed=seed, limit_per_class=self.limit_per_class,
                                                 zero_shot_classes=self.zero_shot_classes)
