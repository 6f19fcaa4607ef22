"""Scale rehearsal of training: 20 000 scenes → shards → fine-tuning under torchrun → killed → resumed.

Writes Fashion-MNIST scenes (2×2 grids of clothing items, captioned with their names) to webdataset
shards, fine-tunes a small torchvision backbone end to end on them under
``torchrun --nproc_per_node 2`` (DistributedDataParallel, gloo on the CPU), kills the whole job with
SIGKILL after a step checkpoint, as a scheduler or a crash would, and continues it with
``retrieval train --resume`` to the end. Prints and saves what each stage took.

    python -m benchmarks.rehearse_training            # ~20 000 scenes, 2 processes
    python -m benchmarks.rehearse_training --scenes 2000 --epochs 1   # a quick look

Needs the Fashion-MNIST files (Debian's ``dataset-fashion-mnist``, or ``FASHION_MNIST_DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from retrieval.config import load_config, save_config
from retrieval.data import list_shards
from retrieval.io import write_json

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def training_config(workdir: Path, args: argparse.Namespace) -> Path:
    """The rehearsal's config: scenes shards, a random-weight ResNet-18 fine-tuned end to end."""
    config = load_config(PROJECT_ROOT / "configs" / "fashion_mnist_scenes.yaml", [
        f"data.shard_dir={workdir / 'shards'}", "data.shard_size=1000",
        f"data.source_options={{scene_count: {args.scenes}}}", "data.image_size=64",
        f"model.backbone={args.backbone}", "model.weights=random", "model.freeze_backbone=false",
        f"train.run_dir={workdir / 'run'}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
        f"train.eval_every={args.epochs}", f"train.checkpoint_every={args.checkpoint_every}",
        "train.feature_cache_dir=null", "train.shuffle_buffer=500",
    ])
    path = workdir / "rehearsal.yaml"
    save_config(config, path)
    return path


def logged_steps(run_dir: Path) -> int:
    """The last optimizer step in the run's steps.csv (0 before the first)."""
    try:
        with open(run_dir / "steps.csv") as handle:
            return max((int(row["step"]) for row in csv.DictReader(handle)), default=0)
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def torchrun(config: Path, processes: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "pipelines.cli", "train", "--config", str(config), *extra]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        children = Path(f"/proc/{parent}/task/{parent}/children")
        kids = [int(child) for child in children.read_text().split()] if children.exists() else []
        found += kids
        queue += kids
    return found


def run_until_killed(command: list[str], run_dir: Path, kill_at_step: int, log: Path) -> float:
    """Start the job and SIGKILL it with every process under it once ``kill_at_step`` steps are logged, as a
    scheduler or a power cut would; returns the seconds it ran."""
    started = time.perf_counter()
    with open(log, "w") as output:
        job = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT,
                               start_new_session=True)
        while job.poll() is None and logged_steps(run_dir) < kill_at_step:
            time.sleep(1.0)
        victims = [*descendants(job.pid), job.pid] if job.poll() is None else []
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in victims) and time.monotonic() < deadline:
            time.sleep(0.1)
    if logged_steps(run_dir) < kill_at_step:
        raise SystemExit(f"the training job ended before step {kill_at_step}; see {log}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=20000, help="scenes written (80%% train)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--processes", type=int, default=2, help="torchrun --nproc_per_node")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between training states")
    parser.add_argument("--kill-at-step", type=int, default=None, help="default: 60%% of the run's steps")
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / "runs" / "rehearsal-training")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "rehearsal_training.json")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    config = training_config(args.workdir, args)
    run_dir = args.workdir / "run"
    env_note = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "torchrun's default (1)")}

    started = time.perf_counter()
    shards_reused = (args.workdir / "shards").is_dir()
    if not shards_reused:
        subprocess.run([sys.executable, "-m", "pipelines.cli", "prepare", "--config", str(config)], cwd=PROJECT_ROOT,
                       check=True)
    prepare_seconds = time.perf_counter() - started
    train_images = args.scenes - args.scenes // 5
    steps_per_epoch = train_images // (args.processes * args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    kill_at = args.kill_at_step or int(total_steps * 0.6)

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: the kill is timed by its own steps.csv
    killed_seconds = run_until_killed(torchrun(config, args.processes), run_dir, kill_at,
                                      args.workdir / "killed.log")
    steps_before_kill = logged_steps(run_dir)
    started = time.perf_counter()
    resumed = subprocess.run(torchrun(config, args.processes, "--resume"), cwd=PROJECT_ROOT, capture_output=True,
                             text=True)
    resume_seconds = time.perf_counter() - started
    (args.workdir / "resumed.log").write_text(resumed.stdout + resumed.stderr)
    if resumed.returncode != 0:
        raise SystemExit(f"the resumed job failed; see {args.workdir / 'resumed.log'}")
    with open(run_dir / "steps.csv") as handle:
        steps = list(csv.DictReader(handle))
    with open(run_dir / "metrics.csv") as handle:
        epochs = list(csv.DictReader(handle))
    result = {
        "scenes": args.scenes, "train_shards": len(list_shards(args.workdir / "shards", "train")),
        "processes": args.processes, "batch_size_per_process": args.batch_size, "backbone": args.backbone,
        "image_size": 64, "steps": len(steps), "expected_steps": total_steps,
        "shards_reused": shards_reused, "prepare_seconds": None if shards_reused else round(prepare_seconds, 1),
        "killed_after_seconds": round(killed_seconds, 1),
        "steps_logged_before_kill": steps_before_kill, "resume_seconds": round(resume_seconds, 1),
        "train_images_per_second": round(args.processes * args.batch_size * len(steps)
                                         / (killed_seconds + resume_seconds), 1),
        "first_loss": float(steps[0]["loss"]), "last_loss": float(steps[-1]["loss"]),
        "final_metrics": {k: v for k, v in epochs[-1].items() if "R@" in k}, "threads": env_note,
    }
    write_json(args.out, result)
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
