"""The collapse alarm: the spread statistics, the detector's rules, and real runs that collapse or do not."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from retrieval.collapse import CollapseAlarm, Spread, embedding_moments
from retrieval.config import load_config
from retrieval.errors import ConfigError
from retrieval.train import fit
from tests.conftest import PROJECT_ROOT, demo_config


def test_spread_is_the_rms_pairwise_distance_over_every_batch():
    torch.manual_seed(0)
    batches = [torch.randn(7, 5) * 3 + 1, torch.randn(4, 5)]
    moments = (embedding_moments(batches[0]) + embedding_moments(batches[1])).tolist()
    rows = torch.cat(batches).double()
    pairwise = torch.cdist(rows, rows) ** 2  # every ordered pair, the zero diagonal included
    spread = Spread.of(moments)
    assert spread.embedding_spread == pytest.approx(math.sqrt(pairwise.mean().item()), rel=1e-9)
    assert spread.dimension_variance == pytest.approx(rows.var(dim=0, unbiased=False).mean().item(), rel=1e-9)


def test_spread_of_nothing_or_one_row_is_undefined():
    assert math.isnan(Spread.of(None).embedding_spread)
    assert math.isnan(Spread.of(embedding_moments(torch.ones(1, 3)).tolist()).dimension_variance)


def test_active_rule_fires_at_the_patience_th_low_epoch_and_only_once():
    alarm = CollapseAlarm(patience=3, min_active=0.05)
    fired = [alarm.update(epoch, active, 1.0) for epoch, active in
             enumerate([0.5, 0.01, 0.02, 0.5, 0.04, 0.03, 0.0, 0.0, 0.0], start=1)]
    assert [epoch for epoch, warnings in enumerate(fired, start=1) if warnings] == [7]  # 5, 6, 7 in a row
    assert "epoch 7" in fired[6][0] and "active fraction" in fired[6][0]
    assert alarm.warnings == fired[6]


def test_spread_rule_compares_with_the_first_epoch():
    alarm = CollapseAlarm(patience=2, min_spread_ratio=0.1)
    spreads = [2.0, 0.25, 0.19, 0.21, 0.19, 0.1, 0.05]  # the floor is 0.2
    fired = [alarm.update(epoch, 0.9, spread) for epoch, spread in enumerate(spreads, start=1)]
    assert [epoch for epoch, warnings in enumerate(fired, start=1) if warnings] == [6]
    assert "embedding spread" in fired[5][0] and "2.0000 → 0.1000" in fired[5][0]


def test_losses_without_a_margin_are_not_judged_by_their_active_fraction():
    alarm = CollapseAlarm(patience=1, check_active=False)
    assert alarm.update(1, 0.0, 1.0) == [] and alarm.update(2, 0.0, 1.0) == []


def test_undefined_spread_neither_fires_nor_sets_the_reference():
    alarm = CollapseAlarm(patience=1)
    assert alarm.update(1, 0.5, float("nan")) == [] and alarm.first_spread is None
    assert alarm.update(2, 0.5, 1.0) == [] and alarm.first_spread == 1.0


@pytest.mark.parametrize("setting", ["train.collapse_patience=0", "train.collapse_min_active=1.5",
                                     "train.collapse_min_spread_ratio=-0.1"])
def test_alarm_settings_out_of_range_are_refused_at_load(setting):
    with pytest.raises(ConfigError, match=setting.split("=")[0].split(".")[1]):
        load_config(PROJECT_ROOT / "configs" / "demo.yaml", [setting])


def test_the_demo_run_logs_both_signals_and_the_alarm_stays_silent(trained_run):
    assert trained_run.warnings == []
    rows = list(csv.DictReader(open(trained_run.run_dir / "metrics.csv")))
    spreads = [float(row["embedding_spread"]) for row in rows]
    assert all(spread > 0.1 * spreads[0] for spread in spreads)
    assert all(float(row["dimension_variance"]) > 0 for row in rows)


@pytest.mark.slow
def test_a_run_whose_embeddings_fall_together_raises_the_spread_alarm(sample_shards, tmp_path, capsys):
    # decoupled weight decay of lr × weight_decay = 1 wipes the projection at every step: all outputs near 0
    result = fit(demo_config(tmp_path, f"data.shard_dir={sample_shards}", "train.epochs=5", "train.eval_every=5",
                             "model.normalize_output=false", "train.lr=0.0001", "train.weight_decay=10000"),
                 progress=False)
    assert len(result.warnings) == 1 and "collapse alarm at epoch 4: the embedding spread" in result.warnings[0]
    assert result.warnings[0] in capsys.readouterr().out.splitlines()


@pytest.mark.slow
def test_a_run_without_active_triplets_raises_the_active_alarm(sample_shards, tmp_path):
    # no margin and the farthest caption as the negative: almost no triplet is violated
    result = fit(demo_config(tmp_path, f"data.shard_dir={sample_shards}", "train.epochs=12", "train.eval_every=12",
                             "loss.margin=0", "loss.negatives=farthest"), progress=False)
    assert any("active fraction stayed under 0.05" in warning for warning in result.warnings)
