"""Caption sources: jsonl, csv, COCO json and img2dataset output → Record streams."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from retrieval.data import (
    Record,
    make_key,
    open_source,
    records_from_coco,
    records_from_csv,
    records_from_img2dataset,
    records_from_jsonl,
)
from retrieval.errors import ConfigError, DataError


def make_image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path)
    return path.read_bytes()


def write_lines(path: Path, objs: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def test_jsonl_coco_mini_format(tmp_path: Path) -> None:
    raw = make_image(tmp_path / "images" / "000000000790.jpg")
    make_image(tmp_path / "images" / "42.png", (0, 0, 255))
    write_lines(
        tmp_path / "captions.jsonl",
        [
            {"image": "images/000000000790.jpg", "captions": ["a cake", " a table "], "coco_id": 790, "split": "train"},
            "",
            {"image": "images/42.png", "caption": "blue square"},
        ],
    )
    records = list(records_from_jsonl(tmp_path / "captions.jsonl"))
    assert [r.key for r in records] == ["000000000790", "42"]
    first = records[0]
    assert first.image_bytes == raw and first.image_ext == "jpg"
    assert first.captions == ("a cake", "a table")
    assert first.meta == {"coco_id": 790, "split": "train"}
    assert records[1].captions == ("blue square",) and records[1].image_ext == "png" and records[1].meta == {}


def test_jsonl_image_root_and_lazy(tmp_path: Path) -> None:
    make_image(tmp_path / "pics" / "a.jpg")
    write_lines(
        tmp_path / "c.jsonl",
        [{"image": "a.jpg", "caption": "x"}, {"image": "gone.jpg", "caption": "y"}],
    )
    records = records_from_jsonl(tmp_path / "c.jsonl", image_root=tmp_path / "pics")
    assert next(records).key == "a"  # lazy: the bad line 2 is only read afterwards
    with pytest.raises(DataError, match=r"c\.jsonl:2.*gone\.jpg"):
        next(records)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"image": "a.jpg", "captions": ["x"]', r"c\.jsonl:2: bad JSON line"),
        ('{"captions": ["x"]}', r"c\.jsonl:2: field 'image'"),
        ('{"image": "a.jpg"}', r"c\.jsonl:2.*'caption'.*missing or empty"),
        ('{"image": "a.jpg", "captions": []}', r"c\.jsonl:2.*'captions'.*missing or empty"),
        ('{"image": "a.jpg", "captions": ["ok", "  "]}', r"c\.jsonl:2.*'captions' item 1"),
        ("[1, 2]", r"c\.jsonl:2: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    make_image(tmp_path / "a.jpg")
    write_lines(tmp_path / "c.jsonl", [{"image": "a.jpg", "caption": "fine"}, line])
    with pytest.raises(DataError, match=message) as info:
        list(records_from_jsonl(tmp_path / "c.jsonl"))
    assert "\n" not in str(info.value)


def test_duplicate_key_names_both_sources(tmp_path: Path) -> None:
    make_image(tmp_path / "x" / "cat.jpg")
    make_image(tmp_path / "y" / "cat.png")
    write_lines(tmp_path / "c.jsonl", [{"image": "x/cat.jpg", "caption": "a"}, {"image": "y/cat.png", "caption": "b"}])
    with pytest.raises(DataError, match=r"duplicate key 'cat'.*c\.jsonl:1.*c\.jsonl:2"):
        list(records_from_jsonl(tmp_path / "c.jsonl"))


def test_keys_are_sanitised() -> None:
    assert make_key("a.b c/d") == "a_b_c_d"
    assert make_key("000000012") == "000000012"
    assert "." not in make_key("photo.v2.final")


def test_csv_groups_rows_in_first_seen_order(tmp_path: Path) -> None:
    b = make_image(tmp_path / "img" / "b.jpg")
    make_image(tmp_path / "img" / "a.png")
    with (tmp_path / "c.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "source"])
        w.writerows([["img/b.jpg", "bee one", "s1"], ["img/a.png", "ant", "s2"], ["img/b.jpg", "bee two", "s1"]])
    records = list(records_from_csv(tmp_path / "c.csv"))
    assert [(r.key, r.captions) for r in records] == [("b", ("bee one", "bee two")), ("a", ("ant",))]
    assert records[0].image_bytes == b and records[0].meta == {"source": "s1"}


def test_csv_errors(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("image,text\na.jpg,x\n")
    with pytest.raises(DataError, match=r"c\.csv: CSV header lacks column 'caption'"):
        list(records_from_csv(tmp_path / "c.csv"))
    (tmp_path / "d.csv").write_text("image,caption\na.jpg,x\na.jpg,\n")
    with pytest.raises(DataError, match=r"d\.csv:3: column 'caption' is empty"):
        list(records_from_csv(tmp_path / "d.csv"))


def coco_json(tmp_path: Path) -> Path:
    make_image(tmp_path / "val2017" / "000000000139.jpg")
    make_image(tmp_path / "val2017" / "000000000285.jpg", (10, 200, 10))
    data = {
        "licenses": [{"id": 4, "name": "CC BY 2.0", "url": "http://cc/by"}],
        "images": [
            {"id": 285, "file_name": "000000000285.jpg", "license": 4, "flickr_url": "http://f/285"},
            {"id": 139, "file_name": "000000000139.jpg"},
        ],
        "annotations": [
            {"image_id": 139, "id": 1, "caption": "a room"},
            {"image_id": 285, "id": 2, "caption": "a bear"},
            {"image_id": 139, "id": 3, "caption": "a tv"},
        ],
    }
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_json(tmp_path: Path) -> None:
    records = list(records_from_coco(coco_json(tmp_path), tmp_path / "val2017"))
    assert [(r.key, r.captions) for r in records] == [
        ("000000000285", ("a bear",)),
        ("000000000139", ("a room", "a tv")),
    ]
    assert records[0].meta == {
        "coco_id": 285,
        "license_id": 4,
        "license": "CC BY 2.0",
        "license_url": "http://cc/by",
        "flickr_url": "http://f/285",
    }
    assert records[1].meta == {"coco_id": 139}


def test_coco_errors(tmp_path: Path) -> None:
    path = coco_json(tmp_path)
    data = json.loads(path.read_text())
    data["images"].append({"id": 7, "file_name": "7.jpg"})
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"captions_val2017\.json: images\[2\] \(7\.jpg\): no captions"):
        list(records_from_coco(path, tmp_path / "val2017"))
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"captions_val2017\.json: bad JSON at line 1"):
        list(records_from_coco(path, tmp_path))


def img2dataset_files(root: Path) -> dict[str, bytes]:
    """Two shards folders: 3 successes and one failed entry (image present, status error)."""
    images = {}
    for folder, key, status in [("00000", "000000000", "success"), ("00000", "000000001", "failed_to_resize"),
                                ("00000", "000000002", "success"), ("00001", "000010000", "success")]:
        stem = root / folder / key
        images[key] = make_image(stem.with_suffix(".jpg"))
        stem.with_suffix(".txt").write_text(f"caption {key}")
        stem.with_suffix(".json").write_text(json.dumps({"key": key, "status": status, "url": f"http://x/{key}"}))
    (root / "00000.parquet").write_bytes(b"PAR1")
    (root / "00000_stats.json").write_text("{}")
    del images["000000001"]
    return images


def test_img2dataset_files_layout(tmp_path: Path) -> None:
    images = img2dataset_files(tmp_path / "out")
    records = list(records_from_img2dataset(tmp_path / "out"))
    assert [r.key for r in records] == list(images)
    assert all(r.image_bytes == images[r.key] for r in records)
    assert records[0].captions == ("caption 000000000",)
    assert records[0].meta == {"key": "000000000", "status": "success", "url": "http://x/000000000"}


def test_img2dataset_webdataset_layout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    raw = make_image(tmp_path / "pic.jpg")
    for shard in range(2):
        with wds.TarWriter(str(out / f"{shard:05d}.tar"), encoder=False) as tar:
            for i in range(2):
                key = f"{shard:05d}{i:04d}"
                status = "failed_to_download" if (shard, i) == (1, 1) else "success"
                meta = json.dumps({"key": key, "status": status, "caption": f"c {key}"})
                tar.write({"__key__": key, "jpg": raw, "txt": f"c {key}".encode(), "json": meta.encode()})
    records = list(records_from_img2dataset(out))
    assert [r.key for r in records] == ["000000000", "000000001", "000010000"]
    assert records[2].captions == ("c 000010000",) and records[2].image_bytes == raw
    assert records[2].meta == {"key": "000010000", "status": "success"}


def test_img2dataset_missing_caption_and_empty_folder(tmp_path: Path) -> None:
    make_image(tmp_path / "out" / "00000" / "000000000.jpg")
    with pytest.raises(DataError, match=r"00000/000000000\.txt: caption file missing"):
        list(records_from_img2dataset(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no img2dataset output"):
        records_from_img2dataset(tmp_path / "empty")


def test_open_source_dispatch(tmp_path: Path) -> None:
    make_image(tmp_path / "a.jpg")
    write_lines(tmp_path / "c.jsonl", [{"image": "a.jpg", "caption": "x"}])
    assert [r.key for r in open_source("jsonl", tmp_path / "c.jsonl")] == ["a"]
    coco = coco_json(tmp_path)
    assert len(list(open_source("coco", coco, image_root=tmp_path / "val2017"))) == 2
    with pytest.raises(ConfigError, match="unknown source kind 'parquet'.*coco, csv, .*img2dataset, jsonl"):
        open_source("parquet", tmp_path)
    with pytest.raises(ConfigError, match="source 'img2dataset' takes no option image_root; valid: none"):
        open_source("img2dataset", tmp_path, image_root=tmp_path)


def test_record_equality_ignores_origin() -> None:
    a = Record("k", b"x", "jpg", ("c",), {}, origin="one")
    assert a == Record("k", b"x", "jpg", ("c",), {}, origin="two")
