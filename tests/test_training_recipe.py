"""The fine-tuning recipe inside the real training loop: precision, LR schedule, accumulation, backbone LR."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval.errors import ConfigError
from retrieval.optimization import lr_factor
from retrieval.train import Trainer, fit
from retrieval.training_log import read_steps
from tests.conftest import demo_config

SMALL_CACHED = ("model.backbone=resnet18", "model.weights=random", "data.image_size=32")  # features in a second
FINE_TUNE = ("model.backbone=resnet18", "model.weights=random", "model.freeze_backbone=false", "data.image_size=32",
             "train.batch_size=8", "train.eval_every=1")


@pytest.mark.slow
def test_bf16_fine_tuning_runs_the_backbone_in_bf16_and_trains(sample_shards, tmp_path):
    config = demo_config(tmp_path, f"data.shard_dir={sample_shards}", *FINE_TUNE, "train.precision=bf16",
                         "train.epochs=2", "train.lr=0.003")
    trainer = Trainer(config, progress=False)
    seen = []
    trainer.encoder.backbone.conv1.register_forward_hook(
        lambda module, inputs, output: seen.append(output.dtype) if module.training else None)
    result = trainer.run()
    assert seen and set(seen) == {torch.bfloat16}  # every training forward ran under bf16 autocast
    losses = [row["loss"] for row in read_steps(tmp_path / "steps.csv")]
    assert len(losses) == 2 * trainer.steps_per_epoch and all(math.isfinite(loss) for loss in losses)
    assert result.history[-1].loss < result.history[0].loss
    fp32 = Trainer(demo_config(tmp_path / "fp32", f"data.shard_dir={sample_shards}", *FINE_TUNE, "train.epochs=1"),
                   progress=False)
    fp32_seen = []
    fp32.encoder.backbone.conv1.register_forward_hook(lambda m, i, output: fp32_seen.append(output.dtype))
    fp32.run()
    assert set(fp32_seen) == {torch.float32}


@pytest.mark.slow
def test_the_logged_learning_rate_follows_warm_up_then_cosine(sample_shards, tmp_path):
    config = demo_config(tmp_path, f"data.shard_dir={sample_shards}", *SMALL_CACHED, "train.epochs=3",
                         "train.batch_size=16",
                         "train.warmup_steps=4", "train.lr_schedule=cosine", "train.lr=0.01", "train.eval_every=3")
    fit(config, progress=False)
    rows = read_steps(tmp_path / "steps.csv")
    total = len(rows)
    assert total == 3 * math.ceil(130 / 16)  # 130 training pairs
    for index, row in enumerate(rows):  # the lr logged with step n is the one the next step uses
        assert row["lr"] == pytest.approx(0.01 * lr_factor(index + 1, 4, "cosine", total), abs=1e-12)
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_accumulation_takes_one_optimizer_step_per_cycle_and_closes_each_epoch(sample_shards, tmp_path):
    config = demo_config(tmp_path, f"data.shard_dir={sample_shards}", *SMALL_CACHED, "train.epochs=2",
                         "train.batch_size=16",
                         "train.grad_accumulation=4", "train.eval_every=2")
    fit(config, progress=False)
    rows = read_steps(tmp_path / "steps.csv")
    per_epoch = 3  # 9 batches of 16 pairs → cycles of 4, 4 and 1: the last batch closes its cycle
    assert [row["epoch"] for row in rows] == [1] * per_epoch + [2] * per_epoch
    assert [row["step"] for row in rows] == list(range(1, 2 * per_epoch + 1))


def test_backbone_lr_is_refused_for_a_frozen_backbone_and_fp16_off_cuda(sample_shards, tmp_path):
    with pytest.raises(ConfigError, match="backbone_lr"):
        demo_config(tmp_path, "train.backbone_lr=0.0001")
    with pytest.raises(ConfigError, match="bf16") as error:
        Trainer(demo_config(tmp_path, f"data.shard_dir={sample_shards}", "train.precision=fp16",
                            "train.device=cpu"), progress=False)
    assert "\n" not in str(error.value)
