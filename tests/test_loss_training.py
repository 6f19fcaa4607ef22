"""Every registered loss trains through the real trainer; class losses need class data."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from retrieval.data import Record, write_shards
from retrieval.errors import ConfigError
from retrieval.losses import LOSSES
from retrieval.losses.triplet_offline import OfflineBankTripletLoss
from retrieval.train import fit
from tests.conftest import demo_config

CLASSES = ("red square", "blue circle", "green triangle", "yellow square")
COLOURS = ((220, 30, 30), (30, 60, 220), (30, 180, 60), (230, 210, 40))


def shape_image(label: int, rng: np.random.Generator) -> bytes:
    """A noisy 64×64 picture of one coloured shape."""
    image = Image.fromarray(rng.integers(0, 60, (64, 64, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    x, y, size = *rng.integers(4, 24, 2), int(rng.integers(24, 36))
    box = (int(x), int(y), int(x) + size, int(y) + size)
    shape = CLASSES[label].split()[1]
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[label])
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[label])
    else:
        draw.rectangle(box, fill=COLOURS[label])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def class_shards(tmp_path_factory):
    """48 shape pictures in 4 captioned classes, with an integer ``label`` in each sample's meta."""
    rng = np.random.default_rng(0)
    records = [Record(key=f"shape{i:03d}", image_bytes=shape_image(i % 4, rng), image_ext="png",
                      captions=(f"a {CLASSES[i % 4]}",), meta={"label": i % 4}) for i in range(48)]
    out = tmp_path_factory.mktemp("classes") / "shards"
    write_shards(records, out, val_fraction=0.25, split_by="hash", progress=False)
    return out


def short_run(tmp_path, shards, loss, *extra):
    # loss={name: ...} replaces the demo's triplet section (margin, negatives) with the loss's defaults
    return fit(demo_config(tmp_path, f"data.shard_dir={shards}", f"loss={{name: {loss}}}", "train.epochs=1",
                           "train.eval_every=1", f"train.feature_cache_dir={shards.parent / 'features'}",
                           "data.image_size=64", *extra), progress=False)


@pytest.mark.parametrize("loss", [name for name in LOSSES.names() if not LOSSES.get(name).needs_classes])
def test_every_caption_loss_trains_one_epoch_on_the_demo_data(sample_shards, tmp_path, loss):
    result = short_run(tmp_path, sample_shards, loss)
    stats = result.history[0]
    assert np.isfinite(stats.loss) and 0.0 <= stats.active_fraction <= 1.0
    assert "text_to_image/R@5" in result.final_metrics


@pytest.mark.parametrize("loss", [name for name in LOSSES.names() if LOSSES.get(name).needs_classes])
def test_class_losses_refuse_caption_only_data_in_one_line(sample_shards, tmp_path, loss):
    with pytest.raises(ConfigError) as error:
        short_run(tmp_path, sample_shards, loss)
    assert loss in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("loss", LOSSES.names())
def test_every_loss_trains_on_class_data(class_shards, tmp_path, loss):
    result = short_run(tmp_path, class_shards, loss)
    assert np.isfinite(result.history[0].loss)


def test_bad_loss_name_lists_the_valid_ones(sample_shards, tmp_path):
    with pytest.raises(ConfigError, match="triplet") as error:
        short_run(tmp_path, sample_shards, "tripplet")
    assert "\n" not in str(error.value)


def test_the_trainer_calls_the_epoch_hook_before_every_epoch(sample_shards, tmp_path, monkeypatch):
    seen, refresh = [], OfflineBankTripletLoss.on_epoch_start

    def record(self, epoch):
        seen.append(epoch)
        refresh(self, epoch)

    monkeypatch.setattr(OfflineBankTripletLoss, "on_epoch_start", record)
    short_run(tmp_path, sample_shards, "triplet-offline", "train.epochs=3", "train.eval_every=3")
    assert seen == [1, 2, 3]
