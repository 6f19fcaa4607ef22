"""Compare training recipes on one data set: every variant × seed trained and evaluated the same way.

A compare config: a base run config (YAML path and/or inline sections, ``set`` overrides), ``variants``
(a name plus ``set`` overrides, or ``kind: conse``: the no-training ConSE reference), ``seeds`` and ``out``.
Trained runs share data, backbone, schedule and feature cache, each in ``out/runs/<variant>/seed-<seed>``.
:func:`run_comparison` writes ``results.json``; ``retrieval.report`` renders it as ``report.md`` + plots.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from retrieval.checkpoint import load_checkpoint
from retrieval.config import Config, apply_overrides, config_from_dict, config_to_dict
from retrieval.data import list_shards
from retrieval.errors import ConfigError, RetrievalError
from retrieval.evaluation import (HeldOutSplit, check_metric_name, full_report, image_classes, load_held_out,
                                  model_embeddings, summarize_runs)
from retrieval.io import write_json
from retrieval.losses import LOSSES
from retrieval.targets import build_caption_encoder, text_side
from retrieval.train import fit, read_shard_records, resolve_device

RESULTS_FORMAT = "retrieval-compare/1"
RUN_RECORD = "compare_run.json"  # a finished run's record, reused when its config is unchanged
KINDS = ("train", "conse")
CROSS_ENTROPY_LOSSES = ("sigmoid-ce", "softmax-ce")
LOWER_IS_BETTER = ("MedR", "MeanR")
SECTIONS = ("data", "text", "model", "loss", "train", "index")
FIELDS = ("name", "base", "set", "seeds", "variants", "out", "checkpoint", "primary_metric", "curve_max_k",
          "example_queries", "example_top_k") + SECTIONS
DEFAULT_QUERIES = ("a pizza on a table", "a man riding a skateboard", "a red bus on the street")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class VariantSpec:
    """One recipe: ``set`` overrides on the base config (``train``), or the ConSE reference (``conse``)."""

    name: str
    kind: str = "train"
    set: tuple[str, ...] = ()
    optional: bool = False  # a failure (e.g. text vectors not installed) skips it with a note
    top_t: int = 10  # conse: how many classifier labels are mixed


@dataclass(frozen=True)
class CompareSpec:
    """A whole comparison, validated."""

    name: str
    base: dict  # the resolved base run config, as a plain dict
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
        return config_from_dict(apply_overrides(copy.deepcopy(self.base), overrides), f"variant {variant.name}")


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


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value or ())


def _base_values(raw: dict, folder: Path, overrides: list[str], where: str) -> dict:
    """Base config (file, then inline sections, then ``set``, then command-line overrides) as a dict."""
    values: dict = {}
    if raw.get("base") is not None:
        path = Path(str(raw["base"]))  # relative to the compare config's folder, else to the working directory
        path = folder / path if (folder / path).is_file() else path
        values = _read_yaml(path)
    for section in SECTIONS:
        if section in raw:
            if not isinstance(raw[section], dict):
                raise ConfigError(f"{where}: section {section!r} must be a mapping")
            values.setdefault(section, {})
            values[section] = {**(values[section] or {}), **raw[section]}
    values = config_to_dict(config_from_dict(values, f"{where} (base)"))
    values = apply_overrides(values, list(_strings(raw.get("set"), f"{where}: set")) + list(overrides))
    return config_to_dict(config_from_dict(values, f"{where} (base)"))


def _positive(raw: dict, key: str, default: int, where: str) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _variant(raw: Any, where: str) -> VariantSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not _NAME.match(raw["name"]):
        raise ConfigError(f"{where}: each variant needs a name of letters, digits, '_', '.', '+' or '-', "
                          f"e.g. {{name: triplet-hard, set: [loss.negatives=hard]}}; got {raw!r}")
    where = f"{where} {raw['name']!r}"
    unknown = sorted(set(raw) - {"name", "kind", "set", "optional", "top_t"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: name, kind, set, optional, top_t")
    if raw.get("kind", "train") not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}, got {raw['kind']!r}")
    return VariantSpec(raw["name"], raw.get("kind", "train"), _strings(raw.get("set"), f"{where}: set"),
                       bool(raw.get("optional", False)), _positive(raw, "top_t", 10, where))


def load_compare_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                        out: str | Path | None = None, seeds: list[int] | None = None) -> CompareSpec:
    """Read and validate a compare config; ``overrides`` (``section.field=value``) apply to the base."""
    path = Path(path)
    raw = _read_yaml(path)
    where = str(path)
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(FIELDS)}")
    base = _base_values(raw, path.parent, list(overrides), where)
    variants = tuple(_variant(v, f"{where}: variant") for v in raw.get("variants") or [])
    if not variants:
        raise ConfigError(f"{where}: variants is empty; list at least one {{name, set}}")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: variant names must be unique, got {', '.join(names)}")
    seeds = tuple(seeds if seeds is not None else raw.get("seeds", [0]))
    if not seeds or not all(type(s) is int for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of distinct integers, got {list(seeds)!r}")
    out = Path(out if out is not None else raw.get("out") or f"runs/compare-{path.stem}")
    if base["train"].get("feature_cache_dir") is None:
        base["train"]["feature_cache_dir"] = str(out / "feature_cache")
    spec = CompareSpec(
        name=str(raw.get("name") or path.stem), base=base, variants=variants, seeds=seeds, out=out,
        checkpoint=str(raw.get("checkpoint", "last.pt")),
        primary_metric=str(raw.get("primary_metric", "text_to_image/R@5")),
        curve_max_k=_positive(raw, "curve_max_k", 50, where),
        example_queries=_strings(raw.get("example_queries"), f"{where}: example_queries") or DEFAULT_QUERIES,
        example_top_k=_positive(raw, "example_top_k", 4, where), source=raw,
    )
    check_metric_name(spec.primary_metric, base["train"]["ks"], f"{where}: primary_metric")
    for variant in variants:  # every variant's config must load before hours of training start
        spec.config_for(variant, seeds[0] if variant.kind == "train" else None)
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
    setup_seconds: dict  # one-off work done before the first run, so that no run's time includes it


def load_data(spec: CompareSpec) -> _Data:
    """Both splits' backbone features into the shared cache, training captions and labels, text sides loaded."""
    base, started = config_from_dict(spec.base), time.perf_counter()
    held_out = load_held_out(base, "val")
    if base.model.freeze_backbone and base.train.cache_features:  # else each run would cache them in its time
        train = load_held_out(base, "train")
        shards, captions, meta = train.shards, train.captions, train.meta
    else:
        shards = list_shards(base.data.shard_dir, "train")
        records = read_shard_records(shards)
        captions, meta = [r["captions"] for r in records], [r.get("meta", {}) for r in records]
    features = time.perf_counter() - started
    identity = [[os.path.basename(f), os.path.getsize(f), os.path.getmtime(f)] for f in shards + held_out.shards]
    return _Data(held_out, [c for image in captions for c in image], image_classes(meta), identity,
                 {"features": features, "text": warm_up_text(spec)})


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


