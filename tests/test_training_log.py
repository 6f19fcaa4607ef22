"""The training run's logs: steps.csv, metrics.csv, TensorBoard events, and progress output that suits a terminal
or a log file."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retrieval.config import load_config
from retrieval.errors import ConfigError
from retrieval.progress import progress_bar
from retrieval.rundir import RunDir
from retrieval.training_log import EpochStats, TrainingLog, check_tensorboard, read_steps

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """``time`` for retrieval.training_log: perf_counter reads ``now``, which the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def stats(epoch: int, loss: float, metrics: dict | None = None) -> EpochStats:
    return EpochStats(epoch, loss, active_fraction=0.5, mean_pos_distance=0.25, mean_neg_distance=1.5, seconds=2.0,
                      metrics=metrics or {}, embedding_spread=0.75, dimension_variance=0.125)


def loss_of(step: int, session: int = 1) -> float:
    return 1.0 / step + 0.001 * session  # repeating decimals: a rounded write would not read back equal


def log_steps(log: TrainingLog, steps: range, epoch: int = 1, session: int = 1) -> None:
    for step in steps:
        log.log_step(step, epoch, loss_of(step, session), lr=0.01 / step, images=8)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of an event folder, read back by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# -- steps.csv -------------------------------------------------------------------------------
def test_steps_csv_has_a_row_per_step_readable_before_close(tmp_path):
    run = RunDir(tmp_path)
    log = TrainingLog(run, progress=False, tensorboard=False)
    log.start_epoch(1, 3)
    log_steps(log, range(1, 4))
    log.flush()  # as before each checkpoint (and at least once a second while steps are logged)
    rows = read_steps(run.steps_file)
    assert rows == [{"step": s, "epoch": 1, "loss": loss_of(s), "lr": 0.01 / s} for s in (1, 2, 3)]
    assert read_csv(run.steps_file)[0] == ["step", "epoch", "loss", "lr"]
    log.close()
    log.close()  # a second close does nothing


