"""Shared fixtures: the embedded COCO sample prepared into shards and one short trained run.

No test downloads: torch hub's cache is an empty folder for the whole session, and its download
function fails the test that calls it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retrieval.config import load_config
from retrieval.train import fit

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CAPTIONS = PROJECT_ROOT / "data" / "coco-mini" / "captions.jsonl"


def demo_config(run_dir: Path, *overrides: str):
    """The demo config pointed at a temporary run directory."""
    return load_config(PROJECT_ROOT / "configs" / "demo.yaml", [
        f"data.path={SAMPLE_CAPTIONS}", f"data.shard_dir={run_dir / 'shards'}", f"train.run_dir={run_dir}",
        *overrides,
    ])


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """Shards of the embedded sample (COCO's train/val split), written once per session."""
    from retrieval.data.prepare import prepare

    run_dir = tmp_path_factory.mktemp("sample")
    prepare(demo_config(run_dir))
    return run_dir / "shards"


@pytest.fixture(scope="session")
def trained_run(sample_shards, tmp_path_factory):
    """A short demo training run (frozen EfficientNet-Lite0 features, triplet loss)."""
    run_dir = tmp_path_factory.mktemp("run")
    config = demo_config(run_dir, f"data.shard_dir={sample_shards}", "train.epochs=40", "train.eval_every=10")
    return fit(config, progress=False)


@pytest.fixture(scope="session", autouse=True)
def no_weight_downloads(tmp_path_factory):
    """An empty TORCH_HOME (also for subprocesses), and torch hub's download fails the test that calls it."""
    def refuse(url, *args, **kwargs):
        pytest.fail(f"a test tried to download {url}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
        patch.setattr(torch.hub, "download_url_to_file", refuse)
        yield


@pytest.fixture(scope="session")
def searcher(trained_run, sample_shards, tmp_path_factory):
    """The trained run's best checkpoint over an index of the held-out photos (the search API's tests)."""
    from retrieval.checkpoint import load_checkpoint
    from retrieval.data import list_shards
    from retrieval.indexing import build_index
    from retrieval.search import Searcher

    model = load_checkpoint(trained_run.best_checkpoint)
    index = build_index(model, list_shards(sample_shards, "val"), tmp_path_factory.mktemp("served") / "index")
    return Searcher.open(trained_run.best_checkpoint, index)