def evaluate_record(spec: CompareSpec, embeddings: np.ndarray, data: _Data, caption_encoder, metric: str) -> dict:
    """Metrics, chance, zero-shot, R@K curve and example queries of one set of val embeddings."""
    held_out = data.held_out
    return full_report(embeddings, held_out.keys, held_out.captions, held_out.meta, caption_encoder,
                       ks=tuple(spec.base["train"]["ks"]), metric=metric, max_k=spec.curve_max_k,
                       queries=spec.example_queries, top_k=spec.example_top_k)


def train_run(spec: CompareSpec, variant: VariantSpec, seed: int, data: _Data, reuse: bool = True) -> dict:
    """Train one variant with one seed, then evaluate its ``spec.checkpoint`` on the held-out split."""
    config = spec.config_for(variant, seed)
    if LOSSES.get(config.loss.name).needs_classes and data.train_classes is None:
        raise _Skip(f"loss {config.loss.name} needs class labels; these shards have captions only")
    saved = Path(config.train.run_dir) / RUN_RECORD
    identity = json.loads(json.dumps([config_to_dict(config), spec.checkpoint, spec.curve_max_k,
                                      spec.example_queries, spec.example_top_k, data.shards]))
    if reuse and saved.is_file() and (old := json.loads(saved.read_text())).get("identity") == identity:
        return old["run"]
    started = time.perf_counter()
    result = fit(config, progress=False)
    wall = time.perf_counter() - started
    device = resolve_device(config.train.device)
    model = load_checkpoint(result.run_dir / "checkpoints" / spec.checkpoint, device=device)
    embeddings = model_embeddings(model, data.held_out.shards, "val", device=device).vectors.numpy()
    history = [{"epoch": 0, "metrics": result.initial_metrics}] + [dataclasses.asdict(s) for s in result.history]
    run = {"seed": seed, "run_dir": os.path.relpath(result.run_dir, spec.out), "wall_seconds": wall,
           "train_seconds": float(sum(s.seconds for s in result.history)), "history": history,
           "search_metric": model.loss.search_metric,
           **evaluate_record(spec, embeddings, data, model.caption_encoder, model.loss.search_metric)}
    write_json(saved, {"identity": identity, "run": run})
    return run


