"""``data.on_error: skip``: bad items are passed over, counted by reason and listed; ``stop`` (the default) keeps
today's one-line errors. Property-based tests: the readers given random bytes raise nothing but a one-line
``DataError``, and with skip nothing at all."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.cli import main
from retrieval.data import iter_samples, read_shard_records, records_from_csv, records_from_jsonl
from retrieval.data.pipeline import skip_and_count
from retrieval.data.shards import SKIPPED
from retrieval.data.skips import SkippedItems, skipped_summary
from retrieval.errors import DataError
from tests.test_refusals import (  # noqa: F401  (small_shards is a fixture)
    SAMPLE_IMAGES,
    cut_after_samples,
    one_line_error,
    run_options,
    small_shards,
    truncated_jpeg,
)

GOOD_IMAGES = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:3]


def bad_and_good_captions(folder: Path) -> Path:
    """A JSONL with three good items and three bad ones: a truncated JPEG (line 2), a missing image (line 3)
    and a caption that is not UTF-8 (line 4)."""
    for name, source in zip(("a", "b", "c"), GOOD_IMAGES):
        shutil.copy(source, folder / f"{name}.jpg")
    shutil.copy(GOOD_IMAGES[0], folder / "d.jpg")
    truncated_jpeg(GOOD_IMAGES[1], folder / "cut.jpg")
    path = folder / "captions.jsonl"
    path.write_bytes(b'{"image": "a.jpg", "caption": "a dog on a sofa"}\n'
                     b'{"image": "cut.jpg", "caption": "a cat"}\n'
                     b'{"image": "missing.jpg", "caption": "a bird"}\n'
                     b'{"image": "d.jpg", "caption": "caf\xe9 au lait"}\n'
                     b'{"image": "b.jpg", "caption": "a red bus"}\n'
                     b'{"image": "c.jpg", "captions": ["two dogs", "a park"]}\n')
    return path


def prepare_args(path: Path, shards: Path, *overrides: str) -> list[str]:
    sets = ["data.source=jsonl", f"data.path={path}", "data.split_by=hash", "data.val_fraction=0.5",
            f"data.shard_dir={shards}", *overrides]
    return ["prepare", *[arg for setting in sets for arg in ("--set", setting)]]


def test_prepare_with_skip_writes_the_good_items_and_lists_the_bad(capsys, tmp_path):
    path, shards = bad_and_good_captions(tmp_path), tmp_path / "shards"
    assert main(prepare_args(path, shards, "data.on_error=skip")) == 0
    out = capsys.readouterr().out
    records = read_shard_records(sorted(str(p) for p in shards.glob("*.tar")))
    assert sorted(r["key"] for r in records) == ["a", "b", "c"]
    listed = [json.loads(line) for line in (shards / SKIPPED).read_text().splitlines()]
    assert [(item["where"], item["reason"]) for item in listed] == [
        (f"{path}:2 (cut.jpg)", "image does not decode"),
        (f"{path}:3 (missing.jpg)", "image file not found"),
        (f"{path}:4", "caption not UTF-8"),
    ]
    assert "truncated" in listed[0]["message"] and "missing.jpg" in listed[1]["message"]
    assert listed[2]["message"] == f"{path}:4: not valid UTF-8 text (byte 35 of the line)"
    assert out.rstrip().splitlines()[-1] == (
        "skipped 3 items: 1 image does not decode, 1 image file not found, 1 caption not UTF-8; "
        f"see {shards / SKIPPED}")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["skipped"] == {"image does not decode": 1, "image file not found": 1, "caption not UTF-8": 1}
    assert sum(manifest["counts"].values()) == 3


def test_prepare_stops_at_the_first_bad_item_by_default(capsys, tmp_path):
    path, shards = bad_and_good_captions(tmp_path), tmp_path / "shards"
    line = one_line_error(capsys, *prepare_args(path, shards))
    assert f"{path}:2 (cut.jpg): image does not decode (key cut)" in line
    assert not shards.exists()


def test_on_error_takes_stop_or_skip_only(capsys, tmp_path):
    path = bad_and_good_captions(tmp_path)
    line = one_line_error(capsys, *prepare_args(path, tmp_path / "shards", "data.on_error=ignore"))
    assert "data.on_error: must be stop or skip, got 'ignore'" in line


@pytest.mark.slow
def test_training_and_indexing_with_skip_warn_count_and_go_on(small_shards, capsys, tmp_path):  # noqa: F811
    shards, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(small_shards, shards)
    cut_after_samples(shards / "train-000000.tar", 5)
    assert main(["train", *run_options(run, shards, "train.epochs=2", "train.eval_every=1",
                                       "data.on_error=skip")]) == 0
    captured = capsys.readouterr()
    short = f"{shards / 'train-000000.tar'}: holds 5 of the 11 samples its manifest lists"
    warnings = [line.split("\r")[-1] for line in captured.err.splitlines() if "warning: skipped" in line]
    assert len(warnings) == 1 and short in warnings[0], captured.err  # once, though read more than once
    assert "data.on_error=skip: skipped 1 item: 1 shard holds fewer samples than its manifest" in captured.out
    assert (run / "checkpoints" / "best.pt").exists()

    cut_after_samples(shards / "val-000000.tar", 3)
    assert main(["index", "--run", str(run)]) == 0
    captured = capsys.readouterr()
    assert f"{shards / 'val-000000.tar'}: holds 3 of the" in captured.err
    assert "data.on_error=skip: skipped 1 item: 1 shard holds fewer samples than its manifest" in captured.out


@pytest.mark.slow
def test_streamed_training_with_skip_passes_over_a_sample_without_captions(sample_shards, capsys, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    shard = shards / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    dropped = members[3][0].name  # the json member of the second sample
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name != dropped:
                tar.addfile(member, io.BytesIO(data))
    assert main(["train", *run_options(
        tmp_path / "run", shards, "model.backbone=resnet18", "model.weights=random", "model.freeze_backbone=false",
        "data.image_size=32", "train.epochs=1", "train.eval_every=1", "data.on_error=skip")]) == 0
    captured = capsys.readouterr()
    assert f"{shard}: sample {dropped[:-len('.json')]}: no json member" in captured.err
    assert "data.on_error=skip: skipped" in captured.out and "sample lacks a member" in captured.out


def test_the_summary_counts_by_reason_most_frequent_first():
    counts = {"caption not UTF-8": 1, "image does not decode": 2}
    assert skipped_summary(dict(sorted(counts.items(), key=lambda kv: -kv[1])), "out/skipped.jsonl") == (
        "skipped 3 items: 2 image does not decode, 1 caption not UTF-8; see out/skipped.jsonl")
    assert skipped_summary({}) == "skipped no items"


# -- property-based: random bytes never raise anything but one line ----------------------------------------

FRAGMENTS = [b'{"image": "a.jpg", "caption": "a dog"}', b'{"image": ', b'"a.jpg"', b'"caption": ', b'"captions": [',
             b'"\xff\xfe"', b"image,caption", b"a.jpg,a dog", b'"', b",", b"\n", b"\r\n", b"{", b"}", b"[", b"]",
             b"\x00", b"1" * 5000, b"[" * 3000, b'""', b"missing.jpg"]
TEXTISH = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=40)), max_size=30).map(b"".join)
RANDOM_BYTES = st.one_of(st.binary(max_size=2000), TEXTISH)
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_one_line(error: DataError) -> None:
    text = str(error)
    assert text and "\n" not in text and "\r" not in text, text
    assert " object at 0x" not in text, text


def read_all(read, data: bytes, name: str, skipped: SkippedItems | None = None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(GOOD_IMAGES[0], Path(folder) / "a.jpg")
        path = Path(folder) / name
        path.write_bytes(data)
        if skipped is not None:
            list(read(path, skipped=skipped))
            return
        try:
            list(read(path))
        except DataError as error:
            assert_one_line(error)


@PROPERTY
@given(RANDOM_BYTES)
def test_the_jsonl_reader_on_random_bytes(data):
    read_all(records_from_jsonl, data, "captions.jsonl")
    skipped = SkippedItems()
    read_all(records_from_jsonl, data, "captions.jsonl", skipped)
    for item in skipped.items:
        assert "\n" not in item.message and " object at 0x" not in item.message


@PROPERTY
@given(RANDOM_BYTES.map(lambda data: b"image,caption\n" + data) | RANDOM_BYTES)
def test_the_csv_reader_on_random_bytes(data):
    read_all(records_from_csv, data, "captions.csv")
    skipped = SkippedItems()
    read_all(records_from_csv, data, "captions.csv", skipped)
    for item in skipped.items:
        assert "\n" not in item.message and " object at 0x" not in item.message


def read_shard(data: bytes, handler=None) -> None:
    """``iter_samples`` and ``read_shard_records`` over one shard holding ``data``."""
    with tempfile.TemporaryDirectory() as folder:
        shard = Path(folder) / "train-000000.tar"
        shard.write_bytes(data)
        for read in (read_shard_records, lambda paths, **kw: list(iter_samples(paths, **kw))):
            if handler is not None:
                read([str(shard)], handler=handler)
                continue
            try:
                read([str(shard)])
            except DataError as error:
                assert_one_line(error)


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


MEMBER_NAMES = st.sampled_from(["k1.jpg", "k1.json", "k2.png", "k2.json", "k3.txt", "k1.jpeg", "x"])
MEMBER_BYTES = st.one_of(st.binary(max_size=300), st.sampled_from(
    [b'{"key": "k1", "captions": ["a dog"]}', b'{"captions": 3}', b"[]", b"null", b'{"key": 1, "captions": "ab"}',
     GOOD_IMAGES[0].read_bytes()[:500]]))
VALID_TARS = st.lists(st.tuples(MEMBER_NAMES, MEMBER_BYTES), max_size=6).map(tar_of)


@PROPERTY
@given(st.one_of(st.binary(max_size=3000), VALID_TARS.map(lambda tar: tar[: len(tar) // 2]), VALID_TARS))
def test_the_shard_reader_on_random_bytes(data):
    read_shard(data)
    skipped = SkippedItems()
    read_shard(data, handler=skip_and_count(skipped))
    for item in skipped.items:
        assert "\n" not in item.message and " object at 0x" not in item.message
