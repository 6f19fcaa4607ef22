"""Compare training recipes on one data set: every variant × seed trained and evaluated the same way.

A compare config: a base run config (YAML path and/or inline sections, ``set`` overrides), ``variants``
(a name plus ``set`` overrides, or ``kind: conse``: the no-training ConSE reference), ``seeds`` and ``out``.
Trained runs share data, backbone, schedule and feature cache, each in ``out/runs/<variant>/seed-<seed>``.
:func:`run_comparison` writes ``results.json``; ``retrieval.report`` renders it as ``report.md`` + plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from retrieval.checkpoint import load_checkpoint
from retrieval.compare_results import (
    RESULTS_FORMAT,
    ComparisonResults,
    DirectionVerdict,
    EpochRecord,
    HeldOutData,
    MetricPair,
    RunResult,
    RunSummary,
    SetupSeconds,
    Standing,
    TextSide,
    TripletVsCrossEntropy,
    VariantResult,
    Verdict,
)
from retrieval.config import Config, apply_overrides, build_dataclass, config_from_dict, config_to_dict
from retrieval.data import list_shards, read_shard_records
from retrieval.distances import COSINE, Distance
from retrieval.errors import ConfigError, DataError, RetrievalError
from retrieval.evaluation import (
    HeldOutEvaluation,
    HeldOutSplit,
    check_metric_name,
    full_report,
    image_classes,
    load_held_out,
    model_embeddings,
)
from retrieval.io import write_json
from retrieval.losses import LOSSES, loss_settings
from retrieval.progress import ProgressBar, progress_bar
from retrieval.rundir import RunDir
from retrieval.runtime import resolve_device
from retrieval.targets import build_caption_encoder, text_side
from retrieval.train import fit

KINDS = ("train", "conse")
LOWER_IS_BETTER = ("MedR", "MeanR")
SECTIONS = ("data", "text", "model", "loss", "train", "index")
DEFAULT_QUERIES = ("a pizza on a table", "a man riding a skateboard", "a red bus on the street")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class VariantSpec:
    """One recipe: ``set`` overrides on the base config (``train``), or the ConSE reference (``conse``)."""

    name: str = ""  # letters, digits, '_', '.', '+' or '-'
    kind: str = "train"  # train | conse
    set: tuple[str, ...] = ()
    optional: bool = False  # a failure (e.g. text vectors not installed) skips it with a note
    top_t: int = 10  # conse: how many classifier labels are mixed


@dataclass(frozen=True)
class CompareConfig:
    """A compare config file as written; :func:`load_compare_config` checks it and resolves the base config."""

    name: str | None = None  # default: the file's stem
    base: str | None = None  # a run config YAML, relative to this file (else to the working directory)
    data: dict | None = None  # inline sections: override the base file's, field by field
    text: dict | None = None
    model: dict | None = None
    loss: dict | None = None
    train: dict | None = None
    index: dict | None = None
    set: tuple[str, ...] = ()  # section.field=value overrides of the base, after the inline sections
    seeds: tuple[int, ...] = (0,)
    variants: tuple[VariantSpec, ...] = ()
    out: str | None = None  # default: runs/compare-<file stem>
    checkpoint: str = "last.pt"  # which checkpoint of each run is evaluated
    primary_metric: str = "text_to_image/R@5"  # the metric variants are ranked by
    curve_max_k: int = 50
    example_queries: tuple[str, ...] = DEFAULT_QUERIES
    example_top_k: int = 4


@dataclass(frozen=True)
class CompareSpec:
    """A whole comparison, validated, with its base run config resolved."""

    name: str
    base: Config
    variants: tuple[VariantSpec, ...]
    seeds: tuple[int, ...]
    out: Path
    checkpoint: str = "last.pt"
    primary_metric: str = "text_to_image/R@5"
    curve_max_k: int = 50
    example_queries: tuple[str, ...] = DEFAULT_QUERIES
    example_top_k: int = 4
    source: dict | None = None  # the compare config as written (for results.json)

    def config_for(self, variant: VariantSpec, seed: int | None) -> Config:
        """The run config of one variant and seed: base + variant overrides + seed, run dir and cache."""
        run_dir = self.out / "runs" / variant.name / (f"seed-{seed}" if seed is not None else "reference")
        overrides = [*variant.set, f"train.run_dir={run_dir}"] + ([f"train.seed={seed}"] if seed is not None else [])
        return config_from_dict(apply_overrides(config_to_dict(self.base), overrides), f"variant {variant.name}")


def _read_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError:
        raise ConfigError(f"config file {path} is not valid YAML") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return values


def _base_config(config: CompareConfig, folder: Path, overrides: list[str], where: str) -> Config:
    """Base config: file, then inline sections, then ``set``, then command-line overrides."""
    values: dict = {}
    if config.base is not None:
        path = Path(config.base)  # relative to the compare config's folder, else to the working directory
        values = _read_yaml(folder / path if (folder / path).is_file() else path)
    for section in SECTIONS:
        if getattr(config, section) is not None:
            values[section] = {**(values.get(section) or {}), **getattr(config, section)}
    values = config_to_dict(config_from_dict(values, f"{where} (base)"))
    return config_from_dict(apply_overrides(values, [*config.set, *overrides]), f"{where} (base)")


def _check(config: CompareConfig, where: str) -> None:
    """Value checks the types cannot express: one-line ConfigErrors naming the field."""
    if not config.variants:
        raise ConfigError(f"{where}: variants is empty; list at least one {{name, set}}")
    for i, variant in enumerate(config.variants):
        if not _NAME.match(variant.name):
            raise ConfigError(f"{where}.variants[{i}]: each variant needs a name of letters, digits, '_', '.', '+' "
                              f"or '-', e.g. {{name: triplet-farthest, set: [loss.negatives=farthest]}}; "
                              f"got {variant.name!r}")
        if variant.kind not in KINDS:
            raise ConfigError(f"{where}.variants[{i}].kind: must be one of {', '.join(KINDS)}, got {variant.kind!r}")
        if variant.top_t < 1:
            raise ConfigError(f"{where}.variants[{i}].top_t: must be a positive integer, got {variant.top_t}")
    names = [v.name for v in config.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.variants: names must be unique, got {', '.join(names)}")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"{where}.seeds: must be a non-empty list of distinct integers, got {list(config.seeds)!r}")
    for name in ("curve_max_k", "example_top_k"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{where}.{name}: must be a positive integer, got {getattr(config, name)}")


def load_compare_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                        out: str | Path | None = None, seeds: list[int] | None = None) -> CompareSpec:
    """Read and validate a compare config; ``overrides`` (``section.field=value``) apply to the base."""
    path = Path(path)
    raw = _read_yaml(path)
    where = str(path)
    values = raw if seeds is None else {**raw, "seeds": list(seeds)}
    config: CompareConfig = build_dataclass(CompareConfig, values, where)
    _check(config, where)
    base = _base_config(config, path.parent, list(overrides), where)
    out = Path(out if out is not None else config.out or f"runs/compare-{path.stem}")
    if base.train.feature_cache_dir is None:
        cache = str(out / "feature_cache")
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, feature_cache_dir=cache))
    spec = CompareSpec(
        name=config.name or path.stem, base=base, variants=config.variants, seeds=config.seeds, out=out,
        checkpoint=config.checkpoint, primary_metric=config.primary_metric, curve_max_k=config.curve_max_k,
        example_queries=config.example_queries or DEFAULT_QUERIES, example_top_k=config.example_top_k, source=raw,
    )
    check_metric_name(spec.primary_metric, base.train.ks, f"{where}: primary_metric")
    for variant in spec.variants:  # every variant's config must load before hours of training start
        spec.config_for(variant, spec.seeds[0] if variant.kind == "train" else None)
    return spec


# -- running -----------------------------------------------------------------------------------
class _Skip(Exception):
    """A variant that cannot run here (no class labels, no ConSE): skipped with a note."""


@dataclass
class _Data:
    """What every run shares: the held-out split, the training captions and labels, the shards' identity."""

    held_out: HeldOutSplit
    train_captions: list[str]
    train_classes: np.ndarray | None
    shards: list  # (file, size, mtime) of every shard: a saved run is reused only on the same data
    setup_seconds: SetupSeconds  # one-off work done before the first run, so that no run's time includes it


