"""The Streamlit app's logic under streamlit.testing (no browser), its settings and the `retrieval app` job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app.settings import AppSettings, default_checkpoint, find_checkpoints, load_settings
from pipelines.app import streamlit_command
from pipelines.cli import main as cli_main
from retrieval.checkpoint import file_fingerprint, load_checkpoint
from retrieval.data import list_shards
from retrieval.indexing import build_index
from retrieval.rundir import IndexDir, RunDir

APP_FILE = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
TIMEOUT = 60  # the first run loads the checkpoint and 400k word vectors


@pytest.fixture(scope="module")
def app_index(trained_run, sample_shards, tmp_path_factory) -> Path:
    """An index of the held-out photos built with the trained run's best checkpoint."""
    model = load_checkpoint(trained_run.best_checkpoint)
    return build_index(model, list_shards(sample_shards, "val"), tmp_path_factory.mktemp("app") / "index")


@pytest.fixture
def app(trained_run, app_index, monkeypatch) -> AppTest:
    """The app, pointed at the test run and index through its environment variables, after one run."""
    monkeypatch.setenv("RETRIEVAL_RUN", str(trained_run.run_dir))
    monkeypatch.setenv("RETRIEVAL_INDEX", str(app_index))
    monkeypatch.setenv("RETRIEVAL_CHECKPOINT", str(trained_run.best_checkpoint))
    test = AppTest.from_file(str(APP_FILE), default_timeout=TIMEOUT)
    test.run()
    assert not test.exception and not test.error
    return test


def query(app: AppTest, text: str) -> AppTest:
    app.text_input(key="query").input(text).run()
    assert not app.exception
    return app


def test_text_query_shows_images_with_captions_and_scores(app):
    query(app, "a red bus on the street")
    k = app.slider(key="k").value
    assert k == 10 and len(app.image) == k
    assert all(image.value and image.value[0] for image in app.image)  # each has a served URL
    scores = [float(m.value.split("`")[1]) for m in app.markdown if m.value.startswith("**") and "score" in m.value]
    assert len(scores) == k and scores == sorted(scores, reverse=True)
    assert any("a red bus on the street" in caption.value for caption in app.caption)
    assert not app.error


def test_word_arithmetic_query_is_answered(app):
    query(app, "bus - red + yellow")
    assert len(app.image) == app.slider(key="k").value and not app.error


def test_query_without_known_words_shows_one_line_error(app):
    query(app, "qzxv blorpt")
    assert len(app.error) == 1
    message = app.error[0].value
    assert "qzxv" in message and "blorpt" in message and "\n" not in message
    assert len(app.image) == 0


def test_k_slider_changes_result_count(app):
    query(app, "a pizza on a table")
    for k in (3, 7):
        app.slider(key="k").set_value(k).run()
        assert len(app.image) == k


def test_example_button_fills_the_query(app):
    app.button(key="example-a man riding a skateboard").click().run()
    assert app.text_input(key="query").value == "a man riding a skateboard"
    assert len(app.image) == app.slider(key="k").value


def test_upload_shows_captions_words_and_similar_photos(app, app_index):
    photo = next(IndexDir(app_index).thumbnails.iterdir())
    app.slider(key="k").set_value(4).run()
    app.file_uploader(key="upload").set_value((photo.name, photo.read_bytes(), "image/jpeg")).run()
    assert not app.exception and not app.error
    texts = [m.value for m in app.markdown]
    captions = texts[texts.index("**Nearest captions**") + 1]
    assert len(captions.splitlines()) == 4 and captions.startswith("1. ")
    words = texts[texts.index("**Nearest words**") + 1]
    assert words.count("**") == 2 * 4
    assert len(app.image) == 1 + 4  # the upload and its similar photos
    app.text_input(key="shift").input("+ snow - grass").run()
    assert len(app.image) == 1 + 4 + 4 and "The photo + snow - grass" in [s.value for s in app.subheader]
    app.text_input(key="shift").input("+ qzxv").run()
    assert len(app.error) == 1 and "qzxv" in app.error[0].value


def test_sidebar_describes_model_and_index(app):
    card = "\n".join(m.value for m in app.sidebar.markdown)
    assert "efficientnet-lite0" in card and "glove-6b-50d" in card and "triplet" in card
    assert "25 images" in card


def test_missing_run_shows_error_instead_of_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_RUN", str(tmp_path / "nowhere"))
    monkeypatch.delenv("RETRIEVAL_INDEX", raising=False)
    test = AppTest.from_file(str(APP_FILE), default_timeout=TIMEOUT)
    test.run()
    assert not test.exception
    assert len(test.error) == 1 and "retrieval demo" in test.error[0].value


# -- settings ------------------------------------------------------------------------------------

def test_settings_command_line_beats_environment_beats_defaults():
    environ = {"RETRIEVAL_RUN": "runs/a", "RETRIEVAL_CHECKPOINT": "last.pt"}
    assert load_settings([], {}).run.as_posix().endswith("runs/demo")
    assert load_settings([], environ) == AppSettings(Path("runs/a"), None, "last.pt")
    assert load_settings(["--run", "runs/b", "--index", "ix"], environ) == AppSettings(Path("runs/b"), Path("ix"),
                                                                                      "last.pt")


def test_default_checkpoint_is_the_one_that_built_the_index(trained_run, tmp_path):
    run, index = RunDir(tmp_path / "run"), IndexDir(tmp_path / "index")
    shutil.copytree(RunDir(trained_run.run_dir).checkpoints, run.checkpoints)
    assert find_checkpoints(run.path)[:2] == ["best.pt", "last.pt"]
    index.stamp_file.parent.mkdir(parents=True)
    index.stamp_file.write_text(json.dumps({"stamp": {"model": file_fingerprint(run.checkpoint("last.pt"))}}))
    names = find_checkpoints(run.path)
    if file_fingerprint(run.checkpoint("best.pt")) != file_fingerprint(run.checkpoint("last.pt")):
        assert default_checkpoint(run.path, index.path, names) == "last.pt"
    index.stamp_file.write_text("{}")  # unreadable stamp: fall back to best.pt
    assert default_checkpoint(run.path, index.path, names) == "best.pt"


# -- the `retrieval app` job ---------------------------------------------------------------------

def test_app_job_refuses_a_missing_run_in_one_line(tmp_path, capsys):
    assert cli_main(["app", "--run", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err.strip()
    assert "retrieval demo" in error and "\n" not in error


def test_app_job_passes_run_index_and_checkpoint_to_streamlit(tmp_path):
    from pipelines.app import parse_args

    args = parse_args(["--run", str(tmp_path), "--index", str(tmp_path / "ix"), "--checkpoint", "last.pt",
                       "--port", "8600"])
    command = streamlit_command(args)
    assert command[1:4] == ["-m", "streamlit", "run"] and Path(command[4]) == APP_FILE
    assert command[command.index("--server.port") + 1] == "8600"
    assert command[command.index("--server.headless") + 1] == "true"
    assert command[command.index("--") + 1:] == ["--run", str(tmp_path), "--index", str(tmp_path / "ix"),
                                                  "--checkpoint", "last.pt"]


def test_model_card_states_the_loss_with_every_setting_in_effect(trained_run, app_index):
    from app.views import model_card
    from retrieval.search import Searcher

    card = model_card(Searcher.open(trained_run.best_checkpoint, app_index), "best.pt")
    assert "- **loss**: triplet (margin=0.4, squared=False, negatives=hard)\n" in card  # demo.yaml's loss
    assert ", l2, 25 images" in card  # the index compares by the loss's distance
