"""Fashion-MNIST items and 2x2 scenes from tiny IDX files written here (no real data needed)."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.config import load_config
from retrieval.data import iter_samples, list_shards, open_source, read_manifest, write_shards
from retrieval.data.fashion_mnist import (
    CLASS_NAMES,
    ENV_VAR,
    class_ids,
    load_fashion_mnist,
    read_idx,
    records_from_fashion_mnist,
    subsample_per_class,
)
from retrieval.data.fashion_mnist_scenes import compose_scene, records_from_fashion_mnist_scenes, scene_caption
from retrieval.errors import ConfigError, DataError
from retrieval.evaluation import image_classes

TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 3


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """An IDX file of uint8 ``array`` (gzipped unless ``compress`` is False)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def fake_split(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled labels and 28x28 images whose pixels identify the item (value = 2 * index + 1)."""
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
    images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    for i in range(len(labels)):
        images[i, 4:24, 4:24] = 2 * i + 1
        images[i, 0, 0] = labels[i]
    return images, labels


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fmnist")
    for prefix, per_class, seed in (("train", TRAIN_PER_CLASS, 0), ("t10k", TEST_PER_CLASS, 1)):
        images, labels = fake_split(per_class, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def pixels(image_bytes: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(image_bytes)) as image:
        return np.asarray(image.convert("L"))


def test_read_idx_plain_gzip_and_errors(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.gz", array)), array)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", array, compress=False)), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-1])
    with pytest.raises(DataError, match="short: IDX data has 23 bytes"):
        read_idx(tmp_path / "short")
    with pytest.raises(DataError, match="Fashion-MNIST file train-images-idx3-ubyte.gz"):
        load_fashion_mnist(tmp_path, "train")
    with pytest.raises(DataError, match="Fashion-MNIST folder not found"):
        load_fashion_mnist(tmp_path / "missing", "train")


def test_records_captions_meta_and_pixels(fmnist_dir: Path) -> None:
    records = list(records_from_fashion_mnist(fmnist_dir))
    assert len(records) == 10 * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    assert len({r.key for r in records}) == len(records)
    train_images, train_labels = load_fashion_mnist(fmnist_dir, "train")
    for record in records:
        label = record.meta["label"]
        assert record.captions == (CLASS_NAMES[label],) and record.image_ext == "png"
        assert set(record.meta) == {"label", "split"}
        if record.meta["split"] == "train":
            index = int(record.key.rsplit("-", 1)[1])
            assert np.array_equal(pixels(record.image_bytes), train_images[index])
            assert train_labels[index] == label
    splits = Counter(r.meta["split"] for r in records)
    assert splits == {"train": 10 * TRAIN_PER_CLASS, "val": 10 * TEST_PER_CLASS}
    assert CLASS_NAMES == ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                           "ankle boot")
    assert image_classes([r.meta for r in records]) is not None  # labelled: class data for training


def test_limit_per_class_is_a_seeded_subsample(fmnist_dir: Path) -> None:
    records = list(records_from_fashion_mnist(fmnist_dir, limit_per_class=2))
    counts = Counter((r.meta["split"], r.meta["label"]) for r in records)
    assert set(counts.values()) == {2} and len(counts) == 20
    again = [r.key for r in records_from_fashion_mnist(fmnist_dir, limit_per_class=2)]
    assert again == [r.key for r in records]
    other = [r.key for r in records_from_fashion_mnist(fmnist_dir, limit_per_class=2, seed=5)]
    assert other != again
    assert len(subsample_per_class(np.array([0, 0, 1]), 10)) == 3
    with pytest.raises(ConfigError, match="data.source_options.limit_per_class"):
        records_from_fashion_mnist(fmnist_dir, limit_per_class=0)


def test_zero_shot_classes_never_reach_train(fmnist_dir: Path) -> None:
    records = list(records_from_fashion_mnist(fmnist_dir, zero_shot_classes=("Sandal", "bag")))
    held = {CLASS_NAMES.index("sandal"), CLASS_NAMES.index("bag")}
    train = [r for r in records if r.meta["split"] == "train"]
    val = [r for r in records if r.meta["split"] == "val"]
    assert train and not any(r.meta["label"] in held for r in train)
    assert not any("zero_shot" in r.meta for r in train)
    for record in val:
        assert record.meta.get("zero_shot", False) == (record.meta["label"] in held)
    assert Counter(r.meta["label"] for r in val if r.meta.get("zero_shot")) == {c: TEST_PER_CLASS for c in held}
    with pytest.raises(ConfigError, match="data.source_options.zero_shot_classes: unknown Fashion-MNIST class 'boots'"):
        records_from_fashion_mnist(fmnist_dir, zero_shot_classes=("boots",))
    with pytest.raises(ConfigError, match="nothing to train"):
        class_ids(CLASS_NAMES)


def test_default_folder_and_open_source(fmnist_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(fmnist_dir))
    items = list(open_source("fashion-mnist", "default", limit_per_class=1))
    assert len(items) == 20
    scenes = list(open_source("fashion-mnist-scenes", "default", scene_count=10, val_fraction=0.3))
    assert Counter(r.meta["split"] for r in scenes) == {"train": 7, "val": 3}
    with pytest.raises(ConfigError, match="source 'jsonl' takes no option limit_per_class; valid: image_root"):
        open_source("jsonl", "x.jsonl", limit_per_class=1)
    monkeypatch.setenv(ENV_VAR, str(fmnist_dir / "nowhere"))
    with pytest.raises(DataError, match="nowhere: Fashion-MNIST folder not found"):
        records_from_fashion_mnist()


def test_scene_caption_grammar() -> None:
    assert scene_caption([7, 8, 6, 3]) == "a sneaker, a bag, a shirt and a dress"
    assert scene_caption([9, 0, 1, 9]) == "an ankle boot, a t-shirt, a trouser and an ankle boot"
    grid = compose_scene(np.arange(4)[:, None, None] * np.ones((4, 2, 2), dtype=np.uint8))
    assert grid.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_scenes_match_their_items_and_are_deterministic(fmnist_dir: Path) -> None:
    scenes = list(records_from_fashion_mnist_scenes(fmnist_dir, scene_count=40, val_fraction=0.25, seed=3))
    assert Counter(r.meta["split"] for r in scenes) == {"train": 30, "val": 10}
    sources = {"train": load_fashion_mnist(fmnist_dir, "train"), "val": load_fashion_mnist(fmnist_dir, "val")}
    for scene in scenes:
        split = scene.meta["split"]
        images, labels = sources[split]
        grid = pixels(scene.image_bytes)
        assert grid.shape == (56, 56) and "label" not in scene.meta
        quadrants = [grid[:28, :28], grid[:28, 28:], grid[28:, :28], grid[28:, 28:]]
        found = [int(q[4, 4] - 1) // 2 for q in quadrants]  # the pixel value names the item
        assert all(np.array_equal(q, images[i]) for q, i in zip(quadrants, found))
        assert len(set(found)) == 4
        assert scene.captions == (scene_caption([labels[i] for i in found]),)
        prefix = "fmnist-train-" if split == "train" else "fmnist-test-"
        assert scene.meta["item_keys"] == [f"{prefix}{i:05d}" for i in found]
        assert scene.meta["item_labels"] == [int(labels[i]) for i in found]
    again = list(records_from_fashion_mnist_scenes(fmnist_dir, scene_count=40, val_fraction=0.25, seed=3))
    assert [(r.key, r.captions, r.image_bytes) for r in again] == [(r.key, r.captions, r.image_bytes) for r in scenes]
    other = list(records_from_fashion_mnist_scenes(fmnist_dir, scene_count=40, val_fraction=0.25, seed=4))
    assert [r.captions for r in other] != [r.captions for r in scenes]
    assert image_classes([r.meta for r in scenes]) is None  # caption-only data
    with pytest.raises(ConfigError, match="data.source_options.scene_count"):
        records_from_fashion_mnist_scenes(fmnist_dir, scene_count=0)


def test_scene_zero_shot_items_never_reach_train_and_are_marked_in_val(fmnist_dir: Path) -> None:
    scenes = list(records_from_fashion_mnist_scenes(fmnist_dir, scene_count=200, val_fraction=0.5, seed=0,
                                                    zero_shot_classes=("sandal", "bag")))
    train = [r for r in scenes if r.meta["split"] == "train"]
    val = [r for r in scenes if r.meta["split"] == "val"]
    assert not any(word in r.captions[0] for r in train for word in ("sandal", "bag"))
    assert not any(label in (5, 8) for r in train for label in r.meta["item_labels"])
    assert all("zero_shot_items" not in r.meta for r in train)
    for scene in val:
        shown = sorted({{5: "a sandal", 8: "a bag"}[label] for label in scene.meta["item_labels"] if label in (5, 8)})
        assert scene.meta.get("zero_shot_items", []) == shown
    assert sum("zero_shot_items" in r.meta for r in val) > 20  # most val scenes show one of two of ten classes
    with pytest.raises(ConfigError, match="zero_shot_classes: unknown Fashion-MNIST class 'hat'"):
        records_from_fashion_mnist_scenes(fmnist_dir, scene_count=10, zero_shot_classes=("hat",))


def test_zero_shot_items_report_scores_each_item_query_against_brute_force() -> None:
    from retrieval.evaluation import zero_shot_report

    rng = np.random.default_rng(0)
    images = rng.normal(size=(30, 4)).astype(np.float32)
    meta = [{"item_labels": []} for _ in images]
    shows = {"a sandal": [0, 3, 7, 12], "a bag": [3, 20]}
    for name, rows in shows.items():
        for row in rows:
            meta[row].setdefault("zero_shot_items", []).append(name)
    queries = {"a bag": rng.normal(size=4).astype(np.float32), "a sandal": rng.normal(size=4).astype(np.float32)}

    def encode_batch(texts):
        return np.stack([queries[t] for t in texts]), np.ones(len(texts), dtype=bool), None

    report = zero_shot_report(images, [("x",)] * 30, meta, encode_batch, ks=(1, 5))
    assert [q.name for q in report.queries] == ["a bag", "a sandal"]
    ranks = {}
    for name, vector in queries.items():  # brute force: rank of each relevant image by L2 distance
        order = np.argsort(np.linalg.norm(images - vector, axis=1), kind="stable")
        ranks[name] = sorted(int(np.flatnonzero(order == row)[0]) + 1 for row in shows[name])
    for k in (1, 5):
        expected = np.mean([any(r <= k for r in ranks[name]) for name in queries])
        assert report.metrics[f"text_to_image/R@{k}"] == pytest.approx(expected)
    average_precision = [np.mean([(m + 1) / r for m, r in enumerate(ranks[name])]) for name in queries]
    assert report.metrics["text_to_image/mAP"] == pytest.approx(np.mean(average_precision))
    assert report.metrics["text_to_image/MedR"] == pytest.approx(np.median([ranks[n][0] for n in queries]))


def test_shards_round_trip(fmnist_dir: Path, tmp_path: Path) -> None:
    records = list(records_from_fashion_mnist(fmnist_dir, limit_per_class=2, zero_shot_classes=("sandal", "bag")))
    manifest = write_shards(records, tmp_path / "items", split_by="split", shard_size=16, progress=False)
    assert manifest.counts == {"train": 16, "val": 20}
    samples = list(iter_samples(list_shards(tmp_path / "items", "val")))
    by_key = {r.key: r for r in records}
    for sample in samples:
        assert sample.image.shape == (3, 28, 28) and sample.image.dtype == torch.uint8  # RGB
        assert sample.captions == list(by_key[sample.key].captions) and sample.meta == by_key[sample.key].meta
    assert sum(bool(s.meta.get("zero_shot")) for s in samples) == 4
    scenes = records_from_fashion_mnist_scenes(fmnist_dir, scene_count=12, val_fraction=0.5)
    assert write_shards(scenes, tmp_path / "scenes", split_by="split", progress=False).counts == {"train": 6, "val": 6}
    assert next(iter(iter_samples(list_shards(tmp_path / "scenes", "train")))).image.shape == (3, 56, 56)


def test_prepare_from_config(fmnist_dir: Path, tmp_path: Path) -> None:
    from retrieval.data.prepare import prepare

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "fashion_mnist.yaml", [
        f"data.path={fmnist_dir}", f"data.shard_dir={tmp_path / 'shards'}", "data.source_options.limit_per_class=2"])
    manifest = prepare(config)
    zero_shot = len(config.data.source_options.zero_shot_classes)
    assert manifest.counts == {"train": 2 * (10 - zero_shot), "val": 20}
    assert read_manifest(tmp_path / "shards").split == {"by": "split"}
    scenes = load_config(root / "configs" / "fashion_mnist_scenes.yaml", [
        f"data.path={fmnist_dir}", f"data.shard_dir={tmp_path / 'scenes'}", "data.source_options.scene_count=10"])
    assert sum(prepare(scenes).counts.values()) == 10
    info = json.loads((tmp_path / "scenes" / "manifest.json").read_text())
    assert info["source"].startswith("fashion-mnist-scenes:")


@pytest.mark.parametrize("overrides, message", [
    (["data.split_by=hash"], r"data.split_by must be 'split' with data.source_options.zero_shot_classes"),
    (["data.source_options.limit_per_class=0"], r"data.source_options.limit_per_class must be a positive integer"),
    (["data.source_options.zero_shot_classes=[boots]"], r"unknown Fashion-MNIST class 'boots'"),
    (["data.source_options.scene_count=10"], r"data.source_options: source 'fashion-mnist' takes no option "
                                              r"scene_count; valid: limit_per_class, zero_shot_classes"),
    (["data.limit_per_class=2"], r"unknown field\(s\) limit_per_class; .*\(limit_per_class: options of source "
                                 r"'fashion-mnist', set under source_options\)"),
    (["data.source=jsonl"], r"source 'jsonl' takes no option limit_per_class, zero_shot_classes; valid: image_root"),
    (["data.source=fashion-mnist-scenes", "data.source_options={}", "data.split_by=hash"],
     r"data.split_by must be 'split' for fashion-mnist-scenes"),
    (["data.source=fashion-mnist-scenes", "data.source_options={scene_count: 10}", "data.val_fraction=1.5"],
     r"data.val_fraction: must be at least 0.0 and at most 1.0, got 1.5"),
])
def test_source_options_are_checked_when_the_config_loads(overrides: list[str], message: str) -> None:
    """What prepare used to find out only when it ran: an option the source lacks, a bad value, a split clash."""
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match=message) as error:
        load_config(root / "configs" / "fashion_mnist.yaml", overrides)
    assert "\n" not in str(error.value)
