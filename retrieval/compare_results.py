"""What a comparison found, typed: the records of ``results.json`` and the summaries drawn from its runs.

:class:`ComparisonResults` is the whole file (``to_json`` writes it, ``from_json`` reads it back,
checked); :mod:`retrieval.compare` fills it and :mod:`retrieval.report` renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.errors import DataError
from retrieval.evaluation import HeldOutEvaluation, ZeroShotQuery
from retrieval.typed_json import INLINE, OMIT_IF_NONE, JsonRecord

RESULTS_FORMAT = "retrieval-compare/2"  # 2: a run's distance is "distance" (was "search_metric")


@dataclass
class MeanStd(JsonRecord):
    """Mean and sample standard deviation of one number over runs."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: list[float]) -> MeanStd:
        """Mean and sample standard deviation (0 for a single run)."""
        array = np.asarray(values, dtype=np.float64)
        return cls(float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0)


@dataclass
class EpochRecord(JsonRecord):
    """One epoch of a training run: its loss signals, and held-out metrics when it was evaluated.

    Epoch 0 is the untrained model: metrics only.
    """

    epoch: int
    loss: float | None = field(default=None, metadata=OMIT_IF_NONE)
    active_fraction: float | None = field(default=None, metadata=OMIT_IF_NONE)
    mean_pos_distance: float | None = field(default=None, metadata=OMIT_IF_NONE)
    mean_neg_distance: float | None = field(default=None, metadata=OMIT_IF_NONE)
    seconds: float | None = field(default=None, metadata=OMIT_IF_NONE)
    metrics: dict[str, float] = field(default_factory=dict)
    embedding_spread: float | None = field(default=None, metadata=OMIT_IF_NONE)
    dimension_variance: float | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class RunResult(JsonRecord):
    """One trained run (or the ConSE reference) evaluated on the held-out split."""

    seed: int | None  # None: ConSE, which has no training to seed
    run_dir: str | None  # relative to the comparison's output folder
    wall_seconds: float
    train_seconds: float
    history: list[EpochRecord]
    distance: str  # how the run's embeddings are compared: l2, ip or cosine
    evaluation: HeldOutEvaluation = field(metadata=INLINE)
    warnings: list[str] | None = field(default=None, metadata=OMIT_IF_NONE)  # the collapse alarm's (None: none)


@dataclass
class TrainingCurves(JsonRecord):
    """Mean training curves over a variant's runs (epochs aligned)."""

    epoch: list[int]
    loss: list[float | None]
    active_fraction: list[float | None]
    eval_epoch: list[int]
    primary: list[float]  # the primary metric at each evaluated epoch
    # None: results from before the spread was logged
    embedding_spread: list[float | None] | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class RunSummary(JsonRecord):
    """A variant over its runs: per metric mean ± std, mean R@K curves and mean training curves."""

    num_runs: int
    metrics: dict[str, MeanStd]
    wall_seconds: MeanStd
    train_seconds: MeanStd
    recall_curve: dict[str, list[float]]
    zero_shot: dict[str, MeanStd] | None
    curves: TrainingCurves | None = field(default=None, metadata=OMIT_IF_NONE)  # None: no training (ConSE)

    @classmethod
    def of(cls, runs: list[RunResult], primary: str) -> RunSummary:
        """Per metric mean ± std over ``runs``; mean R@K curves; mean training curves (epochs aligned)."""
        evaluations = [run.evaluation for run in runs]
        zero = [e.zero_shot.metrics if e.zero_shot is not None else None for e in evaluations]
        summary = cls(
            num_runs=len(runs),
            metrics={k: MeanStd.of([e.metrics[k] for e in evaluations]) for k in evaluations[0].metrics},
            wall_seconds=MeanStd.of([run.wall_seconds for run in runs]),
            train_seconds=MeanStd.of([run.train_seconds for run in runs]),
            recall_curve={d: _curve_means([e.recall_curve[d] for e in evaluations])
                          for d in evaluations[0].recall_curve},
            zero_shot={k: MeanStd.of([z[k] for z in zero]) for k in zero[0]} if all(zero) else None)
        histories = [run.history for run in runs if run.history]
        if histories:
            epochs = [h.epoch for h in histories[0] if h.loss is not None]
            evals = [h.epoch for h in histories[0] if h.metrics]
            rows = [{h.epoch: h for h in history} for history in histories]
            summary.curves = TrainingCurves(
                epoch=epochs,
                loss=[float(np.mean([row[e].loss for row in rows])) for e in epochs],
                active_fraction=[float(np.mean([row[e].active_fraction for row in rows])) for e in epochs],
                eval_epoch=evals,
                primary=[float(np.mean([row[e].metrics[primary] for row in rows])) for e in evals],
                embedding_spread=_spread_curve(rows, epochs))
        return summary


def _spread_curve(rows: list[dict[int, EpochRecord]], epochs: list[int]) -> list[float | None] | None:
    """Mean embedding spread per epoch over runs; None when no run logged it."""
    if all(row[e].embedding_spread is None for row in rows for e in epochs):
        return None
    return [_mean_or_none([row[e].embedding_spread for row in rows]) for e in epochs]


