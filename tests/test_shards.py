"""Writing webdataset shards: round trips per source kind, splits, shard sizes, atomic failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from retrieval.data import (
    Record,
    iter_samples,
    list_shards,
    open_source,
    read_manifest,
    write_shards,
)
from retrieval.errors import ConfigError, DataError

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0), (0, 250, 250), (250, 0, 250), (9, 9, 9)]


def make_image(path: Path, index: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "RGBA" if path.suffix == ".png" else "RGB"  # PNG as RGBA: the reader must convert
    Image.new(mode, (12 + index, 10), COLORS[index % len(COLORS)]).save(path)
    return path.read_bytes()


def build_source(kind: str, root: Path, n: int = 5) -> tuple[str, Path, dict, dict[str, tuple]]:
    """A tiny source of ``kind``; returns (kind, path, its source options, {key: (bytes, captions)})."""
    expected: dict[str, tuple] = {}
    names = [f"img{i:02d}" + (".png" if i % 2 else ".jpg") for i in range(n)]
    if kind == "img2dataset":
        for i, name in enumerate(names):
            key = f"{i:09d}"
            stem = root / "out" / "00000" / key
            expected[key] = (make_image(stem.with_suffix(Path(name).suffix), i), (f"caption {i}",))
            stem.with_suffix(".txt").write_text(f"caption {i}")
            stem.with_suffix(".json").write_text(json.dumps({"key": key, "status": "success"}))
        return kind, root / "out", {}, expected
    for i, name in enumerate(names):
        expected[Path(name).stem] = (make_image(root / "images" / name, i), (f"caption {i} a", f"caption {i} b"))
    if kind == "jsonl":
        lines = [json.dumps({"image": f"images/{n_}", "captions": list(expected[Path(n_).stem][1]), "n": i})
                 for i, n_ in enumerate(names)]
        (root / "c.jsonl").write_text("\n".join(lines) + "\n")
        return kind, root / "c.jsonl", {}, expected
    if kind == "csv":
        with (root / "c.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            w.writerows([[f"images/{n_}", c] for n_ in names for c in expected[Path(n_).stem][1]])
        return kind, root / "c.csv", {}, expected
    images = [{"id": i, "file_name": n_} for i, n_ in enumerate(names)]
    anns = [{"image_id": i, "caption": c} for i, n_ in enumerate(names) for c in expected[Path(n_).stem][1]]
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return kind, root / "coco.json", {"image_root": str(root / "images")}, expected


def raw_samples(shards: list[str]) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()))


def jsonl_records(tmp_path: Path, n: int) -> list[Record]:
    kind, path, options, _ = build_source("jsonl", tmp_path, n)
    return list(open_source(kind, path, **options))


@pytest.mark.parametrize("kind", ["jsonl", "csv", "coco", "img2dataset"])
def test_round_trip_per_source(tmp_path: Path, kind: str) -> None:
    kind, path, options, expected = build_source(kind, tmp_path)
    records = list(open_source(kind, path, **options))
    manifest = write_shards(iter(records), tmp_path / "shards", shard_size=2, val_fraction=0.4, source=f"{kind}:x",
                            progress=False)
    shards = list_shards(tmp_path / "shards", "train") + list_shards(tmp_path / "shards", "val")
    raw = {s["__key__"]: s for s in raw_samples(shards)}
    assert set(raw) == set(expected)
    for record in records:
        sample = raw[record.key]
        assert sample[record.image_ext] == expected[record.key][0]  # original bytes, not re-encoded
        assert json.loads(sample["json"]) == {"key": record.key, "captions": list(record.captions), "meta": record.meta}
    decoded = {s.key: s for s in iter_samples(shards)}
    assert {k: tuple(s.captions) for k, s in decoded.items()} == {k: v[1] for k, v in expected.items()}
    assert all(s.image.dtype == torch.uint8 and s.image.shape[0] == 3 for s in decoded.values())  # RGB
    assert manifest.counts["train"] + manifest.counts["val"] == len(expected)
    assert manifest.captions["train"] + manifest.captions["val"] == sum(len(v[1]) for v in expected.values())
    assert read_manifest(tmp_path / "shards") == manifest and manifest.source == f"{kind}:x"


def test_hash_split_is_deterministic_and_order_independent(tmp_path: Path) -> None:
    records = jsonl_records(tmp_path, 30)

    def split_keys(recs: list[Record], out: str, seed: int = 0) -> dict[str, set]:
        write_shards(recs, tmp_path / out, val_fraction=0.3, split_seed=seed, progress=False)
        return {s: {x["__key__"] for x in raw_samples(list_shards(tmp_path / out, s))} for s in ("train", "val")}

    forward = split_keys(records, "a")
    assert split_keys(records[::-1], "b") == forward
    assert 0 < len(forward["val"]) < 30 and forward["train"] | forward["val"] == {r.key for r in records}
    assert split_keys(records, "c", seed=1) != forward
    assert read_manifest(tmp_path / "a").split == {"by": "hash", "val_fraction": 0.3, "seed": 0, "hash": "sha1"}


def test_field_split(tmp_path: Path) -> None:
    records = jsonl_records(tmp_path, 4)
    values = ["train", "val", "Validation", "test"]
    tagged = [Record(r.key, r.image_bytes, r.image_ext, r.captions, {"split": v}) for r, v in zip(records, values)]
    manifest = write_shards(tagged, tmp_path / "s", split_by="split", progress=False)
    assert manifest.counts == {"train": 1, "val": 3} and manifest.split == {"by": "split"}
    bad = [Record("k", records[0].image_bytes, "jpg", ("c",), {"split": "holdout"}, origin="c.jsonl:9")]
    with pytest.raises(DataError, match=r"c\.jsonl:9: meta field 'split' is 'holdout'"):
        write_shards(bad, tmp_path / "t", split_by="split", progress=False)
    with pytest.raises(DataError, match="meta field 'fold' .* missing"):
        write_shards(tagged, tmp_path / "t", split_by="fold", progress=False)


def test_shard_size_respected(tmp_path: Path) -> None:
    records = jsonl_records(tmp_path, 7)
    manifest = write_shards(records, tmp_path / "s", shard_size=3, val_fraction=0.0, progress=False)
    assert manifest.shards == {"train": ["train-000000.tar", "train-000001.tar", "train-000002.tar"], "val": []}
    shards = list_shards(tmp_path / "s", "train")
    assert [Path(p).name for p in shards] == manifest.shards["train"]
    assert [len(raw_samples([p])) for p in shards] == [3, 3, 1]
    assert [s.key for s in iter_samples(shards)] == [r.key for r in records]
    with pytest.raises(DataError, match=r"s: no 'val' shards"):
        list_shards(tmp_path / "s", "val")


def test_shards_are_reproducible(tmp_path: Path) -> None:
    records = jsonl_records(tmp_path, 3)
    write_shards(records, tmp_path / "a", progress=False, val_fraction=0.0)
    write_shards(records, tmp_path / "b", progress=False, val_fraction=0.0)
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() == (tmp_path / "b" / "train-000000.tar").read_bytes()


def broken_source(tmp_path: Path, problem: str) -> list | object:
    """Records (lazy) whose third item is broken in the way ``problem`` names."""
    kind, path, options, _ = build_source("jsonl", tmp_path, 4)
    lines = path.read_text().splitlines()
    if problem == "missing image":
        (tmp_path / "images" / "img02.jpg").unlink()
    elif problem == "bad json":
        lines[2] = lines[2][:-1]
    elif problem == "duplicate key":
        lines[2] = lines[0]
    elif problem == "undecodable":
        (tmp_path / "images" / "img02.jpg").write_bytes(b"this is not a jpeg")
    path.write_text("\n".join(lines) + "\n")
    return open_source(kind, path, **options)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing image", r"c\.jsonl:3 .*img02\.jpg"),
        ("bad json", r"c\.jsonl:3: bad JSON line"),
        ("duplicate key", r"duplicate key 'img00'.*c\.jsonl:1.*c\.jsonl:3"),
        ("undecodable", r"c\.jsonl:3 \(images/img02\.jpg\): image does not decode \(key img02\)"),
    ],
)
def test_failure_leaves_no_output(tmp_path: Path, problem: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        write_shards(broken_source(tmp_path, problem), tmp_path / "out" / "shards", shard_size=1, progress=False)
    assert "\n" not in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []  # no output and no temp folder left behind


def test_failure_keeps_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    (tmp_path / "good").mkdir()
    manifest = write_shards(jsonl_records(tmp_path / "good", 2), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError):
        write_shards(broken_source(tmp_path, "undecodable"), out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert read_manifest(out) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "good", "images", "shards"]


def test_bad_arguments_and_missing_dirs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shard_size"):
        write_shards([], tmp_path / "s", shard_size=0)
    with pytest.raises(ConfigError, match="val_fraction"):
        write_shards([], tmp_path / "s", val_fraction=1.5)
    with pytest.raises(DataError, match="no records to write"):
        write_shards([], tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    with pytest.raises(DataError, match=r"nowhere: shard folder not found .*'train'"):
        list_shards(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match=r"manifest\.json: manifest not found"):
        read_manifest(tmp_path)
