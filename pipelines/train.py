"""``retrieval train``: train an image encoder against frozen caption vectors; writes a run directory.

Under ``torchrun --nproc_per_node N -m pipelines.cli train ...`` the same job trains with
DistributedDataParallel over N processes; rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse

from pipelines.common import add_config_args, config_from_args
from retrieval.console import format_metrics_table
from retrieval.distributed import leave_process_group
from retrieval.train import TrainResult, fit


def summarize(result: TrainResult, ks=(1, 5, 10)) -> str:
    """Untrained vs trained held-out R@K, and where the run was written."""
    return "\n".join([
        "held-out retrieval before training:",
        format_metrics_table(result.initial_metrics, ks=ks),
        "held-out retrieval of the best checkpoint:",
        format_metrics_table(result.best_metrics, ks=ks),
        f"run directory: {result.run_dir} ({result.seconds:.1f} s)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrieval train", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in train.run_dir (its config, metrics, checkpoints, "
                             "vectors, reports and indexes); without it such a folder is refused")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in train.run_dir from its last training state (same config; under "
                             "torchrun, the same number of processes)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        result = fit(config, overwrite=args.overwrite, resume=args.resume)
    finally:
        leave_process_group()
    if result.initial_metrics:  # rank 0 (the only one that evaluates) reports
        print(summarize(result, config.train.ks))
    return 0