def _mean_or_none(values: list[float | None]) -> float | None:
    """The mean of the values that were logged (None when none was)."""
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _curve_means(curves: list[list[float]]) -> list[float]:
    length = min(len(c) for c in curves)
    return np.mean([c[:length] for c in curves], axis=0).tolist()


@dataclass
class VariantResult(JsonRecord):
    """One variant: what it is, its runs and their summary; a skipped variant has a note and no runs."""

    name: str
    kind: str  # train | conse
    set: list[str]
    optional: bool
    family: str  # how the verdict groups variants: the loss's family (triplet, cross-entropy, ...) or reference
    loss: str
    negatives: str | None  # the triplet loss's negatives setting; None for losses without one
    text_vectors: str
    recipe: dict[str, Any]  # the loss and model sections of its config
    status: str = "ok"  # ok | skipped
    note: str | None = None
    runs: list[RunResult] = field(default_factory=list)
    summary: RunSummary | None = field(default=None, metadata=OMIT_IF_NONE)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Standing(JsonRecord):
    """A variant's mean ± std on the verdict's metric; ``margin``: how far it trails the variant it is set against."""

    name: str
    mean: float
    std: float
    runs: int
    margin: float | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class TripletVsCrossEntropy(JsonRecord):
    """The best triplet variant against the best cross-entropy variant on the same text vectors."""

    triplet: Standing
    cross_entropy: Standing  # its margin: triplet minus cross-entropy
    vectors: str


@dataclass
class Verdict(JsonRecord):
    """The ranking on the primary metric, the winner and what it is measured against."""

    metric: str
    ranking: list[str]
    winner: Standing
    runner_up: Standing | None = field(default=None, metadata=OMIT_IF_NONE)
    best_cross_entropy: Standing | None = field(default=None, metadata=OMIT_IF_NONE)
    triplet_vs_cross_entropy: TripletVsCrossEntropy | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class MetricPair(JsonRecord):
    """One metric of the best triplet variant against the best cross-entropy variant.

    ``margin``: triplet minus cross-entropy (for ranks, lower is better); ``clear``: the gap exceeds the
    sum of the two sample standard deviations, so the seeds do not overlap it.
    """

    metric: str
    triplet: MeanStd
    cross_entropy: MeanStd
    margin: float
    clear: bool


@dataclass
class DirectionVerdict(JsonRecord):
    """One retrieval direction: the best variant overall and triplet against cross-entropy on every metric.

    The triplet and cross-entropy variants are each family's best by ``chosen_by`` (mAP) in this direction,
    on the base text vectors.
    """

    direction: str
    chosen_by: str
    best: Standing
    triplet: str | None = field(default=None, metadata=OMIT_IF_NONE)
    cross_entropy: str | None = field(default=None, metadata=OMIT_IF_NONE)
    metrics: list[MetricPair] = field(default_factory=list)


@dataclass
class TextSide(JsonRecord):
    """A variant with other caption targets against its counterpart on the base text vectors."""

    variant: Standing
    vectors: str
    counterpart: Standing
    counterpart_vectors: str
    same_recipe: bool
    margin: float
    wall_seconds: float
    counterpart_wall_seconds: float
    time_ratio: float


@dataclass
class HeldOutData(JsonRecord):
    """The held-out split every variant was evaluated on."""

    shard_dir: str
    val_shards: list[str]
    num_val_images: int
    num_val_captions: int | None  # None when no variant ran
    relevance: str | None


@dataclass
class SetupSeconds(JsonRecord):
    """One-off work done before the first run, so that no run's time includes it."""

    features: float  # backbone features of both splits into the shared cache
    text: dict[str, float]  # a first load of each text side


@dataclass
class ComparisonResults(JsonRecord):
    """The whole of ``results.json``: setup, per-variant runs and summaries, verdict, text-side comparison."""

    format: str
    name: str
    command: str
    compare_config: dict[str, Any]  # the compare config as written
    base_config: dict[str, Any]  # the resolved base run config
    seeds: list[int]
    num_seeds: int
    checkpoint: str
    primary_metric: str
    ks: list[int]
    example_queries: list[str]
    example_top_k: int
    data: HeldOutData
    chance: dict[str, float]
    zero_shot_chance: dict[str, float] | None
    zero_shot_queries: list[ZeroShotQuery] | None
    variants: list[VariantResult]
    verdict: Verdict | None
    text_sides: list[TextSide]
    setup_seconds: SetupSeconds | None = field(default=None, metadata=OMIT_IF_NONE)
    directions: list[DirectionVerdict] | None = field(default=None, metadata=OMIT_IF_NONE)

    @classmethod
    def from_json(cls, data: Any, where: str = "results") -> ComparisonResults:
        if isinstance(data, dict) and data.get("format") != RESULTS_FORMAT:
            raise DataError(f"{where}: format {data.get('format')!r} is not {RESULTS_FORMAT!r}; "
                            "rerun the comparison to write it again")
        return super().from_json(data, where)

    def ran(self) -> list[VariantResult]:
        """The variants that ran (not skipped), in config order."""
        return [variant for variant in self.variants if variant.ok]
