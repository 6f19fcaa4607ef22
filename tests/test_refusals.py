"""Faults injected as a careless or hostile user would: each is refused with one line naming the file or field,
instead of a silently wrong result or a traceback."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.cli import main
from retrieval.data import iter_samples, list_shards, read_shard_records
from retrieval.data.prepare import prepare
from retrieval.data.shards import MANIFEST
from retrieval.errors import ConfigError, DataError
from retrieval.rundir import RunDir
from retrieval.runtime import resolve_device
from retrieval.text import save_word_vectors, train_caption_word2vec
from tests.conftest import SAMPLE_CAPTIONS, demo_config

SAMPLE_IMAGES = SAMPLE_CAPTIONS.parent / "images"


def one_line_error(capsys, *argv: str) -> str:
    """Run the console script; it must exit 2 with exactly one error line, printed last. Returns that line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    error_lines = [line.split("\r")[-1] for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    assert err.rstrip().endswith(error_lines[0])
    assert " object at 0x" not in error_lines[0]  # a file or field is named, never a Python object
    return error_lines[0]


def run_options(run_dir: Path, shard_dir: Path, *overrides: str) -> list[str]:
    sets = [f"data.path={SAMPLE_CAPTIONS}", f"data.shard_dir={shard_dir}", f"train.run_dir={run_dir}", *overrides]
    return [arg for setting in sets for arg in ("--set", setting)]


def truncated_jpeg(source: Path, target: Path) -> Path:
    """A JPEG cut short: PIL's ``verify()`` accepts it, decoding its pixels fails."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with Image.open(target) as image:
        image.verify()  # the fault this guards against: the structural check alone passes
    return target


# -- item 2: silently wrong results --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_vectors_run(sample_shards, tmp_path_factory) -> Path:
    """A one-epoch run whose word vectors were trained on its captions (``word2vec-captions.kv``), indexed."""
    run = tmp_path_factory.mktemp("w2v-run")
    options = run_options(run, sample_shards, "text.vectors=word2vec-captions", "text.word2vec_epochs=5",
                          "train.epochs=1", "train.eval_every=1")
    assert main(["train", *options]) == 0
    assert main(["index", "--run", str(run)]) == 0
    return run


@pytest.mark.slow
def test_replaced_word_vectors_are_refused_by_search_index_and_evaluate(caption_vectors_run, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(caption_vectors_run, run)
    assert main(["search", "--run", str(run), "--text", "a man on a skateboard", "-k", "1"]) == 0
    capsys.readouterr()
    other = train_caption_word2vec(["a red bus on a wet street", "two dogs play in the snow"], vector_size=50)
    save_word_vectors(other, RunDir(run).caption_word2vec)  # same file name, other vectors
    for argv in (["search", "--run", str(run), "--text", "a man on a skateboard"],
                 ["index", "--run", str(run)],
                 ["evaluate", "--run", str(run), "--checkpoint", "best.pt"]):
        line = one_line_error(capsys, *argv)
        assert str(RunDir(run).caption_word2vec) in line and "differ from the ones this model was trained with" in line


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """The sample written in shards of 11 (train: 11 + 11 + 4 samples)."""
    folder = tmp_path_factory.mktemp("small") / "shards"
    prepare(demo_config(folder.parent, f"data.shard_dir={folder}", "data.shard_size=11"))
    return folder


def cut_after_samples(shard: Path, kept: int) -> None:
    """Truncate a shard exactly at a member boundary, after its first ``kept`` samples (image + json each)."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    shard.write_bytes(shard.read_bytes()[: members[2 * kept].offset])


def test_a_shard_cut_at_a_member_boundary_stops_training(small_shards, capsys, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    cut_after_samples(shards / "train-000000.tar", 5)
    line = one_line_error(capsys, "train", *run_options(tmp_path / "run", shards, "train.epochs=1"))
    assert f"{shards / 'train-000000.tar'}: holds 5 of the 11 samples its manifest lists" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_short_shards_are_noticed_by_every_full_reader(small_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    train = list_shards(shards, "train")
    assert len(read_shard_records(train)) == 26 and len(list(iter_samples(train))) == 26
    cut_after_samples(shards / "train-000001.tar", 10)
    for read in (read_shard_records, lambda paths: list(iter_samples(paths))):
        with pytest.raises(DataError, match=r"train-000001\.tar: holds 10 of the 11 samples"):
            read(train)
    # manifests written before per-shard counts existed: all but a split's last shard hold shard_size
    manifest = json.loads((shards / MANIFEST).read_text())
    del manifest["shard_counts"]
    (shards / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-000001\.tar: holds 10 of the 11 samples"):
        read_shard_records(train)
    # the hook for a skip policy: a handler that returns lets the reader go on
    seen = []
    assert len(read_shard_records(train, handler=lambda error: seen.append(str(error)) or True)) == 25
    assert len(seen) == 1 and "train-000001.tar" in seen[0]


def test_a_truncated_jpeg_is_refused_by_prepare(capsys, tmp_path):
    truncated_jpeg(next(SAMPLE_IMAGES.glob("*.jpg")), tmp_path / "cut.jpg")
    shutil.copy(SAMPLE_IMAGES / "000000000790.jpg", tmp_path / "good.jpg")
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"image": "good.jpg", "caption": "a photo"}\n{"image": "cut.jpg", "caption": "a photo"}\n')
    line = one_line_error(capsys, "prepare", "--set", f"data.path={captions}", "--set", "data.split_by=hash",
                          "--set", f"data.shard_dir={tmp_path / 'shards'}")
    assert f"{captions}:2 (cut.jpg): image does not decode (key cut)" in line and "truncated" in line
    assert not (tmp_path / "shards").exists()


def test_a_file_that_is_no_image_is_named_not_its_stream(capsys, tmp_path):
    (tmp_path / "fake.jpg").write_bytes(b"this is text, not a JPEG" * 10)
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"image": "fake.jpg", "caption": "a photo"}\n')
    line = one_line_error(capsys, "prepare", "--set", f"data.path={captions}", "--set", "data.split_by=hash",
                          "--set", f"data.shard_dir={tmp_path / 'shards'}")
    assert f"{captions}:1 (fake.jpg): image does not decode (key fake): not an image" in line


# -- item 3: a run folder is never mixed from two runs --------------------------------------------------------


@pytest.mark.slow
def test_training_into_a_folder_with_a_run_is_refused_unless_overwrite(sample_shards, capsys, tmp_path):
    run = RunDir(tmp_path / "run")
    options = run_options(run.path, sample_shards, "train.epochs=1", "train.eval_every=1")
    assert main(["train", *options]) == 0
    before = {path: path.read_bytes() for path in (run.config_file, run.metrics_file, run.checkpoint())}
    line = one_line_error(capsys, "train", *options, "--set", "train.lr=0.01")
    assert f"train.run_dir {run} already holds a run" in line
    assert "a new train.run_dir" in line and "--overwrite" in line
    assert {path: path.read_bytes() for path in before} == before  # nothing of the old run was touched
    # --overwrite clears the old run's files first (a stale report and index go too), and only those
    (run.report / "evaluate.json").parent.mkdir()
    (run.report / "evaluate.json").write_text("{}")
    (run.index.images).mkdir(parents=True)
    (run.path / "notes.txt").write_text("mine")
    assert main(["train", *options, "--set", "train.lr=0.01", "--overwrite"]) == 0
    assert not run.report.exists() and not run.index.path.exists()
    assert (run.path / "notes.txt").read_text() == "mine"
    assert "lr: 0.01" in run.config_file.read_text() and run.checkpoint_names() == ["best.pt", "last.pt"]


def test_clearing_a_run_folder_removes_the_run_and_keeps_everything_else(tmp_path):
    run = RunDir(tmp_path)
    assert not run.holds_run() and run.run_files() == []
    for file in (run.config_file, run.metrics_file, run.checkpoint("best.pt"), run.caption_word2vec,
                 run.evaluation_report, run.compare_record, run.index.stamp_file, tmp_path / "other" / "images" /
                 "stamp.json", tmp_path / "shards" / "manifest.json", tmp_path / "notes.txt"):
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("x")
    assert run.holds_run()
    run.clear()
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file()) == [
        "notes.txt", "shards/manifest.json"]
    assert not run.holds_run()
    run.checkpoint("last.pt").parent.mkdir()
    run.checkpoint("last.pt").write_text("x")
    assert run.holds_run()  # a started run (a checkpoint, no config) counts too


@pytest.mark.slow
def test_the_demo_runs_twice_into_its_own_folder(capsys, tmp_path):
    options = run_options(tmp_path, tmp_path / "shards", "train.epochs=1", "train.eval_every=1")
    assert main(["demo", *options]) == 0
    (RunDir(tmp_path).report).mkdir()
    assert main(["demo", *options]) == 0
    assert not RunDir(tmp_path).report.exists()  # the second demo replaced the first run
    assert "demo finished" in capsys.readouterr().out


# -- item 5: one line where a traceback was --------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_text_query_is_one_line(capsys, text):
    assert "--text is empty" in one_line_error(capsys, "search", "--run", "no-such-run", "--text", text)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "train.epochs: must be at least 1, got 0"),
    ("train.batch_size=0", "train.batch_size: must be at least 1, got 0"),
    ("train.eval_every=0", "train.eval_every: must be at least 1, got 0"),
    ("train.lr=-1", "train.lr: must be greater than 0.0, got -1.0"),
    ("train.ks=[1, 0]", "train.ks[1]: must be at least 1, got 0"),
    ("model.dropout=1.5", "model.dropout: must be at least 0.0 and less than 1.0, got 1.5"),
    ("data.val_fraction=2", "data.val_fraction: must be at least 0.0 and at most 1.0, got 2.0"),
    ("train.device=tpu", "train.device: unknown device 'tpu'"),
])
def test_values_out_of_range_are_refused_before_training(capsys, tmp_path, override, message):
    line = one_line_error(capsys, "train", "--set", override, "--set", f"train.run_dir={tmp_path}")
    assert message in line
    assert "demo.yaml" in line or override.startswith("train.device")  # the config file is named with the field
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line(capsys, tmp_path):
    line = one_line_error(capsys, "train", "--set", "train.device=cuda", "--set", f"train.run_dir={tmp_path}")
    assert "train.device: 'cuda' asked for, but no CUDA GPU is visible here" in line
    with pytest.raises(ConfigError, match="--device: 'cuda:0' asked for"):
        resolve_device("cuda:0", "--device")