def conse_run(spec: CompareSpec, variant: VariantSpec, data: _Data) -> dict:
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
    return {"seed": None, "run_dir": None, "search_metric": "cosine", "wall_seconds": wall, "train_seconds": 0.0,
            "history": [], **evaluate_record(spec, np.asarray(embeddings, np.float32), data, encoder, "cosine")}


def run_variant(spec: CompareSpec, variant: VariantSpec, data: _Data, bar: tqdm, reuse: bool = True) -> dict:
    """Every seed of one variant (ConSE: one deterministic run); skipped variants carry a note."""
    seeds = spec.seeds if variant.kind == "train" else (None,)
    config = spec.config_for(variant, seeds[0])
    plain, loss = config_to_dict(config), config.loss.name  # family: how the verdict groups variants
    family = "reference" if variant.kind == "conse" else "triplet" if loss.startswith("triplet") else (
        "cross-entropy" if loss in CROSS_ENTROPY_LOSSES else "other")
    record = {"name": variant.name, "kind": variant.kind, "set": list(variant.set), "optional": variant.optional,
              "family": family, "loss": loss, "negatives": config.loss.negatives,
              "text_vectors": config.text.vectors, "recipe": {"loss": plain["loss"], "model": plain["model"]},
              "status": "ok", "note": None, "runs": []}
    try:
        for seed in seeds:
            bar.set_postfix_str(variant.name + (f" seed {seed}" if seed is not None else ""))
            run = train_run(spec, variant, seed, data, reuse) if seed is not None else conse_run(spec, variant, data)
            record["runs"].append(run)
            bar.update(1)
    except _Skip as skip:
        record.update(status="skipped", note=str(skip))
    except (RetrievalError, ImportError) as error:
        if not variant.optional:
            raise
        record.update(status="skipped", note=f"failed: {' '.join(str(error).split())}")
    if record["status"] == "skipped":
        bar.update(len(seeds) - len(record["runs"]))
        record["runs"] = []
    else:
        record["summary"] = summarize_runs(record["runs"], spec.primary_metric)
    return record


def run_comparison(spec: CompareSpec, command: str = "", progress: bool = True, reuse: bool = True) -> dict:
    """Run every variant × seed, aggregate, and write ``<out>/results.json`` (atomically).

    ``reuse``: a run whose saved record has the same config, evaluation settings and shards is not retrained.
    """
    data = load_data(spec)
    total = sum(len(spec.seeds) if v.kind == "train" else 1 for v in spec.variants)
    with tqdm(total=total, desc=f"compare {spec.name}", unit="run", disable=not progress) as bar:
        records = [run_variant(spec, variant, data, bar, reuse) for variant in spec.variants]
    results = assemble(spec, records, data, command)
    write_json(spec.out / "results.json", results)
    return results


# -- aggregation -------------------------------------------------------------------------------
def _entry(record: dict, metric: str, against: float | None = None) -> dict:
    stats = record["summary"]["metrics"][metric]
    entry = {"name": record["name"], "mean": stats["mean"], "std": stats["std"], "runs": record["summary"]["num_runs"]}
    if against is not None:
        entry["margin"] = against - stats["mean"]
    return entry


