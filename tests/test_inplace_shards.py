"""Webdataset shards read in place (``data.shards``): img2dataset output gives the samples a prepared copy holds."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from retrieval.config import DataConfig, load_config
from retrieval.data import iter_samples, list_shards, make_train_pipeline, read_shard_records, write_shards
from retrieval.data.in_place import InPlaceShard, resolve_shard_pattern, stats_count
from retrieval.data.pipeline import skip_and_count
from retrieval.data.skips import SkippedItems
from retrieval.data.sources import records_from_img2dataset
from retrieval.errors import ConfigError, DataError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = PROJECT_ROOT / "data" / "coco-mini"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset(folder: Path, per_shard: int = 20, failed: int = 1) -> list[dict]:
    """The embedded COCO sample as img2dataset writes it: ``NNNNN.tar`` (key.jpg, .txt, .json), ``NNNNN.parquet``
    and ``NNNNN_stats.json``; ``failed`` extra samples per shard whose json status is not success."""
    rows = [json.loads(line) for line in (SAMPLE / "captions.jsonl").read_text().splitlines() if line.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(rows), per_shard)):
        part = rows[start:start + per_shard]
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i, row in enumerate(part):
                key = f"{shard:05d}{i:04d}"
                image = (SAMPLE / row["image"]).read_bytes()
                meta = {"key": key, "status": "success", "split": row["split"], "url": row.get("coco_url", "")}
                _add(tar, f"{key}.jpg", image)
                _add(tar, f"{key}.txt", " ".join(row["captions"][:1]).encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
            for j in range(failed):  # not a success: passed over (and not counted by the stats file)
                key = f"{shard:05d}{9000 + j:04d}"
                _add(tar, f"{key}.jpg", image)
                _add(tar, f"{key}.txt", b"a caption that must not appear")
                _add(tar, f"{key}.json", json.dumps({"key": key, "status": "failed_to_download"}).encode())
        pq.write_table(pa.table({"key": [f"{shard:05d}{i:04d}" for i in range(len(part))]}),
                       folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(part) + failed,
                                                                    "successes": len(part)}))
    return rows


@pytest.fixture(scope="module")
def img2dataset_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("img2dataset") / "out"
    write_img2dataset(folder)
    return folder


def in_place(shards: str | Path, **values) -> DataConfig:
    return DataConfig(shards=str(shards), **values)


def prepared(img2dataset_dir: Path, out: Path, **split) -> Path:
    write_shards(records_from_img2dataset(img2dataset_dir), out, progress=False, **split)
    return out


def samples_of(shards) -> dict[str, tuple]:
    """key → (captions, meta, image pixels) of every sample."""
    return {s.key: (tuple(s.captions), json.dumps(s.meta, sort_keys=True), s.image.numpy().tobytes())
            for s in iter_samples(shards)}


def test_a_folder_lists_its_tars_only_and_patterns_expand(img2dataset_dir):
    tars = [str(img2dataset_dir / f"{i:05d}.tar") for i in range(3)]
    assert resolve_shard_pattern(str(img2dataset_dir)) == tars  # no .parquet, no _stats.json
    assert resolve_shard_pattern(f"{img2dataset_dir}/{{00000..00002}}.tar") == tars
    assert resolve_shard_pattern(f"{img2dataset_dir}/{{00001..00002}}.tar") == tars[1:]
    assert resolve_shard_pattern(f"{img2dataset_dir}/*.tar") == tars
    assert resolve_shard_pattern(tars[2]) == tars[2:]
    assert [stats_count(t) for t in tars] == [20, 20, 11]  # the stats files' successes
    train = list_shards(in_place(img2dataset_dir), "train")
    assert train == tars and all(isinstance(s, InPlaceShard) and s.split == "train" for s in train)
    assert [s.split for s in list_shards(in_place(img2dataset_dir), "all")] == [None] * 3


@pytest.mark.parametrize("pattern, message", [
    ("{folder}/{{00000..00009}}.tar", "00003.tar not found (7 of the 10 shards"),
    ("{folder}/{{00005..00009}}.tar", "matches no shard file"),
    ("{folder}/*.tgz", "matches no shard file"),
    ("{folder}/nowhere", "nowhere not found"),
    ("{folder}/../empty", "holds no .tar shards"),
])
def test_a_pattern_that_matches_nothing_is_a_one_line_error(img2dataset_dir, pattern, message):
    (img2dataset_dir.parent / "empty").mkdir(exist_ok=True)
    with pytest.raises(DataError, match="data.shards: ") as error:
        list_shards(in_place(pattern.format(folder=img2dataset_dir)), "train")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_shards_and_a_prepared_folder_together_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.shards \(x\) reads shards in place and data.shard_dir \(y\)"):
        DataConfig(shards="x", shard_dir="y")
    with pytest.raises(ConfigError, match="data.shards: empty"):
        DataConfig(shards=" ")
    with pytest.raises(ConfigError, match="data.prepare_workers: must be at least 1"):
        load_config(None, ["data.prepare_workers=0"])
    assert load_config(None, ["data.shards=somewhere/{0..3}.tar"]).data.shards == "somewhere/{0..3}.tar"


@pytest.mark.slow
@pytest.mark.parametrize("split", [{"split_by": "split"}, {"split_by": "hash", "val_fraction": 0.3, "split_seed": 5}])
def test_in_place_splits_hold_the_samples_of_a_prepared_copy(img2dataset_dir, tmp_path, split):
    copy = prepared(img2dataset_dir, tmp_path / "shards", **split)
    config = in_place(img2dataset_dir, **split)
    for name in ("train", "val"):
        mine, theirs = samples_of(list_shards(config, name)), samples_of(list_shards(copy, name))
        assert mine == theirs and len(mine) > 5
        assert not any("must not appear" in c for caps, _, _ in mine.values() for c in caps)
    assert read_shard_records(list_shards(config, "val")) == read_shard_records(list_shards(copy, "val"))
    everything = samples_of(list_shards(config, "all"))
    assert len(everything) == 51 and everything == {**samples_of(list_shards(copy, "train")),
                                                    **samples_of(list_shards(copy, "val"))}


def test_the_split_survives_str_and_pickling():
    shard = InPlaceShard("a/00000.tar", "val", "hash", 0.25, 7)
    for copy in (str(shard), pickle.loads(pickle.dumps(shard))):
        assert isinstance(copy, InPlaceShard) and copy == "a/00000.tar"
        assert copy.selection() == ["val", "hash", 0.25, 7]


def test_streaming_epochs_read_the_train_samples_of_the_prepared_path(img2dataset_dir, tmp_path):
    copy = prepared(img2dataset_dir, tmp_path / "shards", split_by="split")
    expected = sorted(r["key"] for r in read_shard_records(list_shards(copy, "train")))
    pipeline = make_train_pipeline(list_shards(in_place(img2dataset_dir, split_by="split"), "train"),
                                   transform=lambda image, seed: image, caption_vector=lambda c: np.zeros(2),
                                   shuffle_buffer=8, seed=3)
    for epoch in range(3):
        pipeline.set_epoch(epoch)
        assert sorted(key for _, _, key in pipeline) == expected


def test_a_truncated_shard_is_found_by_its_stats_file(img2dataset_dir, tmp_path):
    folder = tmp_path / "cut"
    folder.mkdir()
    for path in img2dataset_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    with tarfile.open(img2dataset_dir / "00001.tar") as whole, tarfile.open(folder / "00001.tar", "w") as cut:
        for member in whole.getmembers()[:30]:  # cut at a member boundary: 10 of its 20 samples, no read error
            cut.addfile(member, whole.extractfile(member))
    shards = list_shards(in_place(folder), "all")
    with pytest.raises(DataError, match=r"00001.tar: holds 10 of the 20 samples its stats file counts"):
        list(iter_samples(shards))
    skipped = SkippedItems()
    assert len(list(iter_samples(shards, skip_and_count(skipped)))) == 41 and len(skipped) == 1


def test_a_split_field_the_samples_lack_is_a_one_line_error_with_a_hint(img2dataset_dir):
    with pytest.raises(DataError, match=r"meta field 'coco_split' \(split_by\) is missing; data.split_by: hash"):
        read_shard_records(list_shards(in_place(img2dataset_dir, split_by="coco_split"), "train"))


def test_a_sample_without_a_caption_follows_the_skip_policy(tmp_path):
    folder = tmp_path / "bad"
    write_img2dataset(folder, per_shard=60, failed=0)
    with tarfile.open(folder / "00000.tar", "a") as tar:
        _add(tar, "nocaption.jpg", (SAMPLE / "images" / "000000000790.jpg").read_bytes())
    (folder / "00000_stats.json").unlink()
    with pytest.raises(DataError, match="nocaption.txt: caption file missing"):
        list(iter_samples(list_shards(in_place(folder), "all")))
    skipped = SkippedItems()
    assert len(list(iter_samples(list_shards(in_place(folder), "all"), skip_and_count(skipped)))) == 51
    assert skipped.counts() == {"sample does not decode": 1}


@pytest.mark.slow
def test_training_from_shards_in_place_equals_training_from_the_prepared_copy(img2dataset_dir, tmp_path):
    from retrieval.train import fit

    copy = prepared(img2dataset_dir, tmp_path / "shards", split_by="split")
    common = [f"data.path={img2dataset_dir}", "data.source=img2dataset", "data.split_by=split", "train.epochs=4",
              "train.eval_every=2", "train.batch_size=8"]
    runs = [fit(load_config(PROJECT_ROOT / "configs" / "demo.yaml",
                            [*common, f"train.run_dir={tmp_path / name}", *extra]), progress=False)
            for name, extra in (("copy", [f"data.shard_dir={copy}"]), ("in-place", [f"data.shards={img2dataset_dir}"]))]
    assert [s.loss for s in runs[0].history] == pytest.approx([s.loss for s in runs[1].history])
    assert runs[0].history[-1].metrics == pytest.approx(runs[1].history[-1].metrics)
    weights = [torch.load(run.last_checkpoint, weights_only=False)["encoder"] for run in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.slow
def test_embed_reads_a_split_of_shards_in_place_as_it_reads_the_prepared_copy(trained_run, img2dataset_dir, tmp_path):
    from retrieval.checkpoint import load_checkpoint
    from retrieval.embed import encode_shards
    from retrieval.embedding_shards import embed_shards, iter_embedding_shards
    from retrieval.transforms import eval_transform

    model = load_checkpoint(trained_run.best_checkpoint)
    copy = prepared(img2dataset_dir, tmp_path / "shards", split_by="split")
    transform = eval_transform(model.config.data.image_size, model.encoder.mean, model.encoder.std)
    reference = encode_shards(list_shards(copy, "val"), model.embed_images, transform, progress=False)
    shards = list_shards(in_place(img2dataset_dir, split_by="split"), "val")
    result = embed_shards(model, shards, tmp_path / "emb", dtype="float32", batch_size=7, workers=2,
                          thumbnails=False, progress=False)  # loader workers get the shards pickled
    assert result.images == 25
    rows = {row["key"]: (vector, row["captions"]) for _, vectors, meta in iter_embedding_shards(tmp_path / "emb")
            for vector, row in zip(vectors, meta)}
    assert sorted(rows) == sorted(reference.keys)
    for key, vector, captions in zip(reference.keys, reference.vectors.numpy(), reference.captions):
        np.testing.assert_allclose(rows[key][0], vector, atol=1e-5)
        assert rows[key][1] == captions
