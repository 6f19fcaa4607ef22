"""``retrieval embed``: embedding shards equal the model's own embeddings, two torchrun processes write what one
writes, a killed run resumes without redoing finished shards, and outputs of another model are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.checkpoint import load_checkpoint
from retrieval.data import iter_samples, list_shards
from retrieval.embed import encode_shards
from retrieval.embedding_shards import EmbeddingDir, embed_shards, iter_embedding_shards, shard_names
from retrieval.errors import DataError
from retrieval.thumbnails import ThumbnailReader, scan_tar_offsets, thumbnail_jpeg, write_thumbnail_tar
from retrieval.transforms import eval_transform
from tests.conftest import PROJECT_ROOT

KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
from retrieval import embedding_shards

write = embedding_shards.write_embedding_shard

def write_then_die(*args, **kwargs):
    write(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # right after the first shard's marker: no cleanup at all

embedding_shards.write_embedding_shard = write_then_die
from pipelines.cli import main
sys.exit(main(sys.argv[1:]))
"""


def all_shards(model) -> list[str]:
    return [s for split in ("train", "val") for s in list_shards(model.config.data.shard_dir, split)]


def read_folder(out: Path) -> tuple[np.ndarray, list[dict], dict]:
    """Every embedding, metadata row and thumbnail (key → bytes) of a finished embedding folder."""
    vectors, rows = [], []
    for _, shard_vectors, shard_rows in iter_embedding_shards(out):
        vectors.append(np.asarray(shard_vectors))
        rows += shard_rows
    reader = ThumbnailReader(EmbeddingDir(out).thumbnails)
    return np.concatenate(vectors), rows, {row["key"]: reader.get(row["key"]) for row in rows}