def load_data(spec: CompareSpec) -> _Data:
    """Both splits' backbone features into the shared cache, training captions and labels, text sides loaded."""
    base, started = spec.base, time.perf_counter()
    held_out = load_held_out(base, "val")
    if base.model.freeze_backbone and base.train.cache_features:  # else each run would cache them in its time
        train = load_held_out(base, "train")
        shards, captions, meta = train.shards, train.captions, train.meta
    else:
        shards = list_shards(base.data, "train")
        records = read_shard_records(shards)
        captions, meta = [r["captions"] for r in records], [r.get("meta", {}) for r in records]
    features = time.perf_counter() - started
    identity = [[os.path.basename(f), os.path.getsize(f), os.path.getmtime(f)] for f in shards + held_out.shards]
    return _Data(held_out, [c for image in captions for c in image], image_classes(meta), identity,
                 SetupSeconds(features, warm_up_text(spec)))


def warm_up_text(spec: CompareSpec) -> dict[str, float]:
    """Load each text side once, as vectors are cached per process (``word2vec-captions`` trains in each run)."""
    seconds: dict[str, float] = {}
    for variant in spec.variants:
        text = spec.config_for(variant, spec.seeds[0]).text
        if text.vectors in seconds or text.vectors == "word2vec-captions":
            continue
        started = time.perf_counter()
        try:
            text_side(text, spec.out).load()
        except (RetrievalError, ImportError, OSError):
            continue  # the variant's own run reports the problem
        seconds[text.vectors] = time.perf_counter() - started
    return seconds


