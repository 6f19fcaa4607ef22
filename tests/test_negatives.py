"""Negative samplers: each picks exactly what it claims on hand-made batches; old names are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.checkpoint import upgrade_saved_config
from retrieval.config import load_config
from retrieval.errors import ConfigError
from retrieval.losses import create_loss
from retrieval.negatives import NEGATIVE_SAMPLERS, NO_NEGATIVE, create_negative_sampler
from retrieval.train import fit
from tests.conftest import demo_config

WORD_SPACE = ("farthest", "far-random", "random")
BY_MODEL = ("far-hardest", "far-semihard")


def line(points: list[float]) -> torch.Tensor:
    """Caption vectors on the x axis: their distances are differences of the points."""
    return torch.tensor([[x, 0.0] for x in points], dtype=torch.float64)


def draws(name: str, captions: torch.Tensor, labels: torch.Tensor, count: int = 400) -> list[set[int]]:
    """The set of negatives each row received over ``count`` draws."""
    sampler, generator = create_negative_sampler(name), torch.Generator().manual_seed(0)
    picks = torch.stack([sampler(captions, labels, generator) for _ in range(count)])
    return [set(column.tolist()) for column in picks.T]


# Captions at 0, 1, 5, 6, all of different labels. Caption distances of the 12 ordered pairs, sorted:
# 1 1 1 1 4 4 5 5 5 5 6 6; the lower median (index int(0.5 * 11) = 5) is 4, so far (strictly > 4) is
# row 0: {2, 3}; row 1: {3} (caption 2 sits exactly at 4: not far); row 2: {0}; row 3: {0, 1}.
CAPTIONS = line([0, 1, 5, 6])
IMAGE_TO_TEXT = torch.tensor([
    [0.5, 0.1, 0.9, 0.3],  # closest is 1 (not far); far: 3 (0.3) < 2 (0.9); beyond the positive 0.5: only 2
    [0.8, 0.6, 0.2, 0.9],  # caption 2, the closest, is exactly at the threshold: not far, so 3
    [0.1, 0.3, 0.2, 0.05],  # one far caption (0), closer than the positive 0.2: semihard falls back to it
    [0.8, 0.8, 0.1, 0.7],  # far 0 and 1 tie at 0.8 (> the positive 0.7): the lower index, 0
], dtype=torch.float64)


def pick(name: str, captions=CAPTIONS, labels=None, image_to_text=IMAGE_TO_TEXT, **threshold) -> list[int]:
    labels = torch.arange(len(captions)) if labels is None else labels
    return create_negative_sampler(name, **threshold)(captions, labels, None, image_to_text).tolist()


def test_farthest_is_the_farthest_non_positive_caption_first_on_ties() -> None:
    assert pick("farthest") == [3, 3, 0, 0]
    # rows 0 and 3 share a label, so neither is the other's negative
    assert pick("farthest", labels=torch.tensor([0, 1, 2, 0])) == [2, 3, 0, 1]
    # row 0 has two captions at distance 5: the first
    assert pick("farthest", captions=line([0, -5, 5]), image_to_text=None) == [1, 2, 1]


def test_far_random_only_among_farther_than_mean() -> None:
    # off-diagonal mean distance 44/12 = 3.67: rows 0, 1 may only draw {2, 3}, rows 2, 3 only {0, 1}
    assert draws("far-random", CAPTIONS, torch.arange(4)) == [{2, 3}, {2, 3}, {0, 1}, {0, 1}]
    # mean 13.3: the middle caption has nothing farther, so it gets its farthest (first on ties)
    assert draws("far-random", line([-10, 0, 10]), torch.arange(3)) == [{2}, {0}, {0}]


def test_random_never_positive_and_covers_every_candidate() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2])
    expected = [{c for c in range(5) if labels[c] != labels[r]} for r in range(5)]
    assert draws("random", line([0, 1, 2, 3, 4]), labels) == expected


def test_far_hardest_is_the_far_caption_closest_to_the_image() -> None:
    assert pick("far-hardest") == [3, 3, 0, 0]
    assert pick("far-hardest", far_quantile=0.5) == [3, 3, 0, 0]  # the default, spelled out


def test_far_semihard_is_the_closest_far_caption_beyond_the_positive_else_the_far_hardest() -> None:
    assert pick("far-semihard") == [2, 3, 0, 0]


def test_the_far_threshold_is_strict_as_a_quantile_and_as_a_distance() -> None:
    # a caption exactly at the threshold is not far: row 1's caption 2 (distance 4) joins only below 4
    assert pick("far-hardest", far_distance=4.0) == [3, 3, 0, 0]
    assert pick("far-hardest", far_distance=3.9) == [3, 2, 0, 0]
    # quantile 0.3: sorted index int(0.3 * 11) = 3, distance 1; everything but the neighbours at 1 is far
    assert pick("far-hardest", far_quantile=0.3) == [3, 2, 0, 0]
    # quantile 1: the largest distance, so nothing is far and every row takes its farthest caption
    assert pick("far-hardest", far_quantile=1.0) == pick("farthest")
    assert pick("far-semihard", far_quantile=1.0) == pick("farthest")
    # quantile 0: the smallest distance (1); a far distance beyond every pair: the farthest again
    assert pick("far-hardest", far_quantile=0.0) == [3, 2, 0, 0]
    assert pick("far-semihard", far_distance=100.0) == pick("farthest")


def test_rows_with_a_single_candidate_get_it_from_every_sampler() -> None:
    # rows 0-2 share a label: their only candidate is 3. Label-pair distances 6, 5, 1 (twice each):
    # median (index 2 of 1 1 5 5 6 6) is 5, so row 3's only far caption is 0 (distance 6).
    captions, labels = line([0, 1, 5, 6]), torch.tensor([0, 0, 0, 1])
    image_to_text = torch.tensor([[0.5, 0.1, 0.2, 0.9]] * 4, dtype=torch.float64)
    for name in NEGATIVE_SAMPLERS.names():
        picks = pick(name, captions, labels, image_to_text)
        assert picks[:3] == [3, 3, 3], name
    assert pick("far-hardest", captions, labels, image_to_text)[3] == 0


def test_a_batch_of_one_label_gives_every_row_no_negative_from_every_sampler() -> None:
    # a short last batch holding one image's captions: nothing to pick, and the batch is not refused
    captions, labels = line([0, 1, 5]), torch.zeros(3, dtype=torch.long)
    image_to_text = torch.tensor([[0.5, 0.1, 0.2]] * 3, dtype=torch.float64)
    for name in NEGATIVE_SAMPLERS.names():
        assert pick(name, captions, labels, image_to_text) == [NO_NEGATIVE] * 3, name


def test_model_aware_samplers_match_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        captions, images = rng.normal(size=(12, 3)), rng.normal(size=(12, 3))
        labels = rng.integers(0, 4, size=12)
        text = np.linalg.norm(captions[:, None] - captions[None], axis=2)
        to_text = np.linalg.norm(images[:, None] - captions[None], axis=2)
        pairs = sorted(text[i, j] for i in range(12) for j in range(12) if labels[i] != labels[j])
        threshold = pairs[int(0.5 * (len(pairs) - 1))]
        hardest, semihard = [], []
        for i in range(12):
            others = [j for j in range(12) if labels[j] != labels[i]]
            far = [j for j in others if text[i, j] > threshold] or [max(others, key=lambda j: text[i, j])]
            hardest.append(min(far, key=lambda j: to_text[i, j]))
            beyond = [j for j in far if to_text[i, j] > to_text[i, i]]
            semihard.append(min(beyond, key=lambda j: to_text[i, j]) if beyond else hardest[-1])
        args = torch.tensor(captions), torch.tensor(labels), None, torch.tensor(to_text)
        assert create_negative_sampler("far-hardest")(*args).tolist() == hardest
        assert create_negative_sampler("far-semihard")(*args).tolist() == semihard


def test_the_triplet_loss_feeds_image_distances_to_model_aware_samplers() -> None:
    loss = create_loss("triplet", negatives="far-semihard", margin=10.0)  # every triplet active
    images = torch.tensor([[0.0, 0.5], [1.0, 0.6], [5.0, 0.2], [6.0, 0.7]], dtype=torch.float64)
    output = loss(images, CAPTIONS.clone(), torch.arange(4))
    expected = loss.sampler(CAPTIONS, torch.arange(4), None, torch.cdist(images, CAPTIONS))
    d_neg = (images - CAPTIONS[expected]).norm(dim=1)
    assert output.mean_neg_distance == pytest.approx(d_neg.mean().item())


@pytest.mark.parametrize("old, new", [("hard", "farthest"), ("soft", "far-random")])
def test_old_names_are_refused_in_one_line_naming_the_new_ones(old, new) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"loss.negatives={old}"])
    message = str(error.value)
    assert "loss.negatives" in message and f"{old!r} was renamed {new!r}" in message and "\n" not in message
    with pytest.raises(ConfigError, match="renamed"):
        create_negative_sampler(old)


@pytest.mark.parametrize("overrides, words", [
    (["loss.far_quantile=0.3"], "only negatives far-hardest and far-semihard"),
    (["loss.negatives=far-random", "loss.far_distance=1.0"], "only negatives far-hardest and far-semihard"),
    (["loss.negatives=far-hardest", "loss.far_quantile=1.5"], "loss.far_quantile: must be a quantile in [0, 1]"),
    (["loss.negatives=far-hardest", "loss.far_distance=-1.0"], "loss.far_distance: must be >= 0.0"),
    (["loss.negatives=far-hardest", "loss.far_quantile=0.3", "loss.far_distance=1.0"], "not both"),
])
def test_far_threshold_settings_are_checked_at_load(overrides, words) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_far_threshold_settings_take_effect() -> None:
    loss = create_loss("triplet", negatives="far-hardest", far_distance=3.9)
    assert loss.sampler.far_distance == 3.9
    assert create_loss("triplet", negatives="far-semihard", far_quantile=0.25).sampler.far_quantile == 0.25
    config = load_config(None, ["loss.negatives=far-semihard", "loss.far_quantile=0.25"])
    assert config.loss.settings["far_quantile"] == 0.25


def test_saved_configs_with_old_names_are_read_under_the_new_ones() -> None:
    new_format = {"loss": {"name": "triplet", "margin": 0.4, "negatives": "soft"}, "train": {"epochs": 3}}
    assert upgrade_saved_config(new_format) == {"loss": {"name": "triplet", "margin": 0.4, "negatives": "far-random"},
                                                "train": {"epochs": 3}}
    old_format = {"loss": {"name": "triplet", "margin": 0.4, "negatives": "hard", "params": {}}}
    assert upgrade_saved_config(old_format) == {"loss": {"name": "triplet", "margin": 0.4, "negatives": "farthest"}}
    current = {"loss": {"name": "triplet", "negatives": "far-hardest"}}
    assert upgrade_saved_config(current) is current


@pytest.mark.slow
def test_model_aware_negatives_keep_more_triplets_active_on_the_demo(sample_shards, tmp_path):
    """Measured on the demo (seeds 0-2, epoch 10): farthest 0.39-0.55 active, far-hardest and far-semihard 0.80-1.0."""
    active = {}
    for name in ("farthest", *BY_MODEL):
        result = fit(demo_config(tmp_path / name, f"data.shard_dir={sample_shards}", f"loss.negatives={name}",
                                 "train.epochs=10", "train.eval_every=10",
                                 f"train.feature_cache_dir={tmp_path / 'features'}"), progress=False)
        active[name] = np.mean([stats.active_fraction for stats in result.history[1:]])
    assert active["far-hardest"] > active["farthest"] + 0.15
    assert active["far-semihard"] > active["farthest"] + 0.15
