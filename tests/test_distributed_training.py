"""Training under torchrun (2 CPU processes, gloo) and exact resume after ``kill -9``.

Each run is a real subprocess: ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m
pipelines.cli train ...`` for DDP, ``python -m pipelines.cli train ...`` for one process. A killed run
is killed by SIGKILL from inside, right after it wrote a step checkpoint mid-epoch (so nothing gets
to clean up), then continued with ``--resume``.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrieval.config import save_config
from tests.conftest import PROJECT_ROOT, demo_config

pytestmark = pytest.mark.slow

# the cached-feature path on a small random backbone: seconds per run, and no BatchNorm in what trains,
# so one process with the global batch and two processes with half of it each compute the same thing
TINY = ("model.backbone=resnet18", "model.weights=random", "data.image_size=32", "train.eval_every=2",
        "loss={name: triplet, margin: 0.4, negatives: far-random}")

KILL_AFTER_STEP_CHECKPOINT = """
import os, signal, sys
from retrieval import train

save = train.Trainer.save_training_state

def save_then_die(self, position, progress, epoch_start, complete=False):
    save(self, position, progress, epoch_start, complete)
    if position.batch > 0 and position.step >= int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-epoch, right after the step checkpoint: no cleanup at all

train.Trainer.save_training_state = save_then_die
from pipelines.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_config(run_dir: Path, shards: Path, *overrides: str) -> Path:
    path = run_dir.parent / f"{run_dir.name}.yaml"
    save_config(demo_config(run_dir, f"data.shard_dir={shards}", *TINY, *overrides), path)
    return path


def run_train(config: Path, *args: str, processes: int = 1, kill_at_step: int | None = None,
              expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``retrieval train --config config args`` in a subprocess (under torchrun when ``processes`` > 1)."""
    entry = ["-m", "pipelines.cli"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    if kill_at_step is not None:
        script = config.parent / "kill_after_step_checkpoint.py"
        script.write_text(KILL_AFTER_STEP_CHECKPOINT)
        entry, env["KILL_AT_STEP"] = [str(script)], str(kill_at_step)
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = launcher + (["-m", "pipelines.cli"] if kill_at_step is None else entry)
    else:
        command = [sys.executable, *entry]
    done = subprocess.run([*command, "train", "--config", str(config), *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def logged_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "steps.csv") as handle:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(handle)}


def trained_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["encoder"]


def test_two_processes_train_like_one_process_with_the_global_batch(sample_shards, tmp_path):
    one = tmp_path / "one"
    run_train(write_config(one, sample_shards, "train.batch_size=16", "train.epochs=3"))
    two = tmp_path / "two"
    run_train(write_config(two, sample_shards, "train.batch_size=8", "train.epochs=3"), processes=2)
    single, ddp = logged_losses(one), logged_losses(two)
    assert len(single) == len(ddp) > 10 and single.keys() == ddp.keys()
    # float sums in a different order (all_gather, gradient all-reduce): equal to float32 rounding
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), step
    for name, weight in trained_weights(one).items():
        assert torch.allclose(trained_weights(two)[name], weight, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_run_resumes_with_the_losses_of_an_uninterrupted_one(sample_shards, tmp_path, processes):
    batch = "train.batch_size=8"  # 130 training pairs: 17 (one process) or 9 (two) steps per epoch
    settings = (batch, "train.epochs=3", "train.checkpoint_every=4")
    whole = tmp_path / "whole"
    run_train(write_config(whole, sample_shards, *settings), processes=processes)
    killed = tmp_path / "killed"
    config = write_config(killed, sample_shards, *settings)
    died = run_train(config, processes=processes, kill_at_step=12, expect_ok=False)
    assert died.returncode != 0
    assert not (killed / "checkpoints" / "last.pt").exists()
    logged_before = logged_losses(killed)
    assert max(logged_before) >= 12 and len(logged_before) < len(logged_losses(whole))

    refused = run_train(config, expect_ok=False, processes=1)  # without --resume the folder is refused
    assert refused.returncode != 0 and "--resume" in refused.stderr and "train.run_dir" in refused.stderr
    both = run_train(config, "--resume", "--overwrite", expect_ok=False)
    assert both.returncode != 0 and "pass one" in both.stderr
    if processes == 1:  # a run is resumed with the process count it trained with
        other = run_train(config, "--resume", processes=2, expect_ok=False)
        assert other.returncode != 0 and "trained with 1 process(es)" in other.stderr

    run_train(config, "--resume", processes=processes)
    expected, resumed = logged_losses(whole), logged_losses(killed)
    assert resumed == expected  # every step, bit for bit: the ones before the kill and the ones after resume
    for name, weight in trained_weights(whole).items():
        assert torch.equal(trained_weights(killed)[name], weight), name
    assert epoch_rows(killed) == epoch_rows(whole)


def epoch_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without its timings."""
    with open(run_dir / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_resume_is_refused_without_a_training_state_or_with_another_config(sample_shards, tmp_path):
    empty = tmp_path / "empty"
    done = run_train(write_config(empty, sample_shards), "--resume", expect_ok=False)
    assert done.returncode != 0 and "holds no training state" in done.stderr
    run = tmp_path / "run"
    run_train(write_config(run, sample_shards, "train.epochs=1"))
    changed = run_train(write_config(run, sample_shards, "train.epochs=1", "train.lr=0.01"), "--resume",
                        expect_ok=False)
    assert changed.returncode != 0 and "train.lr" in changed.stderr and len(changed.stderr.strip().splitlines()) == 1
    finished = run_train(write_config(run, sample_shards, "train.epochs=1"), "--resume", expect_ok=False)
    assert finished.returncode != 0 and "already finished" in finished.stderr



STREAMED = ("model.backbone=resnet18", "model.weights=random", "model.freeze_backbone=false", "data.image_size=32",
            "train.eval_every=2", "loss={name: triplet, margin: 0.4, negatives: far-random}")


def test_streamed_fine_tuning_under_two_processes_has_a_fixed_epoch_and_resumes_exactly(sample_shards, tmp_path):
    """26 training photos, 4 per rank and step: 3 full steps per epoch on both ranks; killed mid-epoch 2, resumed."""
    settings = ("train.batch_size=4", "train.epochs=2", "train.checkpoint_every=2", "train.shuffle_buffer=8")
    whole = tmp_path / "whole"
    save_config(demo_config(whole, f"data.shard_dir={sample_shards}", *STREAMED, *settings),
                whole.parent / "whole.yaml")
    run_train(whole.parent / "whole.yaml", processes=2)
    expected = logged_losses(whole)
    assert sorted(expected) == list(range(1, 7))  # 26 // (2 × 4) = 3 steps per epoch
    killed = tmp_path / "killed"
    save_config(demo_config(killed, f"data.shard_dir={sample_shards}", *STREAMED, *settings),
                killed.parent / "killed.yaml")
    died = run_train(killed.parent / "killed.yaml", processes=2, kill_at_step=4, expect_ok=False)
    assert died.returncode != 0 and max(logged_losses(killed)) >= 4
    run_train(killed.parent / "killed.yaml", "--resume", processes=2)
    assert logged_losses(killed) == expected
    for name, weight in trained_weights(whole).items():
        assert torch.equal(trained_weights(killed)[name], weight), name