def test_devices_that_exist_resolve():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("port", ["-1", "0", "65536"])
def test_a_port_out_of_range_is_one_line(capsys, port):
    assert f"--port {port}: a port is a number from 1 to 65535" in one_line_error(capsys, "app", "--port", port)


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_caption_that_is_not_utf8_is_one_line(capsys, tmp_path, kind):
    shutil.copy(SAMPLE_IMAGES / "000000000790.jpg", tmp_path / "a.jpg")
    path = tmp_path / f"captions.{kind}"
    if kind == "jsonl":
        path.write_bytes(b'{"image": "a.jpg", "caption": "a dog"}\n{"image": "a.jpg", "caption": "caf\xe9"}\n')
    else:
        path.write_bytes(b"image,caption\na.jpg,a dog\na.jpg,caf\xe9 au lait\n")
    line = one_line_error(capsys, "prepare", "--set", f"data.source={kind}", "--set", f"data.path={path}",
                          "--set", "data.split_by=hash", "--set", f"data.shard_dir={tmp_path / 'shards'}")
    row = 2 if kind == "jsonl" else 3
    assert f"{path}:{row}: not valid UTF-8 text" in line


def test_end_to_end_training_on_a_shard_without_captions_is_one_line(sample_shards, capsys, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    shard = shards / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(member, tar.extractfile(member).read()) for member in tar.getmembers()]
    dropped = members[3][0].name  # the json member (captions) of the second sample
    assert dropped.endswith(".json")
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name != dropped:
                tar.addfile(member, io.BytesIO(data))
    line = one_line_error(capsys, "train", *run_options(
        tmp_path / "run", shards, "model.backbone=resnet18", "model.weights=random", "model.freeze_backbone=false",
        "data.image_size=32", "train.epochs=1", "train.eval_every=1"))
    assert f"{shard}: sample {dropped[:-len('.json')]}: no json member" in line


