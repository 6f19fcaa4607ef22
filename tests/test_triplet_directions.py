"""The triplet loss's caption anchors and sum of hinges (VSE++'s forms), against hand-computed values."""

from __future__ import annotations

from math import sqrt

import pytest
import torch

from retrieval.config import config_from_dict
from retrieval.errors import ConfigError
from retrieval.losses import build_loss

# three captions at word-space distances d(t0,t1)=3, d(t0,t2)=4, d(t1,t2)=5, and three images
CAPTIONS = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
IMAGES = torch.tensor([[1.0, 0.0], [3.0, 1.0], [0.0, 2.0]])
LABELS = torch.tensor([0, 1, 2])
# d(f_i, t_j):  f0: 1, 2, √17   f1: √10, 1, √18   f2: 2, √13, 2


def triplet(**settings):
    config = config_from_dict({"loss": {"name": "triplet", **settings}})
    return build_loss(config.loss, seed=0, num_classes=3, embedding_dim=2)


def test_image_anchors_are_the_default_loss():
    # farthest caption in word space: row 0 → t2, row 1 → t2, row 2 → t1
    out = triplet(margin=3.0)(IMAGES, CAPTIONS, LABELS)
    expected = [max(0, 3 + 1 - sqrt(17)), max(0, 3 + 1 - sqrt(18)), 3 + 2 - sqrt(13)]
    assert out.value.item() == pytest.approx(sum(expected) / 3)
    assert out.active_fraction == pytest.approx(1 / 3)
    explicit = triplet(margin=3.0, anchors="image", hinge="sampled")(IMAGES, CAPTIONS, LABELS)
    assert torch.equal(out.value, explicit.value)


def test_caption_anchors_take_the_image_of_the_farthest_caption():
    # caption 0 against image 2, caption 1 against image 2, caption 2 against image 1
    out = triplet(margin=3.0, anchors="caption")(IMAGES, CAPTIONS, LABELS)
    expected = [3 + 1 - 2, 3 + 1 - sqrt(13), 3 + 2 - sqrt(18)]
    assert out.value.item() == pytest.approx(sum(expected) / 3)
    assert out.active_fraction == 1.0
    assert out.mean_neg_distance == pytest.approx((2 + sqrt(13) + sqrt(18)) / 3)


def test_both_directions_average_all_six_terms():
    out = triplet(margin=3.0, anchors="both")(IMAGES, CAPTIONS, LABELS)
    terms = [0, 0, 3 + 2 - sqrt(13), 3 + 1 - 2, 3 + 1 - sqrt(13), 3 + 2 - sqrt(18)]
    assert out.value.item() == pytest.approx(sum(terms) / 6)
    assert out.active_fraction == pytest.approx(4 / 6)


def test_sum_of_hinges_over_every_other_caption():
    out = triplet(margin=3.0, negatives="random", hinge="sum")(IMAGES, CAPTIONS, LABELS)
    per_anchor = [(3 + 1 - 2) + 0, (3 + 1 - sqrt(10)) + 0, (3 + 2 - 2) + (3 + 2 - sqrt(13))]
    assert out.value.item() == pytest.approx(sum(per_anchor) / 3)
    assert out.active_fraction == pytest.approx(4 / 6)


def test_sum_of_hinges_with_caption_anchors_and_far_captions_only():
    # far_distance 3.5: t1 (at 3) is not far from t0, so caption 0's only negative is image 2;
    # caption 1's far captions: t2 (5); caption 2's: t0 (4) and t1 (5)
    out = triplet(margin=3.0, negatives="far-hardest", far_distance=3.5, anchors="caption",
                  hinge="sum")(IMAGES, CAPTIONS, LABELS)
    per_anchor = [3 + 1 - 2, max(0, 3 + 1 - sqrt(13)) + 0, max(0, 3 + 2 - sqrt(17)) + max(0, 3 + 2 - sqrt(18))]
    assert out.value.item() == pytest.approx(sum(per_anchor) / 3)


@pytest.mark.parametrize("far_distance,expected_terms", [
    # t1 sits exactly 3 from t0: not far at 3.0, so caption 0 takes image 2 (its only far caption), caption 1
    # image 2 (t2); at 2.9 caption 0 takes image 1, now the closest image, and caption 1 image 0 (t0 is far)
    (3.0, [10 + 1 - 2, 10 + 1.5 - sqrt(13), 10 + 2 - sqrt(17)]),
    (2.9, [10 + 1 - 1.5, 10 + 1.5 - 2, 10 + 2 - sqrt(17)]),
])
def test_caption_anchored_far_hardest_keeps_to_far_captions_at_the_threshold_edge(far_distance, expected_terms):
    images = torch.tensor([[1.0, 0.0], [1.5, 0.0], [0.0, 2.0]])  # image 1 lies closer to t0 than image 2
    # d(f_i, t_j):  f0: 1, 2, √17   f1: 1.5, 1.5, √18.25   f2: 2, √13, 2
    out = triplet(margin=10.0, negatives="far-hardest", far_distance=far_distance, anchors="caption")(
        images, CAPTIONS, LABELS)
    assert out.value.item() == pytest.approx(sum(expected_terms) / 3)


@pytest.mark.parametrize("settings,message", [
    ({"anchors": "text"}, "anchors: must be one of image, caption, both"),
    ({"hinge": "max"}, "hinge: must be one of sampled, sum"),
    ({"hinge": "sum"}, "negatives: farthest draws from a set of one"),
])
def test_meaningless_settings_are_refused_at_load(settings, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"loss": {"name": "triplet", **settings}})


def test_caption_anchors_give_the_images_a_gradient_toward_their_caption():
    images = IMAGES.clone().requires_grad_(True)
    triplet(margin=3.0, anchors="caption")(images, CAPTIONS, LABELS).value.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("settings", [["loss.anchors=both"], ["loss.anchors=both", "loss.hinge=sum",
                                                              "loss.negatives=far-hardest"]])
def test_both_directions_beat_the_untrained_encoder_on_held_out_photos(sample_shards, tmp_path, settings):
    from retrieval.train import fit, rsum
    from tests.conftest import demo_config

    result = fit(demo_config(tmp_path, f"data.shard_dir={sample_shards}", "train.epochs=20", "train.eval_every=10",
                             *settings), progress=False)
    assert rsum(result.best_metrics) > rsum(result.initial_metrics) + 0.3
    assert result.best_metrics["image_to_text/R@5"] > result.initial_metrics["image_to_text/R@5"]
