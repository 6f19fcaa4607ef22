"""Argument helpers shared by the jobs: ``--config FILE`` and repeatable ``--set a.b=v``."""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.config import Config, load_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"


def add_config_args(parser: argparse.ArgumentParser, default: Path | None = DEMO_CONFIG) -> None:
    parser.add_argument("--config", type=Path, default=default,
                        help=f"YAML config (default: {default.relative_to(PROJECT_ROOT) if default else 'none'})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set train.epochs=3 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def checkpoint_path(run_dir: Path, name: str = "best.pt") -> Path:
    """A checkpoint of a run directory (``best.pt`` by default)."""
    return Path(run_dir) / "checkpoints" / name


def format_metrics_table(metrics: dict, chance: dict | None = None, ks=(1, 5, 10)) -> str:
    """A small text table: rows = directions, columns = R@K (with chance level when given)."""
    lines = [f"{'direction':<16}" + "".join(f"{'R@' + str(k):>10}" for k in ks)]
    for direction in ("text_to_image", "image_to_text"):
        lines.append(f"{direction:<16}" + "".join(f"{metrics.get(f'{direction}/R@{k}', float('nan')):>10.3f}"
                                                  for k in ks))
        if chance:
            lines.append(f"{'  (chance)':<16}" + "".join(f"{chance.get(f'{direction}/R@{k}', float('nan')):>10.3f}"
                                                         for k in ks))
    return "\n".join(lines)
