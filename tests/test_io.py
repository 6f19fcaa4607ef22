"""Atomic writes: a killed writer's temporary file or folder is removed by the next write of the same target,
while a live writer's, another target's and recent unowned ones are kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from retrieval.io import STALE_AFTER_SECONDS, atomic_dir, atomic_path, remove_stale_temporaries, write_json

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def killed_writer(target: Path, kind: str) -> list[Path]:
    """Run a writer of ``target`` in another process and kill -9 it halfway; return what it left beside it."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from retrieval.io import atomic_dir, atomic_path
        target = Path({str(target)!r})
        if {kind!r} == "dir":
            with atomic_dir(target) as tmp:
                (tmp / "part-000.tar").write_bytes(b"x" * 100_000)
                os.kill(os.getpid(), signal.SIGKILL)
        else:
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"x" * 100_000)
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    return sorted(path for path in target.parent.iterdir() if path.name.startswith(f".{target.name}."))


def test_folder_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "shards"
    left = killed_writer(target, "dir")
    assert len(left) == 1 and left[0].is_dir() and (left[0] / "part-000.tar").stat().st_size == 100_000
    assert not target.exists()
    with atomic_dir(target) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert not left[0].exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shards"]


def test_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "best.pt"
    left = killed_writer(target, "file")
    assert len(left) == 1 and left[0].is_file()
    write_json(target, {"ok": True})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.pt"]


@pytest.fixture
def live_process():
    """A running process other than this one: a concurrent writer."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_stale_temporaries_of_the_same_target_are_removed(tmp_path, live_process):
    dead = dead_pid()
    entries = {
        "dead writer": tmp_path / f".index.{dead}.k2j4h5g6.tmp",
        "live writer": tmp_path / f".index.{live_process}.a1b2c3d4.tmp",
        "this process": tmp_path / f".index.{os.getpid()}.zz9y8x7w.tmp",
        "other target": tmp_path / f".index.faiss.{dead}.q1w2e3r4.tmp",
        "old unowned": tmp_path / ".index.ab12cd34.tmp",
        "new unowned": tmp_path / ".index.ef56gh78.tmp",
        "not a temporary": tmp_path / ".index.old",
    }
    for path in entries.values():
        path.mkdir()
        (path / "data").write_text("x")
    old = time.time() - STALE_AFTER_SECONDS - 60
    os.utime(entries["old unowned"], (old, old))
    removed = remove_stale_temporaries(tmp_path / "index")
    assert sorted(removed) == sorted([entries["dead writer"], entries["old unowned"]])
    kept = {name for name, path in entries.items() if path.exists()}
    assert kept == {"live writer", "this process", "other target", "new unowned", "not a temporary"}


def test_a_write_names_its_temporary_after_its_process(tmp_path):
    with atomic_path(tmp_path / "metrics.csv") as tmp:
        assert tmp.name.startswith(f".metrics.csv.{os.getpid()}.") and tmp.name.endswith(".tmp")
        tmp.write_text("epoch\n")
    with atomic_dir(tmp_path / "index") as tmp:
        assert tmp.name.startswith(f".index.{os.getpid()}.")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index", "metrics.csv"]


@pytest.mark.slow
def test_prepare_and_index_remove_what_killed_runs_left(trained_run, sample_shards, tmp_path):
    from retrieval.checkpoint import load_checkpoint
    from retrieval.data import list_shards
    from retrieval.data.prepare import prepare
    from retrieval.indexing import build_index
    from tests.conftest import demo_config

    dead = dead_pid()
    left_by_prepare = tmp_path / f".shards.{dead}.a1b2c3d4.tmp"
    left_by_index = tmp_path / f".index.{dead}.e5f6g7h8.tmp"
    for path in (left_by_prepare, left_by_index):
        path.mkdir()
        (path / "part.bin").write_bytes(b"x" * 1000)
    prepare(demo_config(tmp_path))
    model = load_checkpoint(trained_run.best_checkpoint)
    build_index(model, list_shards(sample_shards, "val"), tmp_path / "index")
    assert not left_by_prepare.exists() and not left_by_index.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index", "shards"]