def evaluate_record(spec: CompareSpec, embeddings: np.ndarray, data: _Data, caption_encoder,
                    distance: Distance) -> HeldOutEvaluation:
    """Metrics, chance, zero-shot, R@K curve and example queries of one set of val embeddings."""
    held_out = data.held_out
    return full_report(embeddings, held_out.keys, held_out.captions, held_out.meta, caption_encoder,
                       ks=tuple(spec.base.train.ks), distance=distance, max_k=spec.curve_max_k,
                       queries=spec.example_queries, top_k=spec.example_top_k)


def _saved_run(path: Path, identity: list) -> RunResult | None:
    """The run recorded at ``path`` when it was made with this ``identity`` (and in today's format)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("identity") != identity:
        return None
    try:
        return RunResult.from_json(saved["run"], f"{path}: run")
    except DataError:  # written by an older version: train again
        return None


def train_run(spec: CompareSpec, variant: VariantSpec, seed: int, data: _Data, reuse: bool = True) -> RunResult:
    """Train one variant with one seed, then evaluate its ``spec.checkpoint`` on the held-out split."""
    config = spec.config_for(variant, seed)
    if LOSSES.get(config.loss.name).needs_classes and data.train_classes is None:
        raise _Skip(f"loss {config.loss.name} needs class labels; these shards have captions only")
    saved = RunDir(config.train.run_dir).compare_record  # reused while the config is unchanged
    identity = json.loads(json.dumps([config_to_dict(config), spec.checkpoint, spec.curve_max_k,
                                      spec.example_queries, spec.example_top_k, data.shards]))
    if reuse and (old := _saved_run(saved, identity)) is not None:
        return old
    started = time.perf_counter()
    result = fit(config, progress=False, overwrite=True)  # this comparison's own run folder, not reusable
    wall = time.perf_counter() - started
    device = resolve_device(config.train.device)
    model = load_checkpoint(RunDir(result.run_dir).checkpoint(spec.checkpoint), device=device)
    embeddings = model_embeddings(model, data.held_out.shards, "val", device=device).vectors.numpy()
    history = [EpochRecord(0, metrics=result.initial_metrics)] + [EpochRecord(**_nan_to_none(dataclasses.asdict(s)))
                                                                    for s in result.history]
    run = RunResult(seed=seed, run_dir=os.path.relpath(result.run_dir, spec.out), wall_seconds=wall,
                    train_seconds=float(sum(s.seconds for s in result.history)), history=history,
                    distance=model.loss.distance.name,
                    evaluation=evaluate_record(spec, embeddings, data, model.caption_encoder,
                                               model.loss.distance), warnings=list(result.warnings) or None)
    write_json(saved, {"identity": identity, "run": run.to_json()})
    return run


def conse_run(spec: CompareSpec, variant: VariantSpec, data: _Data) -> RunResult:
    """ConSE (no training): val features → classifier → convex mix of label vectors, then evaluate."""
    try:
        from retrieval.conse import conse_embeddings
    except ImportError as error:
        raise _Skip(f"ConSE is not available here (retrieval.conse does not import: {error})") from None
    if data.held_out.classifier is None:
        raise _Skip("the backbone ships no classifier head, which ConSE needs")
    config = spec.config_for(variant, None)
    encoder = build_caption_encoder(config.text, config.train.run_dir, data.train_captions)
    started = time.perf_counter()
    embeddings = conse_embeddings(data.held_out.features, data.held_out.classifier, encoder, top_t=variant.top_t)
    wall = time.perf_counter() - started
    return RunResult(seed=None, run_dir=None, wall_seconds=wall, train_seconds=0.0, history=[], distance=COSINE.name,
                     evaluation=evaluate_record(spec, np.asarray(embeddings, np.float32), data, encoder, COSINE))


def _nan_to_none(record: dict) -> dict:
    """An epoch's statistics with NaN (a signal that was undefined, e.g. no negative pair) as None."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


