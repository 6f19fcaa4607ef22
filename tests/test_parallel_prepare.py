"""``retrieval prepare`` with several processes writes what one process writes."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from pipelines.prepare import main as prepare_main
from retrieval.config import load_config
from retrieval.data import list_shards, read_manifest, records_from_jsonl, write_shards
from retrieval.data.prepare import MAX_AUTO_WORKERS, prepare, prepare_workers
from retrieval.data.skips import SkippedItems
from retrieval.errors import ConfigError, DataError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = PROJECT_ROOT / "data" / "coco-mini"


def sample_copy(folder: Path, broken: tuple[str, ...] = ()) -> Path:
    """The embedded sample's captions and images in ``folder``, with the images named in ``broken`` cut short."""
    shutil.copytree(SAMPLE, folder)
    for name in broken:
        image = folder / "images" / name
        image.write_bytes(image.read_bytes()[:300])
    return folder / "captions.jsonl"


def contents(folder: Path) -> set[tuple]:
    """(key, split, captions, meta, image bytes) of every sample, read from the tar files themselves."""
    rows = set()
    for split in ("train", "val"):
        for shard in list_shards(folder, split):
            with tarfile.open(shard) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name, data in members.items():
                if name.endswith(".json"):
                    info = json.loads(data)
                    key = name.removesuffix(".json")
                    rows.add((info["key"], split, tuple(info["captions"]), json.dumps(info["meta"], sort_keys=True),
                              members[f"{key}.jpg"]))
    return rows


def write(captions: Path, out: Path, workers: int, skipped: SkippedItems | None = None, **kw):
    records = records_from_jsonl(captions, skipped=skipped)
    return write_shards(records, out, shard_size=7, split_by="hash", val_fraction=0.3, progress=False,
                        skipped=skipped, workers=workers, **kw)


def test_two_processes_write_the_samples_keys_splits_and_files_of_one(tmp_path):
    captions = sample_copy(tmp_path / "sample")
    one, two = write(captions, tmp_path / "one", 1), write(captions, tmp_path / "two", 2)
    assert contents(tmp_path / "one") == contents(tmp_path / "two")
    assert len(contents(tmp_path / "one")) == 51
    assert one.to_json() == two.to_json() == read_manifest(tmp_path / "two").to_json()
    for split, names in one.shards.items():  # 7 per shard, the last one of a split holds the rest
        full = len(names) - 1
        assert [one.shard_counts[n] for n in names] == [7] * full + [one.counts[split] - 7 * full]
    assert sum(one.counts.values()) == 51 and len(one.shards["val"]) >= 2
    for name in one.shard_counts:  # with no bad record the files are the same bytes
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted([*one.shard_counts, "manifest.json"])


def test_skipped_records_are_the_same_with_more_processes(tmp_path):
    broken = ("000000000790.jpg", "000000062554.jpg")
    captions = sample_copy(tmp_path / "sample", broken)
    outcomes = []
    for workers in (1, 3):
        skipped = SkippedItems()
        manifest = write(captions, tmp_path / f"w{workers}", workers, skipped)
        outcomes.append((contents(tmp_path / f"w{workers}"), manifest.counts, manifest.captions, manifest.skipped,
                         sorted(item.where for item in skipped.items)))
        assert sum(manifest.shard_counts.values()) == 49
    assert outcomes[0] == outcomes[1] and outcomes[0][3] == {"image does not decode": 2}
    assert len(outcomes[0][0]) == 49


def test_a_bad_image_stops_every_process_in_one_line_and_leaves_no_folder(tmp_path):
    captions = sample_copy(tmp_path / "sample", ("000000062554.jpg",))
    with pytest.raises(DataError, match=r"000000062554.jpg\): image does not decode") as error:
        write(captions, tmp_path / "out", 2)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["sample"]


def test_workers_come_from_the_flag_the_config_or_the_cpus(tmp_path, monkeypatch):
    config = load_config(None, ["data.prepare_workers=3"])
    assert prepare_workers(config) == 3 and prepare_workers(config, 5) == 5
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert prepare_workers(load_config(None)) == MAX_AUTO_WORKERS
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert prepare_workers(load_config(None)) == 1
    with pytest.raises(ConfigError, match="--workers: must be at least 1, got 0"):
        prepare_workers(config, 0)
    with pytest.raises(ConfigError, match="workers must be a positive integer"):
        write(SAMPLE / "captions.jsonl", tmp_path / "x", 0)


def test_prepare_refuses_shards_read_in_place(tmp_path):
    config = load_config(None, [f"data.shards={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.shards \(.*\) is read in place; there is nothing to prepare"):
        prepare(config)


def test_the_command_takes_a_workers_flag(tmp_path, capsys):
    captions = sample_copy(tmp_path / "sample")
    out = tmp_path / "shards"
    assert prepare_main(["--set", f"data.path={captions}", "--set", f"data.shard_dir={out}", "--set",
                         "data.shard_size=10", "--workers", "2"]) == 0
    assert read_manifest(out).counts == {"train": 26, "val": 25}  # COCO's own split (the demo's split_by)
    assert "wrote {'train': 26, 'val': 25} samples" in capsys.readouterr().out


def test_errors_come_in_reading_order_as_from_one_process(tmp_path):
    """A cut image (found in a worker) before a missing one (found while reading): the cut one stops the run, and
    the skip list keeps reading order."""
    captions = sample_copy(tmp_path / "sample", ("000000000790.jpg",))  # line 1
    lines = captions.read_text().splitlines()
    lines[4] = lines[4].replace(json.loads(lines[4])["image"], "images/missing.jpg")
    captions.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"captions.jsonl:1 \(images/000000000790.jpg\): image does not decode"):
        write(captions, tmp_path / "out", 2)
    for workers in (1, 2):
        skipped = SkippedItems()
        write(captions, tmp_path / f"w{workers}", workers, skipped)
        assert [(item.where, item.reason) for item in skipped.items] == [
            (f"{captions}:1 (images/000000000790.jpg)", "image does not decode"),
            (f"{captions}:5 (images/missing.jpg)", "image file not found")]
