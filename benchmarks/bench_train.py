"""Training speed as ratios measured in one run: our loop ÷ a bare PyTorch loop, DDP ÷ one process, bf16 ÷ fp32.

    python -m benchmarks.bench_train [--repeats 5] [--skip-ddp]

- **loop overhead, cached features**: ``Trainer.train_epoch`` on the demo's cached EfficientNet-Lite0
  features (linear projection, text-anchored triplet, farthest negatives) against the same epoch
  written as a plain PyTorch loop (embed, the same loss module, backward, AdamW step), over the very
  same batches: the ratio is the cost of the loop itself (batch source, global-batch gather,
  precision and accumulation logic, step log, positions for resume). The losses are compared with
  pytorch-metric-learning's in ``bench_losses``;
- **loop overhead, fine-tuning**: the same comparison end to end (ResNet-18, random weights, 64 px,
  batch 16) over the same in-memory image batches, so only the loops differ;
- **bf16 ÷ fp32**: fine-tuning steps/s of our loop with ``train.precision: bf16`` against fp32;
- **2 ranks ÷ 1 process**: steps/s of ``torchrun --nproc_per_node 2`` (batch B per rank) against one
  process (batch 2B, all threads), fine-tuning ResNet-18 on the same 2 000 Fashion-MNIST scenes (needs
  the Fashion-MNIST files; ``--skip-ddp`` leaves it out): the cost or gain of DDP at the same global
  batch on this machine.

Each side is timed interleaved with its baseline, as the median of ``--repeats`` epochs after a warm-up.
Writes a markdown table to stdout and JSON to ``benchmarks/results/train.json``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from retrieval.config import load_config, save_config
from retrieval.data.prepare import prepare
from retrieval.io import write_json
from retrieval.losses import build_loss
from retrieval.runtime import seed_everything
from retrieval.train import EpochProgress, Position, Trainer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = PROJECT_ROOT / "data" / "coco-mini" / "captions.jsonl"


def demo_config(workdir: Path, *overrides: str):
    return load_config(PROJECT_ROOT / "configs" / "demo.yaml", [
        f"data.path={SAMPLE}", f"data.shard_dir={workdir / 'shards'}", f"train.run_dir={workdir / 'run'}",
        *overrides])


def fixed_batches(trainer: Trainer, count: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` training batches of the trainer's own source, materialised once (cycling its epochs)."""
    batches: list[tuple[torch.Tensor, ...]] = []
    epoch = 1
    while len(batches) < count:
        batches += list(trainer.source.batches(epoch, trainer.targets))
        epoch += 1
    return batches[:count]


def our_epoch(trainer: Trainer, batches: list) -> float:
    """Seconds for ``Trainer.train_epoch`` over ``batches`` (the source is replaced by them)."""
    trainer.source.batches = lambda epoch, targets, start_batch=0: iter(batches)
    trainer.steps_per_epoch = len(batches)
    start = time.perf_counter()
    trainer.train_epoch(1, Position(), EpochProgress())
    return time.perf_counter() - start


def bare_epoch(forward: Callable[[torch.Tensor], torch.Tensor], batches: list, optimizer: torch.optim.Optimizer,
               loss_module: torch.nn.Module) -> float:
    """Seconds for the same epoch as a plain loop: embed, loss, backward, AdamW step."""
    start = time.perf_counter()
    for inputs, targets, labels in batches:
        loss = loss_module(forward(inputs), targets, labels).value
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def interleaved(first: Callable[[], float], second: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Median seconds of each, alternating, after one warm-up of each."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        a.append(first())
        b.append(second())
    return statistics.median(a), statistics.median(b)


def loop_overhead(workdir: Path, repeats: int, overrides: tuple[str, ...], batch_count: int,
                  threads: int) -> dict:
    """Our loop vs the bare loop over the same batches; ratio = our steps/s ÷ bare steps/s."""
    torch.set_num_threads(threads)
    seed_everything(0)
    config = demo_config(workdir, *overrides, f"train.run_dir={workdir / ('run-' + str(len(overrides)))}")
    trainer = Trainer(config, progress=False, overwrite=True)
    torch.set_num_threads(threads)  # the source may pick its own thread count; both sides get the same
    batches = fixed_batches(trainer, batch_count)
    fine_tune = not config.model.freeze_backbone
    encoder = copy.deepcopy(trainer.encoder).train()  # a twin with the same initial weights, trained separately
    forward = encoder if fine_tune else encoder.embed_features
    parameters = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.train.lr, weight_decay=config.train.weight_decay)
    loss_module = build_loss(config.loss, seed=config.train.seed, num_classes=trainer.num_classes,
                             embedding_dim=trainer.caption_encoder.dim)
    ours, bare = interleaved(lambda: our_epoch(trainer, batches),
                             lambda: bare_epoch(forward, batches, optimizer, loss_module), repeats)
    return {"batches": len(batches), "batch_size": config.train.batch_size, "threads": threads,
            "ours_ms_per_step": round(ours / len(batches) * 1e3, 3),
            "bare_ms_per_step": round(bare / len(batches) * 1e3, 3),
            "ratio_ours_over_bare_steps_per_s": round(bare / ours, 3)}


