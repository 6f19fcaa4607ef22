"""Checkpoints hold only tensors and plain values, load without unpickling code, and refuse anything else in
one line naming the file; pickled objects load only behind RETRIEVAL_TRUST_PICKLED_CHECKPOINTS=1."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli import main as cli_main
from retrieval.checkpoint import load_checkpoint, save_checkpoint
from retrieval.checkpoint_io import TRUST_PICKLED_CHECKPOINTS, plain_value, read_checkpoint_state
from retrieval.embed import EncodedCollection, _read_cached_features
from retrieval.errors import DataError
from retrieval.rundir import RunDir

PLAIN_TYPES = (str, int, float, bool, type(None))


class RunsShellCommand:
    """Unpickling this object runs ``touch <marker>``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def assert_plain(value, field: str = "checkpoint") -> None:
    """Every value is a tensor, str, int, float, bool, None, or a list / str-keyed dict of those."""
    if isinstance(value, dict):
        assert all(isinstance(key, str) for key in value), field
        for key, item in value.items():
            assert_plain(item, f"{field}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_plain(item, f"{field}[{i}]")
    else:
        assert isinstance(value, (torch.Tensor, *PLAIN_TYPES)), f"{field} is a {type(value).__name__}"


def one_line_error(call, *needles: str) -> str:
    with pytest.raises(DataError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(needle in message for needle in needles), message
    return message


@pytest.fixture
def hostile_run(trained_run, tmp_path):
    """A run folder whose best.pt and last.pt are valid-looking torch zips that run a shell command when
    unpickled, and the marker file that command would create."""
    marker = tmp_path / "MARKER"
    state = torch.load(trained_run.best_checkpoint, weights_only=True)
    state["metrics"] = {"R@1": RunsShellCommand(marker)}
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    for name in ("best.pt", "last.pt"):
        torch.save(state, run.checkpoint(name))
    return run, marker


def test_saved_checkpoint_holds_only_tensors_and_plain_values(trained_run):
    state = torch.load(trained_run.best_checkpoint, weights_only=True)  # would raise on any pickled object
    assert_plain(state)
    assert isinstance(state["config"], dict) and isinstance(state["caption_encoder"], dict)


def test_plain_value_converts_numpy_tuples_and_paths_and_refuses_objects():
    converted = plain_value({"a": np.float32(0.5), "b": (1, np.int64(2)), "c": np.arange(3), "d": Path("x/y")},
                            "metrics")
    assert converted["a"] == 0.5 and type(converted["a"]) is float
    assert converted["b"] == [1, 2] and type(converted["b"][1]) is int
    assert torch.equal(converted["c"], torch.arange(3)) and converted["d"] == "x/y"
    with pytest.raises(TypeError, match=r"metrics\.bad\[0\].*set"):
        plain_value({"bad": [{1, 2}]}, "metrics")
    assert plain_value({1: "x"}, "optimizer") == {1: "x"}  # an optimizer's state is keyed by parameter number
    with pytest.raises(TypeError, match="key"):
        plain_value({(1, 2): "x"}, "metrics")
    with pytest.raises(TypeError, match="key"):
        plain_value({True: "x"}, "metrics")


def test_numpy_values_are_saved_as_plain_values_and_load_back(trained_run, tmp_path):
    model = load_checkpoint(trained_run.best_checkpoint)
    out = tmp_path / "run" / "checkpoints" / "best.pt"
    save_checkpoint(out, config=model.config, encoder=model.encoder, loss=model.loss,
                    caption_encoder=model.caption_encoder,
                    epoch=np.int64(7), metrics={"R@1": np.float64(0.25), "ranks": np.array([1.0, 2.0])})
    state = torch.load(out, weights_only=True)
    assert_plain(state)
    again = load_checkpoint(out)
    assert again.epoch == 7 and again.metrics["R@1"] == 0.25
    assert torch.equal(again.metrics["ranks"], torch.tensor([1.0, 2.0], dtype=torch.float64))
    image = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(again.embed_images(image), model.embed_images(image))


def test_crafted_pickle_checkpoint_runs_nothing_and_says_how_to_opt_in(hostile_run, monkeypatch):
    run, marker = hostile_run
    monkeypatch.delenv(TRUST_PICKLED_CHECKPOINTS, raising=False)
    message = one_line_error(lambda: load_checkpoint(run.checkpoint()), str(run.checkpoint()), "posix.system",
                             f"{TRUST_PICKLED_CHECKPOINTS}=1")
    assert not marker.exists(), message


def test_trusting_pickled_checkpoints_admits_numpy_values_only(hostile_run, monkeypatch):
    run, marker = hostile_run
    monkeypatch.setenv(TRUST_PICKLED_CHECKPOINTS, "1")  # even trusted, a checkpoint is read with weights_only=True
    message = one_line_error(lambda: load_checkpoint(run.checkpoint()), str(run.checkpoint()), "posix.system",
                             "never loaded")
    assert not marker.exists(), message


def test_raw_pickle_of_72_bytes_runs_nothing(tmp_path, monkeypatch):
    marker, file = tmp_path / "MARKER", tmp_path / "best.pt"
    file.write_bytes(pickle.dumps(RunsShellCommand(marker)))
    assert file.stat().st_size < 200
    for trusted in ("", "1"):  # not a torch zip: refused even when pickles are trusted
        monkeypatch.setenv(TRUST_PICKLED_CHECKPOINTS, trusted)
        one_line_error(lambda: load_checkpoint(file), str(file), "not a checkpoint")
        assert not marker.exists()


def test_pickled_objects_load_only_when_trusted(trained_run, tmp_path, monkeypatch):
    state = torch.load(trained_run.best_checkpoint, weights_only=True)
    state["metrics"] = {"R@1": np.float64(0.5)}  # a numpy scalar is pickled as an object, as older code did
    file = tmp_path / "run" / "checkpoints" / "best.pt"
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    monkeypatch.delenv(TRUST_PICKLED_CHECKPOINTS, raising=False)
    one_line_error(lambda: load_checkpoint(file), str(file), "numpy", TRUST_PICKLED_CHECKPOINTS)
    monkeypatch.setenv(TRUST_PICKLED_CHECKPOINTS, "yes")  # only "1" opts in
    one_line_error(lambda: load_checkpoint(file), str(file))
    monkeypatch.setenv(TRUST_PICKLED_CHECKPOINTS, "1")
    assert load_checkpoint(file).metrics == {"R@1": 0.5}


def damaged_files(trained_run, folder: Path) -> dict[str, Path]:
    good = trained_run.best_checkpoint.read_bytes()
    files = {"random": os.urandom(4096), "truncated": good[: len(good) // 2], "empty": b""}
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(data)
    paths["foreign-zip"] = folder / "foreign-zip.pt"
    with zipfile.ZipFile(paths["foreign-zip"], "w") as archive:
        archive.writestr("notes/readme.txt", "not a checkpoint")
    paths["list"] = folder / "list.pt"
    torch.save([1, 2, 3], paths["list"])
    paths["missing-fields"] = folder / "missing-fields.pt"
    torch.save({"config": {}, "epoch": 1}, paths["missing-fields"])
    paths["wrong-field-type"] = folder / "wrong-field-type.pt"
    state = torch.load(trained_run.best_checkpoint, weights_only=True)
    torch.save({**state, "encoder": [1, 2]}, paths["wrong-field-type"])
    return paths


def test_damaged_or_foreign_checkpoints_are_one_line_errors(trained_run, tmp_path):
    for name, file in damaged_files(trained_run, tmp_path).items():
        message = one_line_error(lambda file=file: load_checkpoint(file), str(file))
        assert "Traceback" not in message, name


def test_read_checkpoint_state_rejects_a_foreign_dict(tmp_path):
    file = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, file)
    one_line_error(lambda: read_checkpoint_state(file), str(file), "missing config")


@pytest.mark.parametrize("payload", ["torch-zip", "bare-pickle"])
@pytest.mark.parametrize("job", [["search", "--text", "a dog"], ["evaluate"], ["index"]])
def test_cli_jobs_refuse_a_crafted_checkpoint_in_one_line(hostile_run, capsys, monkeypatch, job, payload):
    run, marker = hostile_run
    if payload == "bare-pickle":
        for name in ("best.pt", "last.pt"):
            run.checkpoint(name).write_bytes(pickle.dumps(RunsShellCommand(marker)))
    monkeypatch.delenv(TRUST_PICKLED_CHECKPOINTS, raising=False)
    code = cli_main([job[0], "--run", str(run.path), *job[1:]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(run.checkpoints) in err and (TRUST_PICKLED_CHECKPOINTS in err) == (payload == "torch-zip")
    assert not marker.exists()


def test_feature_cache_is_read_without_running_code(tmp_path):
    collection = EncodedCollection(torch.rand(3, 4), ["a", "b", "c"], [["x"], ["y"], []], [{"label": 1}, {}, {}])
    cache = tmp_path / "val-0123.pt"
    torch.save({"vectors": collection.vectors, "keys": collection.keys, "captions": collection.captions,
                "meta": collection.meta}, cache)
    read = _read_cached_features(cache)
    assert read is not None and torch.equal(read.vectors, collection.vectors) and read.meta == collection.meta
    marker = tmp_path / "MARKER"
    torch.save({"vectors": RunsShellCommand(marker)}, cache)
    assert _read_cached_features(cache) is None and not marker.exists()  # a cache miss: recomputed
    cache.write_bytes(b"\x00garbage")
    assert _read_cached_features(cache) is None
