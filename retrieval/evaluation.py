"""Cross-modal evaluation: text→image and image→text metrics, chance levels and zero-shot retrieval.

Relevance follows the data: where every image's metadata has an integer ``label`` (class data), a
caption is relevant to every image of its class; otherwise only to the image it describes. Held-out
images whose metadata says ``zero_shot: true`` belong to classes left out of training; for them
:func:`zero_shot_report` queries with the class names (DeViSE-style zero-shot retrieval).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retrieval.checkpoint import load_checkpoint
from retrieval.data import list_shards
from retrieval.distances import L2, Distance
from retrieval.embed import EncodedCollection, caption_pairs, encode_shards, eval_transform, split_features
from retrieval.errors import ConfigError, DataError, QueryError
from retrieval.metrics import chance_recall, retrieval_metrics
from retrieval.rundir import LAST_CHECKPOINT, RunDir
from retrieval.typed_json import INLINE, OMIT_IF_NONE, JsonRecord

#: metadata fields that may hold a class's name, in order of preference
CLASS_NAME_FIELDS = ("class_name", "label_name", "class", "category", "name")
DIRECTIONS = ("text_to_image", "image_to_text")


# -- typed reports ------------------------------------------------------------------------------
# A metrics table is a flat dict ``{"text_to_image/R@1": …, "image_to_text/mAP": …}``: score name → value.
@dataclass
class ZeroShotQuery(JsonRecord):
    """A class held out of training, queried by its name."""

    label: int
    name: str
    known: bool  # whether the text side knows a word of the name (else it cannot be a query)


@dataclass
class ZeroShotReport(JsonRecord):
    """Text→image with the held-out class names as queries, against every image."""

    queries: list[ZeroShotQuery]
    num_images: int
    metrics: dict[str, float] | None = None  # None when no class name has a known word
    chance: dict[str, float] | None = None


@dataclass
class RetrievalReport(JsonRecord):
    """All metrics in both directions with their chance levels, and zero-shot retrieval when the data has it."""

    relevance: str  # "class" or "image"
    distance: str  # how images and captions were compared: l2, squared-l2, cosine or ip
    ks: list[int]
    num_images: int
    num_captions: int
    metrics: dict[str, float]
    chance: dict[str, float]
    zero_shot: ZeroShotReport | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass
class CheckpointReport(JsonRecord):
    """A :class:`RetrievalReport` of one checkpoint on one split of a shard folder (``retrieval evaluate``)."""

    checkpoint: str
    epoch: int
    shard_dir: str
    split: str
    report: RetrievalReport = field(metadata=INLINE)


@dataclass
class HeldOutEvaluation(JsonRecord):
    """What a comparison keeps of one model on the held-out split: metrics, R@K curve and example queries."""

    metrics: dict[str, float]
    chance: dict[str, float]
    zero_shot: ZeroShotReport | None
    relevance: str
    num_captions: int
    recall_curve: dict[str, list[float]]  # direction → [R@1, R@2, …]
    examples: dict[str, list[str]]  # query → keys of its top images
    example_matches: dict[str, list[bool]]  # query → is it each top image's caption or class name


def cross_modal_report(image_emb: np.ndarray, caption_emb: np.ndarray, caption_labels: np.ndarray,
                       image_labels: np.ndarray, ks=(1, 5, 10), distance: Distance = L2) -> dict[str, float]:
    """Flat dict ``{"text_to_image/R@1": …, "image_to_text/mAP": …}``.

    Relevance: caption ``c`` and image ``i`` match iff ``caption_labels[c] == image_labels[i]``
    (the image's identity for captioned photos, its class where the data has classes). Images with
    no caption to find (none of their class's captions has a known word) are items but not queries.
    """
    asked = np.isin(image_labels, caption_labels)
    directions = {
        "text_to_image": retrieval_metrics(caption_emb, image_emb, caption_labels, image_labels, ks=ks,
                                           distance=distance),
        "image_to_text": retrieval_metrics(image_emb[asked], caption_emb, image_labels[asked], caption_labels,
                                           ks=ks, distance=distance),
    }
    return {f"{direction}/{name}": float(value) for direction, result in directions.items()
            for name, value in result.as_dict().items()}


def chance_report(caption_labels: np.ndarray, image_labels: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Expected R@K of a random ranking in both directions (average over queries)."""
    images_per_label = {label: int(np.sum(image_labels == label)) for label in np.unique(image_labels)}
    captions_per_label = {label: int(np.sum(caption_labels == label)) for label in np.unique(caption_labels)}
    report = {}
    for k in ks:
        t2i = np.mean([chance_recall(k, len(image_labels), images_per_label.get(label, 0)) for label in caption_labels])
        i2t = np.mean([chance_recall(k, len(caption_labels), captions_per_label[label]) for label in image_labels
                       if label in captions_per_label])  # images with no caption to find are not queries
        report[f"text_to_image/R@{k}"] = float(t2i)
        report[f"image_to_text/R@{k}"] = float(i2t)
    return report


# -- relevance ----------------------------------------------------------------------------------
def image_classes(meta: Sequence[dict]) -> np.ndarray | None:
    """Integer class ids when every image's metadata has a ``label``; None for caption-only data."""
    if meta and all("label" in m for m in meta):
        return np.asarray([int(m["label"]) for m in meta])
    return None


def class_count(meta: Sequence[dict]) -> int | None:
    """Number of classes (the largest class id + 1) on class data; None for caption-only data."""
    classes = image_classes(meta)
    return int(classes.max()) + 1 if classes is not None else None


def image_labels(meta: Sequence[dict]) -> np.ndarray:
    """Each image's relevance label: its class on class data, else its own index."""
    classes = image_classes(meta)
    return np.arange(len(meta)) if classes is None else classes


def relevance(meta: Sequence[dict], owner: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(caption labels, image labels, ``"class"`` or ``"image"``) for captions owned by ``owner``."""
    classes = image_classes(meta)
    if classes is None:
        return owner, np.arange(len(meta)), "image"
    return classes[owner], classes, "class"


@dataclass(frozen=True)
class CaptionQueries:
    """The known captions of a collection as queries: their vectors and the relevance labels of both sides."""

    vectors: np.ndarray  # (M, D) caption vectors
    caption_labels: np.ndarray  # (M,)
    image_labels: np.ndarray  # (N,) one per image of the collection
    relevance: str  # "class" or "image"


def caption_queries(captions: Sequence[Sequence[str]], meta: Sequence[dict], encode_batch: Callable) -> CaptionQueries:
    """Encode the captions of a collection (those with no known word are left out) and label both sides."""
    vectors, owner, _ = caption_pairs(captions, encode_batch)
    return CaptionQueries(vectors, *relevance(meta, owner))


def class_names(meta: Sequence[dict], captions: Sequence[Sequence[str]]) -> dict[int, str]:
    """Class id → name: a name field of the metadata, else the commonest caption of the class."""
    names: dict[int, str] = {}
    for name_field in CLASS_NAME_FIELDS:
        for m in meta:
            if "label" in m and isinstance(m.get(name_field), str) and m[name_field].strip():
                names.setdefault(int(m["label"]), m[name_field].strip())
        if names:
            break
    by_class: dict[int, Counter] = {}
    for m, image_captions in zip(meta, captions):
        if "label" in m and int(m["label"]) not in names:
            by_class.setdefault(int(m["label"]), Counter()).update(image_captions)
    names.update({label: counts.most_common(1)[0][0] for label, counts in by_class.items() if counts})
    return names


def zero_shot_classes(meta: Sequence[dict]) -> list[int]:
    """Sorted class ids of the images marked ``zero_shot`` (held out of training)."""
    return sorted({int(m["label"]) for m in meta if m.get("zero_shot") and "label" in m})


# -- reports --------------------------------------------------------------------------------------
def evaluate_embeddings(image_emb: np.ndarray, captions: Sequence[Sequence[str]], meta: Sequence[dict],
                        encode_batch: Callable, ks: Sequence[int] = (1, 5, 10),
                        distance: Distance = L2) -> RetrievalReport:
    """All metrics in both directions, the chance level and (when present) zero-shot retrieval."""
    queries = caption_queries(captions, meta, encode_batch)
    if len(queries.vectors) == 0:
        raise DataError("no held-out caption has a known word; nothing to evaluate")
    return RetrievalReport(
        relevance=queries.relevance, distance=distance.name, ks=list(ks), num_images=int(len(image_emb)),
        num_captions=int(len(queries.vectors)),
        metrics=cross_modal_report(image_emb, queries.vectors, queries.caption_labels, queries.image_labels, ks,
                                   distance),
        chance=chance_report(queries.caption_labels, queries.image_labels, ks),
        zero_shot=zero_shot_report(image_emb, captions, meta, encode_batch, ks, distance))


def zero_shot_report(image_emb: np.ndarray, captions: Sequence[Sequence[str]], meta: Sequence[dict],
                     encode_batch: Callable, ks: Sequence[int] = (1, 5, 10),
                     distance: Distance = L2) -> ZeroShotReport | None:
    """Text→image with the zero-shot class names as queries against every image; None without any."""
    if any("zero_shot_items" in m for m in meta):
        return zero_shot_items_report(image_emb, meta, encode_batch, ks, distance)
    held_out = zero_shot_classes(meta)
    if not held_out:
        return None
    names = class_names(meta, captions)
    queries = [names[label] for label in held_out]
    vectors, known, _ = encode_batch(queries)
    report = ZeroShotReport([ZeroShotQuery(int(label), names[label], bool(ok)) for label, ok in zip(held_out, known)],
                            num_images=int(len(image_emb)))
    if not known.any():  # e.g. word vectors trained on the training captions never saw these names
        return report
    labels, image_labels = np.asarray(held_out)[known], image_classes(meta)
    result = retrieval_metrics(vectors[known], image_emb, labels, image_labels, ks=ks, distance=distance)
    chance = chance_report(labels, image_labels, ks)
    report.metrics = {f"text_to_image/{name}": float(value) for name, value in result.as_dict().items()}
    report.chance = {key: value for key, value in chance.items() if key.startswith("text_to_image/")}
    return report


def zero_shot_items_report(image_emb: np.ndarray, meta: Sequence[dict], encode_batch: Callable,
                           ks: Sequence[int] = (1, 5, 10), distance: Distance = L2) -> ZeroShotReport:
    """Zero-shot retrieval on caption data: each item name held out of training (``meta["zero_shot_items"]``,
    e.g. "a sandal") is a text query, and every image showing that item is relevant to it.

    An image may show several held-out items, so each query is scored on its own (relevant: label 1) and
    the metrics are averaged over queries; MedR is the median of the queries' first relevant ranks.
    """
    names = sorted({name for m in meta for name in m.get("zero_shot_items", ())})
    vectors, known, _ = encode_batch(names)
    report = ZeroShotReport([ZeroShotQuery(number, name, bool(ok)) for number, (name, ok) in
                             enumerate(zip(names, known))], num_images=int(len(image_emb)))
    per_query, chances = [], []
    for number, name in enumerate(names):
        if not known[number]:
            continue
        relevant = np.asarray([int(name in m.get("zero_shot_items", ())) for m in meta])
        result = retrieval_metrics(vectors[number:number + 1], image_emb, np.ones(1, dtype=int), relevant, ks=ks,
                                   distance=distance).as_dict()
        per_query.append(result)
        chances.append(chance_report(np.ones(1, dtype=int), relevant, ks))
    if not per_query:
        return report
    metrics = {key: float(np.mean([q[key] for q in per_query])) for key in per_query[0] if key != "num_queries"}
    metrics["MedR"] = float(np.median([q["MedR"] for q in per_query]))
    metrics["num_queries"] = float(len(per_query))
    report.metrics = {f"text_to_image/{key}": value for key, value in metrics.items()}
    report.chance = {key: float(np.mean([c[key] for c in chances])) for key in chances[0]
                     if key.startswith("text_to_image/")}
    return report


def recall_curve(image_emb: np.ndarray, captions: Sequence[Sequence[str]], meta: Sequence[dict],
                 encode_batch: Callable, max_k: int, distance: Distance = L2) -> dict[str, list[float]]:
    """R@K for K = 1..min(max_k, images) in both directions: ``{"text_to_image": [R@1, R@2, …], …}``."""
    queries = caption_queries(captions, meta, encode_batch)
    ks = range(1, max(1, min(int(max_k), len(image_emb))) + 1)
    report = cross_modal_report(image_emb, queries.vectors, queries.caption_labels, queries.image_labels, tuple(ks),
                                distance)
    return {direction: [report[f"{direction}/R@{k}"] for k in ks] for direction in DIRECTIONS}


def top_images(image_emb: np.ndarray, queries: Sequence[str], encode_query: Callable, distance: Distance, k: int,
               keys: Sequence[str]) -> dict[str, list[str]]:
    """The keys of the ``k`` best images per text query (a query with no known word gets an empty list)."""
    found, items = {}, distance.to_search_space(image_emb)
    for query in queries:
        try:
            vector = distance.to_search_space(encode_query(query))
        except QueryError:
            found[query] = []
            continue
        if distance.faiss_metric == "l2":
            scores = -np.square(items - vector[None, :]).sum(axis=1)
        else:
            scores = items @ vector
        found[query] = [keys[i] for i in np.argsort(-scores, kind="stable")[:k]]
    return found


def full_report(image_emb: np.ndarray, keys: Sequence[str], captions: Sequence[Sequence[str]], meta: Sequence[dict],
                caption_encoder, *, ks: Sequence[int], distance: Distance, max_k: int, queries: Sequence[str],
                top_k: int) -> HeldOutEvaluation:
    """:func:`evaluate_embeddings` plus the R@K curve and the top images of example queries."""
    report = evaluate_embeddings(image_emb, captions, meta, caption_encoder.encode_batch, ks, distance)
    examples = top_images(image_emb, queries, caption_encoder.encode_query, distance, top_k, keys)
    return HeldOutEvaluation(
        metrics=report.metrics, chance=report.chance, zero_shot=report.zero_shot, relevance=report.relevance,
        num_captions=report.num_captions,
        recall_curve=recall_curve(image_emb, captions, meta, caption_encoder.encode_batch, max_k, distance),
        examples=examples, example_matches=example_matches(examples, keys, captions, meta))


def example_matches(examples: dict[str, list[str]], keys: Sequence[str], captions: Sequence[Sequence[str]],
                    meta: Sequence[dict]) -> dict[str, list[bool]]:
    """Per example hit: is the query one of the image's captions or its class name (case-insensitive)?"""
    names = class_names(meta, captions) if image_classes(meta) is not None else {}
    row = {key: i for i, key in enumerate(keys)}
    matches = {}
    for query, found in examples.items():
        text = query.strip().lower()
        matches[query] = [text in {c.strip().lower() for c in captions[row[key]]}
                          or text == names.get(int(meta[row[key]].get("label", -1)), "").lower() for key in found]
    return matches


# -- images → embeddings -------------------------------------------------------------------------
def model_embeddings(model, shards: Sequence[str], split: str = "val", device: str = "cpu") -> EncodedCollection:
    """A loaded checkpoint's search-space embeddings of every image of ``shards`` (in order).

    A frozen backbone reuses the run's feature cache when it has one; a fine-tuned one encodes anew.
    """
    config = model.config
    encoder = model.encoder
    if not config.model.freeze_backbone:
        return encode_shards(shards, model.embed_images, eval_transform(config.data.image_size, encoder.mean,
                                                                        encoder.std), device=device)
    cache = config.train.feature_cache_dir if config.train.cache_features else None
    collection = split_features(shards, split, encoder.features, model_config=config.model,
                                image_size=config.data.image_size, mean=encoder.mean, std=encoder.std,
                                cache_dir=cache, device=device)
    embeddings = model.embed_features(collection.vectors.to(device)).float().cpu()
    return dataclasses.replace(collection, vectors=embeddings)


def evaluate_run(run_dir: str | Path, *, checkpoint: str = LAST_CHECKPOINT, shards: str | Path | None = None,
                 split: str = "val", ks: tuple[int, ...] | None = None, device: str = "cpu") -> CheckpointReport:
    """The evaluation report of one checkpoint of a run on ``split`` of its (or other) shards."""
    path = RunDir(run_dir).checkpoint(checkpoint)
    model = load_checkpoint(path, device=device)
    shard_dir = Path(shards) if shards is not None else Path(model.config.data.shards or model.config.data.shard_dir)
    files = list_shards(shard_dir if shards is not None else model.config.data, split)
    collection = model_embeddings(model, files, split, device=device)
    report = evaluate_embeddings(collection.vectors.numpy(), collection.captions, collection.meta,
                                 model.caption_encoder.encode_batch, ks or model.config.train.ks,
                                 model.loss.distance)
    return CheckpointReport(str(path), model.epoch, str(shard_dir), split, report)


@dataclass
class HeldOutSplit:
    """A held-out split as every compared model sees it: pooled backbone features plus captions and metadata."""

    shards: list[str]
    features: torch.Tensor  # (N, F) features of the config's backbone
    keys: list[str]
    captions: list[list[str]]
    meta: list[dict]
    classifier: torch.nn.Module | None  # the backbone's ImageNet head, when its weights ship one


def load_held_out(config, split: str = "val") -> HeldOutSplit:
    """Backbone features of a split of ``config``'s shards, through its feature cache (computed once)."""
    from retrieval.models import create_backbone  # models import torchvision: only when needed

    shards = list_shards(config.data, split)
    backbone = create_backbone(config.model.backbone, config.model.weights)
    collection = split_features(shards, split, backbone.module.eval(), model_config=config.model,
                                image_size=config.data.image_size, mean=backbone.mean, std=backbone.std,
                                cache_dir=config.train.feature_cache_dir)
    return HeldOutSplit(shards, collection.vectors, collection.keys, collection.captions, collection.meta,
                        backbone.classifier)


def check_metric_name(name: str, ks: Sequence[int], where: str) -> None:
    """One-line ConfigError unless ``name`` is a metric these reports hold, e.g. ``text_to_image/R@5``."""
    direction, _, score = name.partition("/")
    valid = table_metrics(ks) + ["MeanR"]
    if direction not in DIRECTIONS or score not in valid:
        raise ConfigError(f"{where}: {name!r} must be text_to_image/ or image_to_text/ followed by one of "
                          f"{', '.join(valid)}")


# -- text table ------------------------------------------------------------------------------------
def table_metrics(ks: Sequence[int]) -> list[str]:
    """The metric columns of a table for these K: R@K, P@K, mAP, MedR."""
    return [f"R@{k}" for k in ks] + [f"P@{k}" for k in ks] + ["mAP", "MedR"]


def format_report(report: RetrievalReport) -> str:
    """A text table: one row per direction and its chance level; zero-shot rows when present."""
    columns = table_metrics(report.ks)
    header = f"{'':<26}" + "".join(f"{name:>9}" for name in columns)
    lines = [f"relevance by {report.relevance}: {report.num_captions} captions, {report.num_images} images", header]

    def row(label: str, values: dict, direction: str) -> str:
        cells = []
        for name in columns:
            value = values.get(f"{direction}/{name}")
            cells.append("" if value is None else f"{value:.1f}" if name == "MedR" else f"{value:.3f}")
        return f"{label:<26}" + "".join(f"{cell:>9}" for cell in cells)

    for direction in DIRECTIONS:
        lines.append(row(direction, report.metrics, direction))
        lines.append(row("  chance", report.chance, direction))
    zero_shot = report.zero_shot
    if zero_shot is not None:
        names = ", ".join(query.name for query in zero_shot.queries)
        if zero_shot.metrics:
            lines.append(f"zero-shot text→image (queries = held-out class names: {names}; all images):")
            lines.append(row("text_to_image (zero-shot)", zero_shot.metrics, "text_to_image"))
            lines.append(row("  chance", zero_shot.chance or {}, "text_to_image"))
        else:
            lines.append(f"zero-shot text→image: not evaluated, no held-out class name has a known word ({names})")
    return "\n".join(lines)
