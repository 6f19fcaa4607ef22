"""The console script: every job end to end on the embedded sample, and one-line errors."""

from __future__ import annotations

import pytest

from pipelines.cli import main
from tests.conftest import SAMPLE_CAPTIONS


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_demo_runs_every_step_and_reports_chance(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "demo", "--set", f"data.path={SAMPLE_CAPTIONS}",
                           "--set", f"data.shard_dir={tmp_path / 'shards'}", "--set", f"train.run_dir={tmp_path}",
                           "--set", "train.epochs=5")
    assert code == 0
    assert "(chance)" in out and "text_to_image" in out and "image_to_text" in out
    assert "text → image: 'a pizza on a table'" in out and "nearest words:" in out
    assert (tmp_path / "index" / "images" / "index.faiss").exists()


@pytest.mark.slow
def test_prepare_train_index_search_as_separate_jobs(capsys, tmp_path):
    common = ["--set", f"data.path={SAMPLE_CAPTIONS}", "--set", f"data.shard_dir={tmp_path / 'shards'}",
              "--set", f"train.run_dir={tmp_path}"]
    assert run_cli(capsys, "prepare", *common)[0] == 0
    code, out, _ = run_cli(capsys, "train", *common, "--set", "train.epochs=3", "--set", "train.eval_every=3")
    assert code == 0 and "held-out retrieval" in out
    assert run_cli(capsys, "index", "--run", str(tmp_path))[0] == 0
    code, out, _ = run_cli(capsys, "search", "--run", str(tmp_path), "--text", "a man on a skateboard", "-k", "2")
    assert code == 0 and out.count("score") == 2


@pytest.mark.parametrize("argv, needle", [
    (["train", "--set", "train.epochs=x"], "train.epochs"),
    (["train", "--set", "loss.name=nope"], "nope"),
    (["train", "--set", "loss.name=quadruplet", "--set", "loss.marign=0.3"],
     "loss 'quadruplet' has no setting 'marign'"),
    (["train", "--set", "loss.margin=-1"], "loss.margin: must be >= 0"),
    (["search", "--run", "no-such-run", "--text", "dog"], "no-such-run"),
    (["prepare", "--set", "data.path=missing.jsonl", "--set", "data.shard_dir=unused"], "missing.jsonl"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_input_is_one_line_error(capsys, argv, needle):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and needle in error_lines[0]
    assert err.rstrip().endswith(error_lines[0].split("\r")[-1])  # the error is the last thing printed
