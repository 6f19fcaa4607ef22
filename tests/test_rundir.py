"""The run folder and index folder layouts: what training and indexing write is where RunDir/IndexDir say."""

from __future__ import annotations

import json

import pytest

from retrieval.checkpoint import file_fingerprint
from retrieval.rundir import IndexDir, RunDir, index_stamp
from retrieval.thumbnails import ThumbnailReader


def test_run_folder_holds_what_training_wrote(trained_run):
    run = RunDir(trained_run.run_dir)
    assert run.config_file.is_file() and run.metrics_file.is_file()
    assert run.checkpoint() == trained_run.best_checkpoint and run.checkpoint("last.pt") == trained_run.last_checkpoint
    assert run.checkpoint_names() == ["best.pt", "last.pt"]
    assert RunDir.of_checkpoint(trained_run.last_checkpoint) == run
    assert RunDir(run) == run and IndexDir(run.index) == run.index  # either accepts a path-like of its kind


@pytest.mark.slow
def test_index_folder_holds_what_indexing_wrote(trained_run, tmp_path):
    from retrieval.checkpoint import load_checkpoint
    from retrieval.data import list_shards
    from retrieval.index import VectorIndex
    from retrieval.indexing import build_index

    model = load_checkpoint(trained_run.best_checkpoint)
    shards = list_shards(model.config.data.shard_dir, "val")[:1]
    index = IndexDir(build_index(model, shards, RunDir(tmp_path).index))
    assert index.path == tmp_path / "index" and index.exists() and index.is_index()
    assert index.read_stamp() == index_stamp(model)
    assert index.model_fingerprint() == file_fingerprint(trained_run.best_checkpoint)
    assert json.loads(index.vocabulary_file.read_text())["words"]
    items = VectorIndex.load(index.images).metadata_for(range(3))
    # thumbnails in a few tars (here one), each item naming the tar that holds it
    assert [item["thumbnail"] for item in items] == ["thumbnails/thumbs_000000.tar"] * 3
    assert sorted(p.name for p in index.thumbnails.iterdir()) == ["thumbs_000000.json", "thumbs_000000.tar"]
    reader = ThumbnailReader(index.thumbnails)
    assert all(reader.get(item["key"])[:2] == b"\xff\xd8" for item in items)  # JPEG data
    assert len(VectorIndex.load(index.captions)) >= len(items)


def test_unreadable_or_missing_stamp_reads_as_none(tmp_path):
    index = IndexDir(tmp_path / "index")
    assert index.read_stamp() is None and not index.exists() and not index.is_index()
    index.images.mkdir(parents=True)
    assert index.exists() and not index.is_index()
    for text in ("{", "[]", '{"stamp": 3}', '{"other": {}}'):
        index.stamp_file.write_text(text)
        assert index.is_index() and index.read_stamp() is None and index.model_fingerprint() is None
    index.stamp_file.write_text(json.dumps({"stamp": {"model": "abc", "vectors": "def"}}))
    assert index.read_stamp() == {"model": "abc", "vectors": "def"} and index.model_fingerprint() == "abc"


def test_run_lists_its_stamped_indexes_default_first(tmp_path):
    run = RunDir(tmp_path)
    for name in ("another", "index", "zeta"):
        IndexDir(tmp_path / name).stamp_file.parent.mkdir(parents=True)
        IndexDir(tmp_path / name).stamp_file.write_text("{}")
    (tmp_path / "unstamped" / "images").mkdir(parents=True)
    run.checkpoints.mkdir()
    (run.checkpoints / "notes.txt").write_text("not a checkpoint")
    (run.checkpoints / "b.pt").write_bytes(b"")
    (run.checkpoints / "a.pt").write_bytes(b"")
    assert [index.path.name for index in run.indexes()] == ["index", "another", "zeta"]
    assert run.checkpoint_names() == ["a.pt", "b.pt"]
    assert RunDir(tmp_path / "nowhere").indexes() == [] and RunDir(tmp_path / "nowhere").checkpoint_names() == []