def precision_ratio(workdir: Path, repeats: int, overrides: tuple[str, ...], batch_count: int, threads: int) -> dict:
    """Our fine-tuning loop in bf16 against fp32 over the same batches; ratio = bf16 steps/s ÷ fp32 steps/s."""
    torch.set_num_threads(threads)
    trainers = {}
    for precision in ("fp32", "bf16"):
        seed_everything(0)
        config = demo_config(workdir, *overrides, f"train.precision={precision}",
                             f"train.run_dir={workdir / ('run-' + precision)}")
        trainers[precision] = Trainer(config, progress=False, overwrite=True)
    torch.set_num_threads(threads)
    batches = fixed_batches(trainers["fp32"], batch_count)
    fp32, bf16 = interleaved(lambda: our_epoch(trainers["fp32"], batches),
                             lambda: our_epoch(trainers["bf16"], batches), repeats)
    return {"batches": len(batches), "threads": threads, "fp32_ms_per_step": round(fp32 / len(batches) * 1e3, 2),
            "bf16_ms_per_step": round(bf16 / len(batches) * 1e3, 2), "ratio_bf16_over_fp32_steps_per_s":
                round(fp32 / bf16, 3)}


def epoch_seconds(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as handle:
        return sum(float(row["seconds"]) for row in csv.DictReader(handle))


def ddp_ratio(workdir: Path, batch_size: int, scenes: int = 2000) -> dict:
    """One process (batch 2B, every core) against torchrun with 2 ranks (batch B each, one thread each), both
    fine-tuning ResNet-18 (random weights, 64 px) for one epoch on the same Fashion-MNIST scenes shards."""
    shards = workdir / "scenes"
    common = [f"data.shard_dir={shards}", "data.image_size=64", "model.backbone=resnet18", "model.weights=random",
              "model.freeze_backbone=false", "train.epochs=1", "train.eval_every=1", "train.shuffle_buffer=200"]
    prepare(load_config(PROJECT_ROOT / "configs" / "fashion_mnist_scenes.yaml",
                        [*common, f"data.source_options={{scene_count: {scenes}}}"]))
    seconds: dict[str, list[float]] = {"one": [], "ddp": []}
    steps = {}
    sides = {"one": (1, 2 * batch_size), "ddp": (2, batch_size)}
    for name in ("one", "ddp", "ddp", "one"):  # twice each, in mirrored order: drift in the machine's load cancels
        processes, batch = sides[name]
        run_dir = workdir / f"run-{name}"
        config = load_config(PROJECT_ROOT / "configs" / "fashion_mnist_scenes.yaml", [
            *common, f"data.source_options={{scene_count: {scenes}}}", f"train.batch_size={batch}",
            f"train.run_dir={run_dir}", "train.feature_cache_dir=null"])
        path = workdir / f"{name}.yaml"
        save_config(config, path)
        entry = ["-m", "pipelines.cli", "train", "--config", str(path), "--overwrite"]
        if processes > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={processes}", *entry]
        else:
            command = [sys.executable, *entry]
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        subprocess.run(command, cwd=PROJECT_ROOT, env=env, check=True, capture_output=True)
        seconds[name].append(epoch_seconds(run_dir))
        with open(run_dir / "steps.csv") as handle:
            steps[name] = len(list(csv.DictReader(handle)))
    if steps["one"] != steps["ddp"]:
        raise SystemExit(f"the runs took different step counts: {steps}")
    one, ddp = statistics.mean(seconds["one"]), statistics.mean(seconds["ddp"])
    return {"steps": steps["one"], "global_batch": 2 * batch_size, "cores": os.cpu_count(),
            "one_process_s": [round(value, 2) for value in seconds["one"]],
            "two_ranks_s": [round(value, 2) for value in seconds["ddp"]],
            "ratio_ddp_over_one_steps_per_s": round(one / ddp, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "train.json")
    args = parser.parse_args(argv)
    fine_tune = ("model.backbone=resnet18", "model.weights=random", "model.freeze_backbone=false",
                 "data.image_size=64", "train.batch_size=16")
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        prepare(demo_config(workdir))
        result = {
            "cached_features": loop_overhead(workdir, args.repeats * 4, (), batch_count=64, threads=1),
            "fine_tuning": loop_overhead(workdir, args.repeats, fine_tune, batch_count=8,
                                         threads=torch.get_num_threads()),
            "bf16_vs_fp32": precision_ratio(workdir, args.repeats, fine_tune, batch_count=8,
                                            threads=torch.get_num_threads()),
        }
        if not args.skip_ddp:
            result["ddp_vs_one_process"] = ddp_ratio(workdir, batch_size=16)
    result["machine"] = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                         "device": "cpu"}
    print("| case | baseline | ours | ratio (steps/s) |\n|---|---:|---:|---:|")
    for name in ("cached_features", "fine_tuning"):
        row = result[name]
        print(f"| loop, {name.replace('_', ' ')} | {row['bare_ms_per_step']} ms (bare) | "
              f"{row['ours_ms_per_step']} ms | {row['ratio_ours_over_bare_steps_per_s']} |")
    row = result["bf16_vs_fp32"]
    print(f"| bf16 ÷ fp32 | {row['fp32_ms_per_step']} ms | {row['bf16_ms_per_step']} ms | "
          f"{row['ratio_bf16_over_fp32_steps_per_s']} |")
    if "ddp_vs_one_process" in result:
        row = result["ddp_vs_one_process"]
        print(f"| 2 ranks ÷ 1 process | {statistics.mean(row['one_process_s']):.1f} s | "
              f"{statistics.mean(row['two_ranks_s']):.1f} s | "
              f"{row['ratio_ddp_over_one_steps_per_s']} |")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
