"""The app opens runs only under its runs root, runs no code from a crafted checkpoint, and refuses uploads over
its pixel cap or PIL's decompression-bomb limit in one line naming the file; `retrieval app` checks the same."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from pipelines.app import parse_args, streamlit_command
from pipelines.cli import main as cli_main
from retrieval.checkpoint import load_checkpoint
from retrieval.checkpoint_io import TRUST_PICKLED_CHECKPOINTS
from retrieval.data import list_shards
from retrieval.indexing import build_index
from retrieval.rundir import RunDir, RunsRoot
from tests.test_checkpoint import RunsShellCommand

APP_FILE = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
TIMEOUT = 60
ENV = ("RETRIEVAL_RUN", "RETRIEVAL_INDEX", "RETRIEVAL_CHECKPOINT", "RETRIEVAL_RUNS_ROOT",
       "RETRIEVAL_MAX_UPLOAD_PIXELS", TRUST_PICKLED_CHECKPOINTS)


@pytest.fixture(scope="module")
def layout(trained_run, sample_shards, tmp_path_factory) -> dict[str, Path]:
    """``root/`` with runs ``good`` and ``group/second`` (checkpoints and an index), a run without an index,
    a hidden run and a link to a run outside; ``outside/evil``: a run whose checkpoint runs a shell command
    when unpickled (the marker file tells), next to the root."""
    base = tmp_path_factory.mktemp("apps")
    root, outside, marker = base / "root", base / "outside", base / "MARKER"
    good = RunDir(root / "good")
    shutil.copytree(RunDir(trained_run.run_dir).checkpoints, good.checkpoints)
    build_index(load_checkpoint(good.checkpoint()), list_shards(sample_shards, "val"), good.index.path)
    shutil.copytree(good.path, root / "group" / "second")
    shutil.copytree(good.checkpoints, root / "no-index" / "checkpoints")
    shutil.copytree(good.path, root / ".hidden")
    evil = RunDir(outside / "evil")
    shutil.copytree(good.index.path, evil.index.path)
    evil.checkpoints.mkdir(parents=True)
    state = torch.load(good.checkpoint(), weights_only=True)
    state["metrics"] = {"R@1": RunsShellCommand(marker)}
    torch.save(state, evil.checkpoint("best.pt"))
    (root / "link").symlink_to(evil.path, target_is_directory=True)
    linked = RunDir(base / "root2" / "linked")  # a run under another root whose checkpoint is a link to outside
    shutil.copytree(good.index.path, linked.index.path)
    linked.checkpoints.mkdir()
    linked.checkpoint("best.pt").symlink_to(evil.checkpoint("best.pt"))
    return {"root": root, "good": good.path, "evil": evil.path, "marker": marker, "linked": linked.path}


def start_app(monkeypatch, **env: str) -> AppTest:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = AppTest.from_file(str(APP_FILE), default_timeout=TIMEOUT)
    app.run()
    assert not app.exception
    return app


def assert_nothing_loaded(app: AppTest, marker: Path, *needles: str) -> None:
    """One error line naming what was refused; no model card, no results, and no code ran."""
    assert len(app.error) == 1 and "\n" not in app.error[0].value
    assert all(needle in app.error[0].value for needle in needles), app.error[0].value
    assert not app.sidebar.markdown and not app.image and not app.tabs
    assert not marker.exists()


def test_run_list_holds_only_runs_under_the_root(layout, monkeypatch):
    app = start_app(monkeypatch, RETRIEVAL_RUNS_ROOT=str(layout["root"]), RETRIEVAL_RUN=str(layout["good"]))
    assert app.selectbox(key="run").options == ["good", "group/second"]
    assert app.selectbox(key="run").value == "good" and not app.error
    assert RunsRoot(layout["root"]).runs() == [RunDir(layout["good"]), RunDir(layout["root"] / "group/second")]


def test_another_run_under_the_root_can_be_chosen(layout, monkeypatch):
    app = start_app(monkeypatch, RETRIEVAL_RUNS_ROOT=str(layout["root"]), RETRIEVAL_RUN=str(layout["good"]))
    app.selectbox(key="run").set_value("group/second").run()
    assert not app.exception and not app.error
    assert str(layout["root"] / "group" / "second" / "index") == app.sidebar.selectbox[1].value
    app.text_input(key="query").input("a red bus").run()
    assert len(app.image) == app.slider(key="k").value


@pytest.mark.parametrize("case", ["run outside", "run through ..", "run through a link", "checkpoint outside",
                                  "index outside", "checkpoint linked outside"])
def test_paths_outside_the_root_are_never_opened(layout, monkeypatch, case):
    root, good, evil = layout["root"], layout["good"], layout["evil"]
    env = {"RETRIEVAL_RUNS_ROOT": str(root), "RETRIEVAL_RUN": str(good),
           TRUST_PICKLED_CHECKPOINTS: "1"}  # trusted: opening the crafted checkpoint would run its command
    env.update({
        "run outside": {"RETRIEVAL_RUN": str(evil)},
        "run through ..": {"RETRIEVAL_RUN": str(root / ".." / "outside" / "evil")},
        "run through a link": {"RETRIEVAL_RUN": str(root / "link")},
        "checkpoint outside": {"RETRIEVAL_CHECKPOINT": str(evil / "checkpoints" / "best.pt")},
        "index outside": {"RETRIEVAL_INDEX": str(evil / "index")},
        "checkpoint linked outside": {"RETRIEVAL_RUNS_ROOT": str(layout["linked"].parent),
                                      "RETRIEVAL_RUN": str(layout["linked"])},
    }[case])
    app = start_app(monkeypatch, **env)
    assert_nothing_loaded(app, layout["marker"], "no checkpoint" if "linked" in case else "outside the runs root")


def test_crafted_checkpoint_under_the_root_runs_nothing(layout, monkeypatch):
    app = start_app(monkeypatch, RETRIEVAL_RUN=str(layout["evil"]))  # the default root: the folder holding it
    assert_nothing_loaded(app, layout["marker"], str(layout["evil"] / "checkpoints" / "best.pt"),
                          TRUST_PICKLED_CHECKPOINTS)


def png_upload(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, data, limit, needles", [
    ("bomb.png", lambda: png_upload(20_000, 20_000, "1"), None, ["bomb.png", "40,000,000 pixels"]),
    ("photo.png", lambda: png_upload(200, 200), "10000", ["photo.png", "200×200 = 40,000 pixels", "10,000"]),
    ("notes.png", lambda: b"not an image at all", None, ["notes.png", "cannot read"]),
])
def test_upload_over_the_cap_or_unreadable_is_one_line_naming_it(layout, monkeypatch, name, data, limit, needles):
    env = {"RETRIEVAL_RUN": str(layout["good"])}
    if limit:
        env["RETRIEVAL_MAX_UPLOAD_PIXELS"] = limit
    app = start_app(monkeypatch, **env)
    assert not app.error
    shown = f"{int(limit or 40_000_000):,} pixels"
    assert any(shown in caption.value for caption in app.caption)  # the page says what it decodes
    app.file_uploader(key="upload").set_value((name, data(), "image/png")).run()
    assert not app.exception and len(app.error) == 1
    message = app.error[0].value
    assert "\n" not in message and all(needle in message for needle in needles), message
    assert "BytesIO" not in message and "0x" not in message and not app.image


def test_bad_pixel_cap_setting_is_one_line(layout, monkeypatch):
    app = start_app(monkeypatch, RETRIEVAL_RUN=str(layout["good"]), RETRIEVAL_MAX_UPLOAD_PIXELS="0")
    assert len(app.error) == 1 and "RETRIEVAL_MAX_UPLOAD_PIXELS" in app.error[0].value


# -- the `retrieval app` job ---------------------------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--runs-root", "{root}", "--run", "{evil}"], "outside the runs root"),
    (["--run", "{good}", "--index", "{evil}/index"], "outside the runs root"),
    (["--run", "{good}", "--checkpoint", "../../../outside/evil/checkpoints/best.pt"], "outside the runs root"),
    (["--run", "{good}", "--max-upload-pixels", "0"], "--max-upload-pixels"),
    (["--run", "{good}", "--runs-root", "{root}/nowhere"], "nowhere"),
])
def test_app_job_refuses_paths_outside_the_root_in_one_line(layout, capsys, monkeypatch, extra, needle):
    def serve(command):
        raise AssertionError(f"the server was started: {command}")

    monkeypatch.setattr("pipelines.app.serve", serve)
    argv = [part.format(**{k: str(v) for k, v in layout.items()}) for part in extra]
    assert cli_main(["app", *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert needle in error and "\n" not in error


def test_app_job_passes_the_root_and_pixel_cap_to_streamlit(tmp_path):
    command = streamlit_command(parse_args(["--run", str(tmp_path), "--runs-root", str(tmp_path.parent),
                                            "--max-upload-pixels", "1000000"]))
    assert command[command.index("--") + 1:] == ["--run", str(tmp_path), "--runs-root", str(tmp_path.parent),
                                                  "--max-upload-pixels", "1000000"]
