"""``retrieval compare --config configs/compare_demo.yaml``: train every variant × seed, then write a report.

The compare config names a base run config, the variants (``set`` overrides such as
``loss.negatives=far-random`` or ``loss={name: sigmoid-ce}``, or ``kind: conse``), the seeds and the output
folder. Shards are prepared first when the base config's shard folder has none. Writes
``<out>/results.json``, ``<out>/report.md`` and PNG plots; finished runs whose config is unchanged
are reused unless ``--fresh`` is given. ``--report-only RESULTS`` renders the report of an existing
``results.json`` again (into ``--out``, default: the folder holding it) without training anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import torch

from pipelines.common import PROJECT_ROOT
from retrieval.compare import CompareSpec, load_compare_config, run_comparison
from retrieval.compare_results import ComparisonResults
from retrieval.data import read_manifest
from retrieval.data.prepare import locate_data, prepare
from retrieval.errors import DataError
from retrieval.report import label, write_report
from retrieval.runtime import torch_threads

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "compare_demo.yaml"


def ensure_shards(spec: CompareSpec) -> CompareSpec:
    """Prepare the base config's shards when its shard folder has no manifest yet (shards read in place,
    ``data.shards``, are used as they are)."""
    config = spec.base
    if config.data.shards:
        return spec
    try:
        read_manifest(config.data.shard_dir)
        return spec
    except DataError:
        pass
    try:
        config = locate_data(config)  # a relative data path may point into the project (the embedded sample)
    except DataError:
        pass
    print(f"preparing shards from {config.data.source}:{config.data.path} into {config.data.shard_dir}")
    prepare(config)
    return dataclasses.replace(spec, base=config)


def headline(results: ComparisonResults) -> str:
    """One line: the winner and its margin over the runner-up."""
    verdict = results.verdict
    if not verdict:
        return "no variant ran"
    winner, metric = verdict.winner, verdict.metric
    if verdict.runner_up is None:
        return f"{winner.name}: {label(metric)} {winner.mean:.3f}"
    other = verdict.runner_up
    return (f"{winner.name} beats {other.name} by {other.margin:+.3f} {label(metric)} "
            f"({winner.mean:.3f} vs {other.mean:.3f})")


def report_only(results_file: Path, out: Path | None) -> int:
    """Render the report of a finished comparison's ``results.json`` into ``out`` (default: beside it)."""
    try:
        data = json.loads(results_file.read_text())
    except OSError as error:
        raise DataError(f"{results_file}: cannot read the results ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{results_file}: not a results.json ({error})") from None
    results = ComparisonResults.from_json(data, str(results_file))
    out = out or results_file.parent
    out.mkdir(parents=True, exist_ok=True)
    paths = write_report(results, out)
    print(headline(results))
    print(f"report: {paths['report']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="retrieval compare", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="compare config (default: configs/compare_demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a field of the base run config for every variant (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the config's)")
    parser.add_argument("--out", type=Path, help="output folder (default: the config's out)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs even when a finished one matches")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, help="torch CPU threads while comparing (default: torch's); 1 is "
                        "often fastest for projection-only training, much faster on a busy machine")
    parser.add_argument("--report-only", type=Path, metavar="RESULTS",
                        help="render report.md and the plots of this results.json again; trains nothing")
    args = parser.parse_args(argv)
    if args.report_only is not None:
        return report_only(args.report_only, args.out)
    spec = ensure_shards(load_compare_config(args.config, args.overrides, out=args.out, seeds=args.seeds))
    command = shlex.join(["retrieval", "compare", *argv])
    with torch_threads(args.threads or torch.get_num_threads()):
        results = run_comparison(spec, command=command, progress=not args.no_progress, reuse=not args.fresh)
    paths = write_report(results, spec.out)
    print(headline(results))
    for variant in results.variants:
        if not variant.ok:
            print(f"skipped {variant.name}: {variant.note}")
    print(f"report: {paths['report']} (results: {spec.out / 'results.json'})")
    return 0
