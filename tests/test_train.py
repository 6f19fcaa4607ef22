"""Training: a short run on real held-out photos must beat the untrained encoder; runs are reproducible."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from retrieval.batches import CachedFeatureBatches, StreamedImageBatches
from retrieval.checkpoint import load_checkpoint
from retrieval.config import load_config
from retrieval.errors import DataError
from retrieval.losses import LossOutput
from retrieval.models import create_backbone
from retrieval.runtime import seed_everything
from retrieval.train import EpochProgress, Trainer, fit, rsum
from tests.conftest import demo_config


def test_training_beats_untrained_on_held_out_images(trained_run):
    before, after = trained_run.initial_metrics, trained_run.best_metrics
    assert rsum(after) > rsum(before) + 0.3
    assert after["text_to_image/R@5"] > before["text_to_image/R@5"]
    assert after["image_to_text/R@5"] > before["image_to_text/R@5"]


def test_run_directory_holds_config_metrics_and_checkpoints(trained_run):
    run = trained_run.run_dir
    assert load_config(run / "config.yaml").train.epochs == 40
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 41))
    # the active-triplet fraction is logged every epoch, so a collapse would be visible
    assert all(0.0 <= float(r["active_fraction"]) <= 1.0 for r in rows)
    assert rows[9]["text_to_image/R@5"] != "" and rows[8]["text_to_image/R@5"] == ""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_checkpoint_reloads_to_the_same_embeddings(trained_run):
    model = load_checkpoint(trained_run.best_checkpoint)
    features = torch.randn(3, model.encoder.feature_dim)
    again = load_checkpoint(trained_run.best_checkpoint)
    assert torch.equal(model.embed_features(features), again.embed_features(features))
    assert model.metrics == trained_run.best_metrics


@pytest.mark.slow
def test_same_seed_same_run(sample_shards, tmp_path):
    runs = [fit(demo_config(tmp_path / name, f"data.shard_dir={sample_shards}", "train.epochs=6",
                            "train.eval_every=3"), progress=False)
            for name in ("a", "b")]
    assert [s.loss for s in runs[0].history] == [s.loss for s in runs[1].history]
    assert runs[0].final_metrics == runs[1].final_metrics


@pytest.mark.slow
@pytest.mark.parametrize("negatives", ["far-random", "random", "far-hardest", "far-semihard"])
def test_other_negative_strategies_train(sample_shards, tmp_path, negatives):
    result = fit(demo_config(tmp_path, f"data.shard_dir={sample_shards}", "train.epochs=3", "train.eval_every=3",
                             f"loss.negatives={negatives}"), progress=False)
    assert len(result.history) == 3 and all(s.loss == s.loss for s in result.history)


@pytest.mark.slow
def test_a_last_batch_of_one_image_trains(sample_shards, tmp_path):
    # 130 training captions in batches of 129: the last batch holds one caption, so no negative
    result = fit(demo_config(tmp_path, f"data.shard_dir={sample_shards}", "train.epochs=2", "train.eval_every=2",
                             "train.batch_size=129"), progress=False)
    assert len(result.history) == 2
    assert all(np.isfinite([s.loss, s.mean_pos_distance, s.mean_neg_distance]).all() for s in result.history)


def test_epoch_averages_leave_out_undefined_distances_but_not_a_nan_loss():
    nan = float("nan")
    progress = EpochProgress()
    progress.add(LossOutput(torch.tensor(0.5), 0.5, 1.0, 2.0))
    progress.add(LossOutput(torch.tensor(0.0), 0.0, nan, nan))  # a batch where no row had a negative
    stats = progress.stats(1)
    assert (stats.loss, stats.active_fraction) == (0.25, 0.25)
    assert (stats.mean_pos_distance, stats.mean_neg_distance) == (1.0, 2.0)
    saved = EpochProgress(sums=[0.5, 0.5, 1.0, 2.0], batches=1)  # a training state saved before counts were kept
    saved.add(LossOutput(torch.tensor(0.25), 0.5, nan, 4.0))
    stats = saved.stats(1)
    assert (stats.loss, stats.mean_pos_distance, stats.mean_neg_distance) == (0.375, 1.0, 3.0)
    progress.add(LossOutput(torch.tensor(nan), 1.0, 1.0, 1.0))
    assert np.isnan(progress.stats(1).loss)  # a diverged loss stays visible


def test_missing_shards_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError) as error:
        fit(demo_config(tmp_path, f"data.shard_dir={tmp_path / 'nowhere'}"), progress=False)
    assert "nowhere" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_end_to_end_fine_tuning_streams_from_shards_with_workers(sample_shards, tmp_path):
    """Unfrozen backbone: images stream through the webdataset pipeline (2 workers), all weights move."""
    config = demo_config(tmp_path, f"data.shard_dir={sample_shards}", "model.backbone=resnet18",
                         "model.weights=random", "model.freeze_backbone=false", "data.image_size=64",
                         "data.num_workers=2", "train.batch_size=16", "train.epochs=2", "train.eval_every=2")
    result = fit(config, progress=False)
    assert len(result.history) == 2 and all(np.isfinite(s.loss) for s in result.history)
    trained = torch.load(result.last_checkpoint, weights_only=False)["encoder"]["backbone.conv1.weight"]
    seed_everything(0)  # fit() seeds the same way before building the backbone: this is its initial state
    initial = create_backbone("resnet18", "random").module.conv1.weight
    assert not torch.allclose(trained, initial)


@pytest.mark.slow
def test_cached_feature_batches_pair_every_known_caption_with_its_image_once_per_epoch(sample_shards, tmp_path):
    trainer = Trainer(demo_config(tmp_path, f"data.shard_dir={sample_shards}", "train.batch_size=7"), progress=False)
    source, targets = trainer.source, trainer.targets
    assert isinstance(source, CachedFeatureBatches) and torch.equal(targets.labels, torch.arange(26))
    seen = []
    for features, vectors, labels in source.batches(1, targets):
        assert len(labels) <= 7
        assert torch.equal(features, source.train_set.vectors[labels])  # caption-only data: label = image index
        seen += [(int(label), tuple(vector.tolist())) for label, vector in zip(labels, vectors)]
    assert sorted(seen) == sorted((int(o), tuple(v.tolist())) for o, v in zip(targets.owner, targets.vectors))
    one = Trainer(demo_config(tmp_path, f"data.shard_dir={sample_shards}", "train.captions_per_image=one"),
                  progress=False)
    labels = torch.cat([labels for _, _, labels in one.source.batches(1, one.targets)])
    assert sorted(labels.tolist()) == list(range(26))  # one caption of each image


def test_streamed_image_batches_pair_each_image_with_one_of_its_captions(sample_shards, tmp_path):
    config = demo_config(tmp_path, f"data.shard_dir={sample_shards}", "model.backbone=resnet18",
                         "model.weights=random", "model.freeze_backbone=false", "data.image_size=32")
    trainer = Trainer(config, progress=False)
    source, targets = trainer.source, trainer.targets
    assert isinstance(source, StreamedImageBatches)
    captions = source.train_set.captions
    seen = []
    for images, vectors, labels in source.batches(1, targets):
        assert images.shape[1:] == (3, 32, 32) and source.embed(trainer.encoder, images).shape == vectors.shape
        for vector, label in zip(vectors, labels):
            mine, _, _ = trainer.caption_encoder.encode_batch(captions[label])
            assert np.isclose(mine, vector.numpy()).all(axis=1).any()  # one of this image's own captions
        seen += labels.tolist()
    assert sorted(seen) == list(range(26))