@pytest.mark.slow
def test_an_image_query_that_does_not_decode_names_the_file(caption_vectors_run, capsys, tmp_path):
    image = truncated_jpeg(next(SAMPLE_IMAGES.glob("*.jpg")), tmp_path / "cut.jpg")
    line = one_line_error(capsys, "search", "--run", str(caption_vectors_run), "--image", str(image))
    assert f"cannot read image {image}: image file is truncated" in line


@pytest.mark.slow
def test_compare_retrains_into_its_own_run_folders(sample_shards, capsys, tmp_path):
    config = {"name": "again", "base": str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
              "data": {"shard_dir": str(sample_shards)}, "train": {"epochs": 1, "eval_every": 1}, "seeds": [0],
              "out": str(tmp_path / "out"), "variants": [{"name": "triplet", "set": ["loss.name=triplet"]}]}
    path = tmp_path / "compare.yaml"
    path.write_text(json.dumps(config))  # YAML reads JSON
    assert main(["compare", "--config", str(path), "--no-progress"]) == 0
    record = RunDir(tmp_path / "out" / "runs" / "triplet" / "seed-0").compare_record
    first = json.loads(record.read_text())["run"]["wall_seconds"]
    assert main(["compare", "--config", str(path), "--no-progress"]) == 0  # a finished run is reused
    assert json.loads(record.read_text())["run"]["wall_seconds"] == first
    assert main(["compare", "--config", str(path), "--no-progress", "--fresh"]) == 0  # retrained in place
    assert json.loads(record.read_text())["run"]["wall_seconds"] != first
