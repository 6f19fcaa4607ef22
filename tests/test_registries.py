"""Every registered extension point, looped over its registry: data sources, text sides, index kinds, backbones.

Each loop first checks that it covers the whole registry, so a new entry without a case here fails.
(Every loss is covered in tests/test_losses.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from retrieval.config import TextConfig, config_from_dict, load_config
from retrieval.data import SOURCES, iter_samples, list_shards
from retrieval.data.prepare import prepare
from retrieval.data.sources import source_option_names
from retrieval.errors import ConfigError
from retrieval.index import AUTO_FLAT_MAX, INDEX_KINDS, VectorIndex, index_param_names
from retrieval.models import BACKBONES, ImageEncoder, create_backbone
from retrieval.targets import TEXT_SIDES, build_caption_encoder, restore_caption_encoder
from retrieval.text import save_word_vectors
from tests.test_fashion_mnist import fake_split, write_idx
from tests.test_shards import build_source
from tests.test_text_vectors import CAPTIONS, WORDS, toy_kv, write_glove_package_dir, write_glove_text


# -- data sources ------------------------------------------------------------------------------
def fashion_folder(root: Path) -> Path:
    folder = root / "fmnist"
    folder.mkdir()
    for prefix, per_class, seed in (("train", 6, 0), ("t10k", 3, 1)):
        images, labels = fake_split(per_class, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def file_source(kind: str) -> Callable[[Path], tuple[dict, int]]:
    def case(root: Path) -> tuple[dict, int]:
        kind_, path, options, expected = build_source(kind, root)
        return {"source": kind_, "path": str(path), "source_options": options, "split_by": "hash"}, len(expected)
    return case


def fashion_items(root: Path) -> tuple[dict, int]:
    options = {"limit_per_class": 2, "zero_shot_classes": ["bag"]}
    return {"source": "fashion-mnist", "path": str(fashion_folder(root)), "source_options": options}, 9 * 2 + 10 * 2


def fashion_scenes(root: Path) -> tuple[dict, int]:
    options = {"scene_count": 10, "limit_per_class": 2}
    return {"source": "fashion-mnist-scenes", "path": str(fashion_folder(root)), "source_options": options}, 10


SOURCE_CASES = {"jsonl": file_source("jsonl"), "csv": file_source("csv"), "coco": file_source("coco"),
                "img2dataset": file_source("img2dataset"), "fashion-mnist": fashion_items,
                "fashion-mnist-scenes": fashion_scenes}


def test_every_source_has_a_case():
    assert set(SOURCE_CASES) == set(SOURCES.names())


@pytest.mark.parametrize("kind", SOURCES.names())
def test_every_source_writes_shards_from_its_config(kind: str, tmp_path: Path):
    data, count = SOURCE_CASES[kind](tmp_path)
    config = config_from_dict({"data": {**data, "shard_dir": str(tmp_path / "shards"), "val_fraction": 0.4}})
    assert set(source_option_names(kind)) >= set(data["source_options"])
    manifest = prepare(config)
    assert sum(manifest.counts.values()) == count and manifest.source == f"{kind}:{data['path']}"
    shards = [shard for split in ("train", "val") for shard in list_shards(tmp_path / "shards", split)]
    samples = list(iter_samples(shards))
    assert len(samples) == count and len({s.key for s in samples}) == count
    assert all(s.captions and s.image.dtype == torch.uint8 and s.image.shape[0] == 3 for s in samples)  # RGB


@pytest.mark.parametrize("kind", SOURCES.names())
def test_every_source_refuses_an_option_it_lacks(kind: str):
    valid = ", ".join(source_option_names(kind)) or "none"
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"data.source={kind}", "data.split_by=split", "data.source_options.colour=red"])
    assert f"source {kind!r} takes no option colour; valid: {valid}" in str(error.value)
    assert "\n" not in str(error.value)


# -- text sides --------------------------------------------------------------------------------
def word_vector_case(kind: str) -> Callable[[Path], TextConfig]:
    def case(root: Path) -> TextConfig:
        path = root / "vectors"
        if kind == "glove-6b-50d":  # a folder in the layout of the packaged GloVe
            write_glove_package_dir(path, WORDS, toy_kv().vectors)
        elif kind == "glove-text":
            write_glove_text(path)
        elif kind == "gensim":
            save_word_vectors(toy_kv(), path)
        else:
            toy_kv().save_word2vec_format(str(path), binary=kind == "word2vec-binary")
        return TextConfig(vectors=kind, vectors_path=str(path), weighting="tfidf", normalize=True)
    return case


def caption_word2vec(root: Path) -> TextConfig:
    return TextConfig(vectors="word2vec-captions", weighting="tfidf", normalize=True, word2vec_dim=8,
                      word2vec_epochs=5)


def sentence_transformer(root: Path) -> TextConfig:
    pytest.importorskip("transformers")
    from tests.test_sentence_targets import write_tiny_bert

    return TextConfig(vectors="sentence-transformer", vectors_path=str(write_tiny_bert(root / "bert")),
                      normalize=True)


TEXT_CASES = {**{kind: word_vector_case(kind) for kind in
                 ("glove-6b-50d", "glove-text", "word2vec-binary", "word2vec-text", "gensim")},
              "word2vec-captions": caption_word2vec, "sentence-transformer": sentence_transformer}


def test_every_text_side_has_a_case():
    assert set(TEXT_CASES) == set(TEXT_SIDES.names())


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


@pytest.mark.parametrize("name", TEXT_SIDES.names())
def test_every_text_side_builds_encodes_and_round_trips(name: str, tmp_path: Path):
    text = TEXT_CASES[name](tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    encoder = build_caption_encoder(text, run_dir, CAPTIONS)
    vectors, known, _ = encoder.encode_batch(["a red cat", "a dog on the snow", ""])
    assert vectors.shape == (3, encoder.dim) and known.tolist() == [True, True, False]
    np.testing.assert_allclose(np.linalg.norm(vectors[:2], axis=1), 1.0, rtol=1e-5)  # text.normalize
    np.testing.assert_array_equal(encoder.encode("a red cat"), vectors[0])
    np.testing.assert_array_equal(encoder.encode_query("a dog on the snow"), vectors[1])
    cat, dog = encoder.encode("cat"), encoder.encode("dog")
    np.testing.assert_allclose(encoder.encode_arithmetic("cat - dog"), unit(cat - dog), atol=1e-5)

    fingerprint = encoder.fingerprint()
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert build_caption_encoder(text, run_dir, CAPTIONS).fingerprint() == fingerprint  # stable

    torch.save({"caption_encoder": encoder.state_dict()}, tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["caption_encoder"]
    restored = restore_caption_encoder(text, run_dir, state)
    assert restored.fingerprint() == fingerprint and restored.state_dict() == encoder.state_dict()
    np.testing.assert_array_equal(restored.encode_batch(["a red cat", "a dog on the snow"])[0], vectors[:2])


def test_word_vector_fingerprints_tell_vectors_apart(tmp_path: Path):
    text = TEXT_CASES["glove-text"](tmp_path)
    other = tmp_path / "other.txt"
    other.write_text((tmp_path / "vectors").read_text().replace("0.5", "0.25"))
    first = build_caption_encoder(text, tmp_path, CAPTIONS).fingerprint()
    changed = TextConfig(vectors="glove-text", vectors_path=str(other), weighting="tfidf", normalize=True)
    assert build_caption_encoder(changed, tmp_path, CAPTIONS).fingerprint() != first


# -- index kinds -------------------------------------------------------------------------------
def clustered(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim)).astype(np.float32) * 3
    return (centres[rng.integers(50, size=n)] + rng.standard_normal((n, dim))).astype(np.float32)


# A non-default value of every parameter of every kind, and how to read it back from the faiss index it makes
# and the VectorIndex built with it (what only shows after building: on-disk lists, auto's budget and target).
def _ivf(index: faiss.Index, built: VectorIndex) -> dict:
    return {"nlist": index.nlist, "nprobe": index.nprobe, "on_disk": built.on_disk}


PARAM_CASES: dict[str, tuple[dict, Callable[[faiss.Index, VectorIndex], dict]]] = {
    "flat": ({}, lambda index, built: {}),
    "ivf": ({"nlist": 20, "nprobe": 3, "on_disk": True}, _ivf),
    "ivf-pq": ({"nlist": 20, "nprobe": 3, "pq_m": 4, "on_disk": True},
               lambda index, built: {**_ivf(index, built), "pq_m": built.search_params["pq_m"]}),
    "hnsw": ({"hnsw_m": 8, "ef_construction": 50, "ef_search": 77},
             lambda index, built: {"hnsw_m": index.hnsw.nb_neighbors(1), "ef_construction": index.hnsw.efConstruction,
                                   "ef_search": index.hnsw.efSearch}),
    "auto": ({"nlist": 20, "nprobe": 3, "max_memory": 10**9, "min_recall": 0.5, "on_disk": True},
             lambda index, built: {**_ivf(index, built), "max_memory": built.build_info["max_memory"],
                                   "min_recall": built.build_info["min_recall"]}),
}
RECALL_FLOOR = {"ivf-pq": 0.8}  # product quantization loses some precision by design; the others reach 0.9
EXACT_KINDS = {"flat", "auto"}  # auto is exact below AUTO_FLAT_MAX items
def test_every_index_kind_has_a_case():
    assert set(PARAM_CASES) == set(INDEX_KINDS.names())


@pytest.mark.parametrize("kind", INDEX_KINDS.names())
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_every_index_kind_searches_like_brute_force(kind: str, metric: str):
    data = clustered(3_050, seed=1)
    base, queries = data[:3_000], data[3_000:]
    if metric == "ip":
        base, queries = base / np.linalg.norm(base, axis=1, keepdims=True), queries / np.linalg.norm(
            queries, axis=1, keepdims=True)
    index = VectorIndex.build(base, [{"i": i} for i in range(len(base))], kind=kind, metric=metric, stamp={})
    found = index.search(queries, 10)
    scores = queries.astype(np.float64) @ base.T.astype(np.float64)
    if metric == "l2":
        scores = 2 * scores - (queries.astype(np.float64) ** 2).sum(1)[:, None] - (base.astype(np.float64) ** 2).sum(1)
    exact = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    if kind in EXACT_KINDS:
        np.testing.assert_array_equal(found.ids, exact)
        np.testing.assert_allclose(found.scores, np.take_along_axis(scores, exact, axis=1), rtol=1e-4, atol=1e-3)
    else:
        recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found.ids, exact)])
        assert recall >= RECALL_FLOOR.get(kind, 0.9), (kind, metric, recall, index.search_params)


@pytest.mark.parametrize("kind", INDEX_KINDS.names())
def test_every_index_kind_applies_each_parameter_from_the_config(kind: str):
    values, read_back = PARAM_CASES[kind]
    assert set(values) == set(index_param_names(kind))  # every parameter is exercised
    config = load_config(None, [f"index.kind={kind}", *(f"index.{name}={value}" for name, value in values.items())])
    assert config.index.params == INDEX_KINDS.create(kind, **values)
    n = AUTO_FLAT_MAX if kind == "auto" else 3_000  # auto builds IVF from AUTO_FLAT_MAX items on
    built = VectorIndex.build(clustered(n), [{}] * n, kind=config.index.params, stamp={})
    assert read_back(config.index.params.make(16, faiss.METRIC_L2, n), built) == values
    searched = {name: value for name, value in values.items() if name in built.search_params}
    assert {name: built.search_params[name] for name in searched} == searched


@pytest.mark.parametrize("kind", INDEX_KINDS.names())
def test_every_index_kind_rejects_a_parameter_it_lacks(kind: str):
    valid = ", ".join(index_param_names(kind)) or "none"
    with pytest.raises(ConfigError) as error:
        VectorIndex.build(clustered(100), [{}] * 100, kind=kind, stamp={}, colour=1)
    assert f"index kind {kind!r} takes no parameter colour; valid: {valid}" in str(error.value)
    with pytest.raises(ConfigError, match=rf"unknown field\(s\) colour; valid: kind, metric, split and the "
                                          rf"parameters of index kind '{kind}': {valid}") as error:
        load_config(None, [f"index.kind={kind}", "index.colour=1"])
    assert "\n" not in str(error.value)
    built = VectorIndex.build(clustered(400), [{}] * 400, kind="flat" if kind == "auto" else kind, stamp={},
                              **({"nlist": 4} if kind in ("ivf", "ivf-pq") else {}))  # PQ trains on >= 256
    with pytest.raises(ConfigError, match="has no search parameter colour"):
        built.set_search_params(colour=1)


def test_index_parameters_round_trip_through_a_saved_config(tmp_path: Path):
    from retrieval.config import save_config

    config = load_config(None, ["index.kind=hnsw", "index.ef_search=64"])
    save_config(config, tmp_path / "config.yaml")
    assert "kind: hnsw\n  metric: auto\n  split: val\n  ef_search: 64\n" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml") == config
    with pytest.raises(ConfigError, match="ef_search must be a positive integer"):
        load_config(None, ["index.kind=hnsw", "index.ef_search=0"])
    with pytest.raises(ConfigError, match=r"index kind 'flat': none"):  # a stale parameter after switching kind
        load_config(tmp_path / "config.yaml", ["index.kind=flat"])


# -- backbones ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_trains_on_a_tiny_batch(name: str):
    torch.manual_seed(0)
    backbone = create_backbone(name, "random")
    encoder = ImageEncoder(backbone, out_dim=8, freeze_backbone=False).train()
    images = torch.randn(2, 3, 32, 32)
    features = encoder.features(images)
    assert features.shape == (2, backbone.feature_dim)
    embeddings = encoder(images)
    assert embeddings.shape == (2, 8) and torch.isfinite(embeddings).all()
    embeddings.square().sum().backward()
    head = {id(p) for p in backbone.classifier.parameters()} if backbone.classifier is not None else set()
    unused = [p for p in encoder.backbone.parameters() if p.grad is None]
    assert all(id(p) in head for p in unused)  # only an ImageNet head kept inside the module goes unused
    grads = [p.grad for p in encoder.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0  # the loss reaches the backbone
    if backbone.classifier is not None:  # ConSE applies the ImageNet head to the pooled features
        assert backbone.classifier(features.detach()).shape == (2, 1000)