def run_variant(spec: CompareSpec, variant: VariantSpec, data: _Data, bar: ProgressBar,
                reuse: bool = True) -> VariantResult:
    """Every seed of one variant (ConSE: one deterministic run); skipped variants carry a note."""
    seeds = spec.seeds if variant.kind == "train" else (None,)
    config = spec.config_for(variant, seeds[0])
    loss = config.loss.name  # family: how the verdict groups variants (the loss declares it)
    family = "reference" if variant.kind == "conse" else str(LOSSES.get(loss).family)
    settings = loss_settings(config.loss)
    recipe = {"loss": {"name": loss, **settings}, "model": config_to_dict(config)["model"]}
    record = VariantResult(name=variant.name, kind=variant.kind, set=list(variant.set), optional=variant.optional,
                           family=family, loss=loss, negatives=settings.get("negatives"),
                           text_vectors=config.text.vectors, recipe=recipe)
    try:
        for seed in seeds:
            bar.set_postfix_str(variant.name + (f" seed {seed}" if seed is not None else ""))
            run = train_run(spec, variant, seed, data, reuse) if seed is not None else conse_run(spec, variant, data)
            record.runs.append(run)
            bar.update(1)
    except _Skip as skip:
        record.status, record.note = "skipped", str(skip)
    except (RetrievalError, ImportError) as error:
        if not variant.optional:
            raise
        record.status, record.note = "skipped", f"failed: {' '.join(str(error).split())}"
    if record.ok:
        record.summary = RunSummary.of(record.runs, spec.primary_metric)
    else:
        bar.update(len(seeds) - len(record.runs))
        record.runs = []
    return record


def run_comparison(spec: CompareSpec, command: str = "", progress: bool = True,
                   reuse: bool = True) -> ComparisonResults:
    """Run every variant × seed, aggregate, and write ``<out>/results.json`` (atomically).

    ``reuse``: a run whose saved record has the same config, evaluation settings and shards is not retrained.
    Returns the results as read back from what was written, so that a report of them is one of the file.
    """
    data = load_data(spec)
    total = sum(len(spec.seeds) if v.kind == "train" else 1 for v in spec.variants)
    with progress_bar(total=total, desc=f"compare {spec.name}", unit="run", enabled=progress) as bar:
        records = [run_variant(spec, variant, data, bar, reuse) for variant in spec.variants]
    written = assemble(spec, records, data, command).to_json()
    write_json(spec.out / "results.json", written)
    return ComparisonResults.from_json(written, str(spec.out / "results.json"))


# -- aggregation -------------------------------------------------------------------------------
def _standing(record: VariantResult, metric: str, against: float | None = None) -> Standing:
    stats = record.summary.metrics[metric]
    return Standing(record.name, stats.mean, stats.std, record.summary.num_runs,
                    against - stats.mean if against is not None else None)


def _ranked(records: list[VariantResult], metric: str) -> list[VariantResult]:
    """Variants that ran, best first on ``metric`` (lower first for ranks)."""
    sign = 1.0 if metric.split("/")[-1] in LOWER_IS_BETTER else -1.0
    return sorted((r for r in records if r.ok), key=lambda r: sign * r.summary.metrics[metric].mean)


def verdict(records: list[VariantResult], metric: str, vectors: str) -> Verdict | None:
    """Winner on ``metric``, its margin over the runner-up and the best cross-entropy variant; the best
    triplet against the best cross-entropy variant on the base text ``vectors``."""
    ranked = _ranked(records, metric)
    if not ranked:
        return None
    best = ranked[0].summary.metrics[metric].mean
    result = Verdict(metric, [r.name for r in ranked], _standing(ranked[0], metric))
    if len(ranked) > 1:
        result.runner_up = _standing(ranked[1], metric, best)
    ce = [r for r in ranked if r.family == "cross-entropy"]
    if ce and ce[0] is not ranked[0]:
        result.best_cross_entropy = _standing(ce[0], metric, best)
    same = [r for r in ranked if r.text_vectors == vectors]
    ce, triplet = ([r for r in same if r.family == name] for name in ("cross-entropy", "triplet"))
    if ce and triplet:
        first = _standing(triplet[0], metric)
        result.triplet_vs_cross_entropy = TripletVsCrossEntropy(first, _standing(ce[0], metric, first.mean), vectors)
    return result


