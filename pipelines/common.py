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