def _ranked(records: list[dict], metric: str) -> list[dict]:
    """Variants that ran, best first on ``metric`` (lower first for ranks)."""
    sign = 1.0 if metric.split("/")[-1] in LOWER_IS_BETTER else -1.0
    ok = (r for r in records if r["status"] == "ok")
    return sorted(ok, key=lambda r: sign * r["summary"]["metrics"][metric]["mean"])


def verdict(records: list[dict], metric: str, vectors: str) -> dict | None:
    """Winner on ``metric``, its margin over the runner-up and the best cross-entropy variant; the best
    triplet against the best cross-entropy variant on the base text ``vectors``."""
    ranked = _ranked(records, metric)
    if not ranked:
        return None
    best = ranked[0]["summary"]["metrics"][metric]["mean"]
    result = {"metric": metric, "ranking": [r["name"] for r in ranked], "winner": _entry(ranked[0], metric)}
    if len(ranked) > 1:
        result["runner_up"] = _entry(ranked[1], metric, best)
    ce = [r for r in ranked if r["family"] == "cross-entropy"]
    if ce and ce[0] is not ranked[0]:
        result["best_cross_entropy"] = _entry(ce[0], metric, best)
    same = [r for r in ranked if r["text_vectors"] == vectors]
    ce, triplet = ([r for r in same if r["family"] == name] for name in ("cross-entropy", "triplet"))
    if ce and triplet:
        first = _entry(triplet[0], metric)
        result["triplet_vs_cross_entropy"] = {"triplet": first, "cross_entropy": _entry(ce[0], metric, first["mean"]),
                                              "vectors": vectors}
    return result


def text_sides(records: list[dict], base_vectors: str, metric: str) -> list[dict]:
    """Each variant with other caption targets against the same recipe (else the best) on the base vectors."""
    trained = [r for r in _ranked(records, metric) if r["kind"] == "train"]
    base = [r for r in trained if r["text_vectors"] == base_vectors]
    found = []
    for record in (r for r in trained if r["text_vectors"] != base_vectors and base):
        same = [r for r in base if r["recipe"] == record["recipe"]]
        other = (same or base)[0]
        mine, theirs = _entry(record, metric), _entry(other, metric)
        seconds = (record["summary"]["wall_seconds"]["mean"], other["summary"]["wall_seconds"]["mean"])
        found.append({"variant": mine, "vectors": record["text_vectors"], "counterpart": theirs,
                      "counterpart_vectors": base_vectors, "same_recipe": bool(same),
                      "margin": mine["mean"] - theirs["mean"], "wall_seconds": seconds[0],
                      "counterpart_wall_seconds": seconds[1], "time_ratio": seconds[0] / max(seconds[1], 1e-9)})
    return found


def assemble(spec: CompareSpec, records: list[dict], data: _Data, command: str) -> dict:
    """The whole of ``results.json``: setup, per-variant runs and summaries, verdict, text-side comparison."""
    runs = [run for r in records for run in r["runs"]]
    first = runs[0] if runs else None
    zero_shot = next((run["zero_shot"] for run in runs if (run["zero_shot"] or {}).get("metrics")), None)
    return json.loads(json.dumps({
        "format": RESULTS_FORMAT, "name": spec.name, "command": command,
        "compare_config": spec.source, "base_config": spec.base, "seeds": list(spec.seeds),
        "num_seeds": len(spec.seeds), "checkpoint": spec.checkpoint, "primary_metric": spec.primary_metric,
        "ks": spec.base["train"]["ks"], "example_queries": list(spec.example_queries),
        "example_top_k": spec.example_top_k, "data": {
            "shard_dir": spec.base["data"]["shard_dir"], "val_shards": data.held_out.shards,
            "num_val_images": len(data.held_out.keys), "num_val_captions": first and first["num_captions"],
            "relevance": first and first["relevance"]},
        "chance": first["chance"] if first else {}, "zero_shot_chance": zero_shot["chance"] if zero_shot else None,
        "zero_shot_queries": zero_shot["queries"] if zero_shot else None,
        "variants": records, "verdict": verdict(records, spec.primary_metric, spec.base["text"]["vectors"]),
        "text_sides": text_sides(records, spec.base["text"]["vectors"], spec.primary_metric),
        "setup_seconds": data.setup_seconds,
    }), parse_constant=lambda _: None)  # NaN and infinities become null