def run_embed(run_dir: Path, out: Path, *args: str, processes: int = 1, kill_after_first_shard: bool = False,
              expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``retrieval embed --run-dir run_dir --split all --out out args`` in a subprocess (torchrun for processes > 1)."""
    entry = ["-m", "pipelines.cli"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    if kill_after_first_shard:
        script = out.parent / "kill_after_first_shard.py"
        script.write_text(KILL_AFTER_FIRST_SHARD)
        entry = [str(script)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *entry]
    else:
        command = [sys.executable, *entry]
    done = subprocess.run([*command, "embed", "--run-dir", str(run_dir), "--split", "all", "--out", str(out), *args],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_embedding_shards_hold_the_models_embeddings_captions_and_thumbnails(trained_run, tmp_path):
    model = load_checkpoint(trained_run.best_checkpoint)
    shards = all_shards(model)
    result = embed_shards(model, shards, tmp_path / "emb", dtype="float32", batch_size=7, progress=False)
    assert result.encoded == shard_names(shards) == ["train-000000", "val-000000"] and result.already_done == []
    vectors, rows, thumbs = read_folder(tmp_path / "emb")
    transform = eval_transform(model.config.data.image_size, model.encoder.mean, model.encoder.std)
    reference = encode_shards(shards, model.embed_images, transform, progress=False)  # one batch size for all
    assert vectors.dtype == np.float32 and vectors.shape == tuple(reference.vectors.shape)
    np.testing.assert_allclose(vectors, reference.vectors.numpy(), atol=1e-5)
    assert [row["key"] for row in rows] == reference.keys
    assert [row["captions"] for row in rows] == reference.captions
    assert [row["meta"] for row in rows] == reference.meta
    assert [row["row"] for row in rows] == list(range(26)) + list(range(25))
    assert {row["shard"] for row in rows} == set(shards)
    samples = {sample.key: sample for sample in iter_samples(shards)}
    assert all(thumbs[key] == thumbnail_jpeg(samples[key].image) for key in samples)
    summary = EmbeddingDir(tmp_path / "emb").read_summary()
    assert summary["count"] == 51 and summary["counts"] == {"train-000000": 26, "val-000000": 25}

    half = embed_shards(model, shards, tmp_path / "half", dtype="float16", batch_size=7, workers=2,
                        progress=False)
    assert half.images == 51
    halves, half_rows, _ = read_folder(tmp_path / "half")
    assert halves.dtype == np.float16 and half_rows == rows
    np.testing.assert_array_equal(halves, vectors.astype(np.float16))


@pytest.mark.slow
def test_done_shards_are_skipped_damaged_ones_redone_and_another_model_refused(trained_run, tmp_path):
    model = load_checkpoint(trained_run.best_checkpoint)
    shards, out = all_shards(model), tmp_path / "emb"
    embed_shards(model, shards, out, dtype="float32", thumbnails=False, progress=False)
    folder = EmbeddingDir(out)
    before = {name: folder.marker(name).stat().st_mtime_ns for name in ("train-000000", "val-000000")}
    again = embed_shards(model, shards, out, dtype="float32", thumbnails=False, progress=False)
    assert again.encoded == [] and again.already_done == ["train-000000", "val-000000"] and again.images == 0

    np.save(folder.embeddings("val-000000"), np.zeros((3, 50), np.float32))  # outputs that disagree with the marker
    redone = embed_shards(model, shards, out, dtype="float32", thumbnails=False, progress=False)
    assert redone.encoded == ["val-000000"] and redone.images == 25
    assert folder.marker("train-000000").stat().st_mtime_ns == before["train-000000"]
    assert np.load(folder.embeddings("val-000000")).shape == (25, 50)

    with pytest.raises(DataError, match="float32"):
        embed_shards(model, shards, out, dtype="float16", progress=False)
    other = load_checkpoint(trained_run.last_checkpoint)
    assert other.checkpoint_fingerprint != model.checkpoint_fingerprint
    with pytest.raises(DataError, match="another model"):
        embed_shards(other, shards, out, dtype="float32", progress=False)


def test_thumbnail_tars_serve_each_key_by_offset_and_without_their_table(tmp_path):
    images = {f"k{i}": torch.randint(0, 256, (3, 40 + 30 * i, 300 - 20 * i), dtype=torch.uint8) for i in range(5)}
    jpegs = {key: thumbnail_jpeg(image) for key, image in images.items()}
    offsets = write_thumbnail_tar(tmp_path / "thumbs_a.tar", jpegs.items())
    write_thumbnail_tar(tmp_path / "thumbs_b.tar", [("other", b"\xff\xd8not really")])
    assert scan_tar_offsets(tmp_path / "thumbs_a.tar") == offsets
    with tarfile.open(tmp_path / "thumbs_a.tar") as tar:  # an ordinary tar: members <key>.jpg
        assert {member.name: tar.extractfile(member).read() for member in tar} == {
            f"{key}.jpg": data for key, data in jpegs.items()}
    reader = ThumbnailReader(tmp_path)
    assert len(reader) == 6 and reader.get("other") == b"\xff\xd8not really" and reader.get("missing") is None
    assert all(reader.get(key) == data for key, data in jpegs.items())
    (tmp_path / "thumbs_a.json").unlink()
    assert all(ThumbnailReader(tmp_path).get(key) == data for key, data in jpegs.items())
    assert max(max(image.shape[1:]) for image in map(_decoded, jpegs.values())) == 192


@pytest.mark.slow
def test_an_index_built_from_embedding_shards_equals_one_built_from_the_shards(trained_run, tmp_path):
    from retrieval.index import VectorIndex
    from retrieval.indexing import build_index, build_index_from_embeddings
    from retrieval.rundir import IndexDir

    model = load_checkpoint(trained_run.best_checkpoint)
    shards = all_shards(model)
    embed_shards(model, shards, tmp_path / "emb", dtype="float32", batch_size=32, progress=False)
    direct = IndexDir(build_index(model, shards, tmp_path / "direct", kind="flat"))
    staged = IndexDir(build_index_from_embeddings(model, tmp_path / "emb", tmp_path / "staged", kind="flat"))
    assert len(VectorIndex.load(staged.images)) == 51
    for part in ("images", "captions"):
        a, b = VectorIndex.load(getattr(direct, part)), VectorIndex.load(getattr(staged, part))
        assert a.metadata_for(range(len(a))) == b.metadata_for(range(len(b)))
        queries = np.random.default_rng(0).normal(size=(5, a.dim)).astype(np.float32)
        found_a, found_b = a.search(queries, 10), b.search(queries, 10)
        np.testing.assert_array_equal(found_a.ids, found_b.ids)
        np.testing.assert_allclose(found_a.scores, found_b.scores, atol=1e-5)
    assert json.loads(direct.vocabulary_file.read_text()) == json.loads(staged.vocabulary_file.read_text())
    assert {p.name: p.read_bytes() for p in direct.thumbnails.iterdir()} == {
        p.name: p.read_bytes() for p in staged.thumbnails.iterdir()}
    other = load_checkpoint(trained_run.last_checkpoint)
    with pytest.raises(DataError, match="another model"):
        build_index_from_embeddings(other, tmp_path / "emb", tmp_path / "other")


def _decoded(data: bytes) -> torch.Tensor:
    from retrieval.data.images import decode_image_bytes

    return decode_image_bytes(data)


@pytest.mark.slow
def test_two_torchrun_processes_write_what_one_process_writes(trained_run, tmp_path):
    run_embed(trained_run.run_dir, tmp_path / "one", "--dtype", "float32")
    two = run_embed(trained_run.run_dir, tmp_path / "two", "--dtype", "float32", processes=2)
    assert "this process encoded 1 shards" in two.stdout
    one_vectors, one_rows, one_thumbs = read_folder(tmp_path / "one")
    two_vectors, two_rows, two_thumbs = read_folder(tmp_path / "two")
    np.testing.assert_array_equal(two_vectors, one_vectors)
    assert two_rows == one_rows and two_thumbs == one_thumbs and len(one_rows) == 51
    summary = json.loads((tmp_path / "one" / "embeddings.json").read_text())
    assert json.loads((tmp_path / "two" / "embeddings.json").read_text()) == summary


@pytest.mark.slow
def test_a_killed_encode_resumes_without_redoing_finished_shards(trained_run, tmp_path):
    out = tmp_path / "emb"
    killed = run_embed(trained_run.run_dir, out, "--dtype", "float32", kill_after_first_shard=True, expect_ok=False)
    assert killed.returncode != 0
    folder = EmbeddingDir(out)
    assert folder.marker("train-000000").is_file() and not folder.marker("val-000000").exists()
    assert not folder.summary_file.exists()
    first = {path: path.stat().st_mtime_ns for path in (folder.marker("train-000000"),
                                                         folder.embeddings("train-000000"))}
    resumed = run_embed(trained_run.run_dir, out, "--dtype", "float32")
    assert "encoded 1 shards, 25 images; 1 already done" in resumed.stdout
    assert {path: path.stat().st_mtime_ns for path in first} == first
    run_embed(trained_run.run_dir, tmp_path / "whole", "--dtype", "float32")
    resumed_vectors, resumed_rows, resumed_thumbs = read_folder(out)
    whole_vectors, whole_rows, whole_thumbs = read_folder(tmp_path / "whole")
    np.testing.assert_array_equal(resumed_vectors, whole_vectors)
    assert resumed_rows == whole_rows and resumed_thumbs == whole_thumbs
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
