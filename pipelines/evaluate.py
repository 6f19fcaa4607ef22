"""``retrieval evaluate``: every retrieval metric of a checkpoint on a held-out shard split, as JSON and a table.

Text→image and image→text R@K, P@K, mAP and median rank, next to the chance level; relevance by
class where the shards carry class labels, else by image identity. When the split holds zero-shot
images (classes left out of training), text→image retrieval with those class names as queries is
reported as well.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.evaluation import evaluate_run, format_report
from retrieval.io import write_json
from retrieval.rundir import RunDir
from retrieval.runtime import resolve_device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval evaluate", description=__doc__)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    parser.add_argument("--checkpoint", default="last.pt",
                        help="checkpoint name in <run>/checkpoints (default: last.pt)")
    parser.add_argument("--shards", type=Path, help="shard folder to evaluate on (default: the run's data.shard_dir)")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="shard split (default: val)")
    parser.add_argument("--ks", type=int, nargs="+", help="K values for R@K and P@K (default: the run's train.ks)")
    parser.add_argument("--out", type=Path, help="JSON report (default: <run>/report/evaluate.json)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    report = evaluate_run(args.run, checkpoint=args.checkpoint, shards=args.shards, split=args.split,
                          ks=tuple(args.ks) if args.ks else None, device=resolve_device(args.device, "--device"))
    out = args.out or RunDir(args.run).evaluation_report
    write_json(out, report.to_json())
    print(f"{report.checkpoint} (epoch {report.epoch}) on {report.split} of {report.shard_dir}")
    print(format_report(report.report))
    print(f"report written to {out}")
    return 0