def test_steps_reach_the_file_once_a_second_without_a_flush_per_step(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("retrieval.training_log.time", clock)
    run = RunDir(tmp_path)
    log = TrainingLog(run, progress=False, tensorboard=False)
    log.start_epoch(1, 10)
    log_steps(log, range(1, 4))  # within the same second: still buffered
    assert read_steps(run.steps_file) == []
    clock.now += 1.0
    log_steps(log, range(4, 5))  # a second later: everything so far is on disk, for `tail -f`
    assert [row["step"] for row in read_steps(run.steps_file)] == [1, 2, 3, 4]
    log.close()


def test_resume_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    first = TrainingLog(run, progress=False, tensorboard=False)
    first.start_epoch(1, 10)
    log_steps(first, range(1, 11))
    first.close()
    with open(run.steps_file, "a") as steps:
        steps.write("11,2,0.12")  # killed while writing step 11: a partial last line
    # the checkpoint was at step 6: the second session starts there and logs steps 7-8 again
    second = TrainingLog(run, progress=False, tensorboard=False, resume_step=6)
    assert [row["step"] for row in read_steps(run.steps_file)] == [1, 2, 3, 4, 5, 6]
    second.start_epoch(1, 4)
    log_steps(second, range(7, 9), session=2)
    second.close()
    rows = read_steps(run.steps_file)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [row["loss"] for row in rows] == [loss_of(s) for s in range(1, 7)] + [loss_of(7, 2), loss_of(8, 2)]


def test_a_new_run_starts_an_empty_steps_csv(tmp_path):
    run = RunDir(tmp_path)
    run.steps_file.write_text("step,epoch,loss,lr\n1,1,0.5,0.1\n")
    TrainingLog(run, progress=False, tensorboard=False).close()
    assert read_csv(run.steps_file) == [["step", "epoch", "loss", "lr"]]


# -- metrics.csv -----------------------------------------------------------------------------
def test_end_epoch_rewrites_metrics_csv_with_every_epoch(tmp_path):
    run = RunDir(tmp_path)
    log = TrainingLog(run, progress=False, tensorboard=False)
    history = [stats(1, 0.75)]
    log.end_epoch(history[0], history)
    columns = ["epoch", "loss", "active_fraction", "mean_pos_distance", "mean_neg_distance", "embedding_spread",
               "dimension_variance", "seconds"]
    assert read_csv(run.metrics_file) == [columns, ["1", "0.75", "0.5", "0.25", "1.5", "0.75", "0.125", "2.0"]]
    history.append(stats(2, 0.5, {"text_to_image/R@5": 0.625, "image_to_text/R@1": 0.125}))
    log.end_epoch(history[1], history)
    assert read_csv(run.metrics_file) == [
        [*columns, "image_to_text/R@1", "text_to_image/R@5"],
        ["1", "0.75", "0.5", "0.25", "1.5", "0.75", "0.125", "2.0", "", ""],
        ["2", "0.5", "0.5", "0.25", "1.5", "0.75", "0.125", "2.0", "0.125", "0.625"]]
    log.close()


# -- TensorBoard -----------------------------------------------------------------------------
def test_tensorboard_events_hold_the_logged_scalars(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("retrieval.training_log.time", clock)
    run = RunDir(tmp_path)
    log = TrainingLog(run, progress=False, tensorboard=True)
    log.start_epoch(1, 4)
    for step, seconds in zip(range(1, 5), (1.0, 1.0, 2.0, 4.0)):
        clock.now += seconds
        log.log_step(step, 1, loss_of(step), lr=0.5 ** step, images=8)
    clock.now += 3.0  # held-out evaluation: not training time
    history = [stats(1, 0.75, {"text_to_image/R@5": 0.625, "image_to_text/mAP": 0.25})]
    log.end_epoch(history[0], history)
    log.close()
    found = scalars(run.tensorboard)
    approx = pytest.approx  # event files store float32
    assert found["train/loss"] == [(s, approx(loss_of(s), rel=1e-6)) for s in range(1, 5)]
    assert found["train/lr"] == [(s, approx(0.5 ** s)) for s in range(1, 5)]
    assert found["train/images_per_second"] == [(1, 8.0), (2, 8.0), (3, 4.0), (4, 2.0)]
    assert found["epoch/loss"] == [(4, 0.75)] and found["epoch/active_fraction"] == [(4, 0.5)]
    assert found["epoch/mean_pos_distance"] == [(4, 0.25)] and found["epoch/mean_neg_distance"] == [(4, 1.5)]
    assert found["epoch/images_per_second"] == [(4, 32 / 8)]  # 4 steps × 8 images in 8 s
    assert found["held_out/text_to_image/R@5"] == [(4, 0.625)] and found["held_out/image_to_text/mAP"] == [(4, 0.25)]


def test_tensorboard_after_resume_drops_the_events_past_the_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    first = TrainingLog(run, progress=False, tensorboard=True)
    log_steps(first, range(1, 11))
    first.close()  # steps 7-10 are on disk, as those of a run killed after its checkpoint of step 6 may be
    second = TrainingLog(run, progress=False, tensorboard=True, resume_step=6)
    log_steps(second, range(7, 9), session=2)
    second.close()
    losses = scalars(run.tensorboard)["train/loss"]
    expected = [loss_of(s) for s in range(1, 7)] + [loss_of(7, 2), loss_of(8, 2)]
    assert [step for step, _ in losses] == list(range(1, 9))
    assert [value for _, value in losses] == pytest.approx(expected, rel=1e-6)


def test_tensorboard_is_refused_in_one_line_when_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    asked = load_config(None, ["train.tensorboard=true"])
    with pytest.raises(ConfigError, match=r"train\.tensorboard.*pip install tensorboard") as refused:
        check_tensorboard(asked)
    assert "\n" not in str(refused.value)
    check_tensorboard(load_config(None))  # not asked for: nothing to check
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        TrainingLog(tmp_path, progress=False, tensorboard=True)
    assert not any(tmp_path.iterdir())


def test_train_tensorboard_setting(tmp_path):
    assert load_config(None).train.tensorboard is False
    assert load_config(None, ["train.tensorboard=true"]).train.tensorboard is True
    with pytest.raises(ConfigError, match="train.tensorboard"):
        load_config(None, ["train.tensorboard=sometimes"])


# -- what reaches the screen or the log file ----------------------------------------------------
def run_epochs(log: TrainingLog, clock: FakeClock | None = None, epochs: int = 3, steps: int = 4) -> None:
    history, step = [], 0
    for epoch in range(1, epochs + 1):
        log.start_epoch(epoch, steps)
        for _ in range(steps):
            step += 1
            if clock is not None:
                clock.now += 0.5
            log.log_step(step, epoch, 0.5, 0.01, images=16)
        history.append(stats(epoch, 0.5, {"text_to_image/R@5": 0.625} if epoch == epochs else {}))
        log.end_epoch(history[-1], history)
    log.close()


def test_not_a_terminal_gets_one_line_per_epoch(tmp_path, capsys, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("retrieval.training_log.time", clock)
    run_epochs(TrainingLog(tmp_path, progress=True, tensorboard=False, epochs=3), clock)
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    assert err.splitlines() == [
        "epoch 1/3: loss 0.5000, active 0.500, spread 0.750, 32 img/s, 2.0 s",  # 4 steps × 16 images in 4 × 0.5 s
        "epoch 2/3: loss 0.5000, active 0.500, spread 0.750, 32 img/s, 2.0 s",
        "epoch 3/3: loss 0.5000, active 0.500, spread 0.750, t2i R@5 0.625, 32 img/s, 2.0 s"]


def test_without_progress_nothing_is_printed(tmp_path, capsys):
    run_epochs(TrainingLog(tmp_path, progress=False, tensorboard=False))
    assert capsys.readouterr() == ("", "")
    assert len(read_steps(RunDir(tmp_path).steps_file)) == 12


def test_a_terminal_gets_a_bar_per_epoch_with_images_per_second(tmp_path):
    screen = Terminal()
    run_epochs(TrainingLog(tmp_path, progress=True, tensorboard=False, epochs=3, stream=screen), steps=4)
    text = screen.getvalue()
    assert "\r" in text and "4/4" in text and "img/s" in text
    finished = text.split("\n")[:-1]  # each epoch's bar stays as one finished line
    assert [line.rsplit("\r", 1)[-1].split(":")[0] for line in finished] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "t2i R@5 0.625" in finished[-1]


def test_a_pipe_gets_only_summary_lines():
    script = textwrap.dedent("""
        import sys, tempfile
        from retrieval.progress import progress_bar
        from retrieval.training_log import EpochStats, TrainingLog
        for _ in progress_bar(range(500), desc="encoding val images", unit="img"):
            pass
        for _ in progress_bar(range(500), desc="inner", unit="img", leave=False):
            pass
        log = TrainingLog(tempfile.mkdtemp(), progress=True, tensorboard=False, epochs=2)
        history = []
        for epoch in (1, 2):
            log.start_epoch(epoch, 100)
            for step in range(100):
                log.log_step(100 * (epoch - 1) + step + 1, epoch, 0.5, 0.01, images=4)
            history.append(EpochStats(epoch, 0.5, 0.5, 0.25, 1.5, 1.0))
            log.end_epoch(history[-1], history)
        log.close()
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "\r" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("encoding val images: 500 img in ")
    assert lines[1].startswith("epoch 1/2: loss 0.5000, active 0.500, ")
    assert lines[2].startswith("epoch 2/2: loss 0.5000, active 0.500, ")


# -- progress_bar ----------------------------------------------------------------------------
def test_progress_bar_off_a_terminal_writes_one_summary_line_at_most(capsys):
    assert list(progress_bar(range(1200), desc="encoding val images", unit="img")) == list(range(1200))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err
    assert err.startswith("encoding val images: 1200 img in ") and err.rstrip().endswith("img/s)")

    assert list(progress_bar(range(10), desc="inner", leave=False)) == list(range(10))
    assert list(progress_bar(range(10), desc="off", enabled=False)) == list(range(10))
    with progress_bar(total=5, desc="silent", enabled=False) as bar:
        bar.update(5)
    assert capsys.readouterr() == ("", "")

    with progress_bar(total=3, desc="compare demo", unit="run") as bar:
        for _ in range(3):
            bar.set_postfix_str("variant a")
            bar.update(1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("compare demo: 3 run in ")


def test_progress_bar_cut_short_says_how_far_it_got(capsys):
    for item in progress_bar(range(10), desc="writing shards", unit="img"):
        if item == 3:
            break
    err = capsys.readouterr().err
    assert err.startswith("writing shards: 3/10 img in ") and err.count("\n") == 1


def test_progress_bar_on_a_terminal_is_a_live_bar():
    screen = Terminal()
    assert list(progress_bar(range(50), desc="writing shards", unit="img", stream=screen)) == list(range(50))
    assert "\r" in screen.getvalue() and "50/50" in screen.getvalue()


# -- disabled (the other ranks) and the run folder ------------------------------------------------
def test_a_disabled_log_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "run"
    log = TrainingLog(folder, progress=True, tensorboard=True, resume_step=3, enabled=False)
    run_epochs(log)
    log.flush()
    assert log.images_per_second() is None
    assert not folder.exists() and capsys.readouterr() == ("", "")


def test_run_folder_knows_the_step_log_and_event_folder(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "shards").mkdir()
    log = TrainingLog(run, progress=False, tensorboard=True)
    run_epochs(log, epochs=1)
    assert run.steps_file == tmp_path / "steps.csv" and run.tensorboard == tmp_path / "tensorboard"
    assert {run.steps_file, run.tensorboard, run.metrics_file} <= set(run.run_files())
    assert any(run.tensorboard.iterdir())
    run.clear()
    assert [path.name for path in tmp_path.iterdir()] == ["shards"]


def test_images_per_second_counts_from_the_epoch_start_to_its_last_step(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("retrieval.training_log.time", clock)
    log = TrainingLog(tmp_path, progress=False, tensorboard=False)
    log.start_epoch(1, None)
    assert log.images_per_second() is None
    clock.now += 2.0
    log.log_step(1, 1, 0.5, 0.01, images=32)
    clock.now += 2.0
    log.log_step(2, 1, 0.5, 0.01, images=32)
    clock.now += 10.0  # evaluation after the last step does not count
    assert log.images_per_second() == 16.0
    log.close()
