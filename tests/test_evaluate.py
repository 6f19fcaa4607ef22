"""``retrieval evaluate``: every metric of a checkpoint on held-out shards, as JSON and a table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.cli import main as cli
from retrieval.checkpoint import load_checkpoint
from retrieval.data import list_shards
from retrieval.distances import L2
from retrieval.embed import caption_pairs, encode_shards, eval_transform
from retrieval.evaluation import (
    CheckpointReport,
    RetrievalReport,
    chance_report,
    cross_modal_report,
    evaluate_embeddings,
    format_report,
)
from retrieval.rundir import RunDir

METRICS = [f"{d}/{m}" for d in ("text_to_image", "image_to_text")
           for m in ("R@1", "R@5", "R@10", "P@1", "P@5", "P@10", "mAP", "MedR")]


def recomputed(run_dir, checkpoint: str = "last.pt") -> tuple[dict, dict]:
    """Metrics and chance of a checkpoint on the run's val shards, straight from images."""
    model = load_checkpoint(RunDir(run_dir).checkpoint(checkpoint))
    shards = list_shards(model.config.data.shard_dir, "val")
    transform = eval_transform(model.config.data.image_size, model.encoder.mean, model.encoder.std)
    collection = encode_shards(shards, model.embed_images, transform)
    captions, owner, _ = caption_pairs(collection.captions, model.caption_encoder.encode_batch)
    images = np.arange(len(collection.keys))
    return (cross_modal_report(collection.vectors.numpy(), captions, owner, images, (1, 5, 10),
                               model.loss.distance), chance_report(owner, images, (1, 5, 10)))


@pytest.mark.slow
def test_evaluate_writes_every_metric_and_the_chance_level(trained_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli(["evaluate", "--run", str(trained_run.run_dir), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"checkpoint", "epoch", "shard_dir", "split", "relevance", "distance", "ks", "num_images", "num_captions",
            "metrics", "chance"} <= set(report)
    assert report["distance"] == "l2"  # the demo's triplet loss compares in L2
    assert report["relevance"] == "image" and report["split"] == "val" and report["epoch"] == 40
    assert report["num_images"] == 25 and "zero_shot" not in report  # caption-only data: no zero-shot block
    assert set(METRICS) <= set(report["metrics"])
    metrics, chance = recomputed(trained_run.run_dir)
    assert report["metrics"] == pytest.approx(metrics, abs=1e-6)
    assert report["chance"] == pytest.approx(chance)
    assert CheckpointReport.from_json(report).to_json() == report  # the file reads back as it was written
    printed = capsys.readouterr().out
    assert "text_to_image" in printed and "chance" in printed and str(out) in printed


@pytest.mark.slow
def test_evaluate_matches_what_training_measured(trained_run, capsys):
    """Default: last.pt on the run's val split, written to <run>/report/evaluate.json."""
    assert cli(["evaluate", "--run", str(trained_run.run_dir)]) == 0
    report = json.loads((trained_run.run_dir / "report" / "evaluate.json").read_text())
    stored = torch.load(trained_run.last_checkpoint, weights_only=False)["metrics"]
    assert {k: report["metrics"][k] for k in stored} == pytest.approx(stored, abs=1e-6)


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    assert cli(["evaluate", "--run", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and "last.pt" in err and "\n" not in err and "Traceback" not in err


class OneHotNames:
    """A stand-in caption encoder: each known name is a one-hot vector."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def encode_batch(self, captions):
        vectors = np.zeros((len(captions), len(self.names)), dtype=np.float32)
        known = np.array([c in self.names for c in captions])
        for i, caption in enumerate(captions):
            if caption in self.names:
                vectors[i, self.names.index(caption)] = 1.0
        return vectors, known, None


def test_zero_shot_queries_are_the_held_out_class_names():
    names = ["shirt", "sneaker", "sandal"]
    labels = [0, 0, 1, 1, 2, 2]
    meta = [{"label": label, **({"zero_shot": True} if label == 2 else {})} for label in labels]
    captions = [[names[label]] for label in labels]
    images = np.eye(3, dtype=np.float32)[labels] + 0.01 * np.arange(6, dtype=np.float32)[:, None]
    report = evaluate_embeddings(images, captions, meta, OneHotNames(names).encode_batch, (1, 2), L2)
    assert report.relevance == "class" and report.distance == "l2"
    zero_shot = report.zero_shot
    assert [q.name for q in zero_shot.queries] == ["sandal"] and zero_shot.num_images == 6
    assert zero_shot.metrics["text_to_image/R@1"] == 1.0 and zero_shot.metrics["text_to_image/mAP"] == 1.0
    assert zero_shot.chance["text_to_image/R@1"] == pytest.approx(2 / 6)
    assert "zero-shot" in format_report(report) and "sandal" in format_report(report)
    assert RetrievalReport.from_json(report.to_json()) == report


def test_zero_shot_names_without_known_words_are_reported_not_fatal():
    meta = [{"label": 0}, {"label": 1, "zero_shot": True}]
    report = evaluate_embeddings(np.eye(2, dtype=np.float32), [["shirt"], ["sandal"]], meta,
                                 OneHotNames(["shirt", "other"]).encode_batch, (1,), L2)
    assert report.zero_shot.metrics is None and report.zero_shot.queries[0].known is False
    assert "not evaluated" in format_report(report)
    assert report.to_json()["zero_shot"] == {"queries": [{"label": 1, "name": "sandal", "known": False}],
                                             "num_images": 2, "metrics": None, "chance": None}