DIRECTION_METRIC = "mAP"  # what picks each family's best variant per direction: it ranks the whole list
DIRECTION_METRICS = ("R@1", "R@5", "R@10", "mAP")


def direction_verdicts(records: list[VariantResult], vectors: str, ks: list[int]) -> list[DirectionVerdict]:
    """Per direction: the best variant by mAP, and the best triplet against the best cross-entropy variant
    (each by mAP, on the base text ``vectors``) on R@K and mAP."""
    found = []
    for direction in ("text_to_image", "image_to_text"):
        chooser = f"{direction}/{DIRECTION_METRIC}"
        ranked = _ranked(records, chooser)
        if not ranked:
            continue
        result = DirectionVerdict(direction, DIRECTION_METRIC, _standing(ranked[0], chooser))
        same = [r for r in ranked if r.text_vectors == vectors]
        triplet, ce = ([r for r in same if r.family == name] for name in ("triplet", "cross-entropy"))
        if triplet and ce:
            result.triplet, result.cross_entropy = triplet[0].name, ce[0].name
            names = [f"R@{k}" for k in ks if f"R@{k}" in DIRECTION_METRICS] + [DIRECTION_METRIC]
            for name in names:
                key = f"{direction}/{name}"
                a, b = triplet[0].summary.metrics[key], ce[0].summary.metrics[key]
                margin = a.mean - b.mean
                result.metrics.append(MetricPair(name, a, b, margin, abs(margin) > a.std + b.std))
        found.append(result)
    return found


def text_sides(records: list[VariantResult], base_vectors: str, metric: str) -> list[TextSide]:
    """Each variant with other caption targets against the same recipe (else the best) on the base vectors."""
    trained = [r for r in _ranked(records, metric) if r.kind == "train"]
    base = [r for r in trained if r.text_vectors == base_vectors]
    found = []
    for record in (r for r in trained if r.text_vectors != base_vectors and base):
        same = [r for r in base if r.recipe == record.recipe]
        other = (same or base)[0]
        mine, theirs = _standing(record, metric), _standing(other, metric)
        seconds = (record.summary.wall_seconds.mean, other.summary.wall_seconds.mean)
        found.append(TextSide(variant=mine, vectors=record.text_vectors, counterpart=theirs,
                              counterpart_vectors=base_vectors, same_recipe=bool(same), margin=mine.mean - theirs.mean,
                              wall_seconds=seconds[0], counterpart_wall_seconds=seconds[1],
                              time_ratio=seconds[0] / max(seconds[1], 1e-9)))
    return found


def assemble(spec: CompareSpec, records: list[VariantResult], data: _Data, command: str) -> ComparisonResults:
    """The whole of ``results.json``: setup, per-variant runs and summaries, verdict, text-side comparison."""
    runs = [run.evaluation for r in records for run in r.runs]
    first = runs[0] if runs else None
    zero_shot = next((run.zero_shot for run in runs if run.zero_shot is not None and run.zero_shot.metrics), None)
    vectors = spec.base.text.vectors
    return ComparisonResults(
        format=RESULTS_FORMAT, name=spec.name, command=command, compare_config=spec.source or {},
        base_config=config_to_dict(spec.base), seeds=list(spec.seeds), num_seeds=len(spec.seeds),
        checkpoint=spec.checkpoint, primary_metric=spec.primary_metric, ks=list(spec.base.train.ks),
        example_queries=list(spec.example_queries), example_top_k=spec.example_top_k,
        data=HeldOutData(shard_dir=spec.base.data.shards or spec.base.data.shard_dir, val_shards=data.held_out.shards,
                         num_val_images=len(data.held_out.keys), num_val_captions=first.num_captions if first else None,
                         relevance=first.relevance if first else None),
        chance=first.chance if first else {}, zero_shot_chance=zero_shot.chance if zero_shot else None,
        zero_shot_queries=zero_shot.queries if zero_shot else None, variants=records,
        verdict=verdict(records, spec.primary_metric, vectors),
        text_sides=text_sides(records, vectors, spec.primary_metric),
        setup_seconds=data.setup_seconds,
        directions=direction_verdicts(records, vectors, list(spec.base.train.ks)))
