"""Index and search over a trained run: results equal brute force; bad queries and stale indexes refused."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.checkpoint import load_checkpoint
from retrieval.config import LossConfig
from retrieval.data import iter_samples, list_shards
from retrieval.errors import ConfigError, DataError, QueryError
from retrieval.indexing import build_index
from retrieval.rundir import RunDir
from retrieval.search import Searcher
from retrieval.text import join_terms, parse_arithmetic


def brute_force_keys(searcher: Searcher, query_vector: np.ndarray, k: int) -> list[str]:
    """Top-k keys by exact L2 distance over every indexed image embedding, computed from scratch."""
    from retrieval.data import iter_samples

    keys, embeddings = [], []
    for sample in iter_samples(list_shards(searcher.model.config.data.shard_dir, "val")):
        keys.append(sample.key)
        pixels = searcher.transform(sample.image).unsqueeze(0)
        embeddings.append(searcher.model.embed_images(pixels)[0].numpy())
    distances = ((np.stack(embeddings) - query_vector) ** 2).sum(axis=1)
    return [keys[i] for i in np.argsort(distances, kind="stable")[:k]]


def test_text_to_image_equals_brute_force(searcher):
    query = "a pizza on a table"
    hits = searcher.text_to_image(query, k=5)
    assert [h.key for h in hits] == brute_force_keys(searcher, searcher.text_vector(query), 5)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h.thumbnail and h.captions for h in hits)


def thumbnail_picture(searcher, key):
    """The index's own thumbnail of an image, as a picture to query with."""
    return Image.open(io.BytesIO(searcher.thumbnail(key)))


def test_image_to_text_returns_captions_and_words(searcher):
    first = searcher.images.metadata_for([0])[0]
    found = searcher.image_to_text(thumbnail_picture(searcher, first["key"]), k=4)
    assert len(found.captions) == 4 and len(found.words) == 4
    assert all(isinstance(hit.text, str) and hit.text for hit in found.captions + found.words)


def test_image_to_image_finds_itself_first(searcher):
    first = searcher.images.metadata_for([0])[0]
    assert searcher.image_to_image(thumbnail_picture(searcher, first["key"]), k=1)[0].key == first["key"]


def test_word_arithmetic_is_the_signed_sum(searcher):
    encoder = searcher.model.caption_encoder
    expected = encoder.encode("dog") - encoder.encode("grass") + encoder.encode("snow")
    if encoder.normalize:  # the demo model works on unit vectors: terms and sum are normalised
        expected = expected / np.linalg.norm(expected)
    np.testing.assert_allclose(searcher.text_vector("dog - grass + snow"), expected, rtol=1e-5, atol=1e-6)
    assert len(searcher.text_to_image("dog - grass + snow", k=3)) == 3


def test_query_without_known_words_names_them(searcher):
    with pytest.raises(QueryError, match="qzxv") as error:
        searcher.text_to_image("qzxv blorpt", k=3)
    assert "\n" not in str(error.value)


def test_index_from_another_model_is_refused(searcher, trained_run, tmp_path):
    other = tmp_path / "other.pt"
    state = torch.load(trained_run.best_checkpoint, weights_only=False)
    state["epoch"] = -1  # any change gives the checkpoint another identity
    torch.save(state, other)
    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    shutil.copy(other, run.checkpoint("best.pt"))
    with pytest.raises(ConfigError, match="model") as error:
        Searcher.open(run.checkpoint("best.pt"), searcher.index_dir)
    assert "\n" not in str(error.value)


def copy_checkpoint(trained_run, folder, change):
    """The trained run's best checkpoint, changed by ``change(state)``, as ``folder/checkpoints/best.pt``."""
    state = torch.load(trained_run.best_checkpoint, weights_only=False)
    change(state)
    path = folder / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


@pytest.mark.slow
def test_index_metric_is_honoured_by_the_index_and_the_search(trained_run, sample_shards, tmp_path):
    def cosine(state):
        state["config"]["index"]["metric"] = "cosine"  # the demo's triplet loss compares by l2

    path = copy_checkpoint(trained_run, tmp_path, cosine)
    model = load_checkpoint(path)
    shards = list_shards(sample_shards, "val")
    out = build_index(model, shards, tmp_path / "index", metric=model.config.index.metric)
    searcher = Searcher.open(path, out)
    assert searcher.images.metric == searcher.captions.metric == "ip" and searcher.distance.name == "cosine"
    query = searcher.text_vector("a pizza on a table")
    unit = query / np.linalg.norm(query)
    np.testing.assert_allclose(searcher._query(query)[0], unit, rtol=1e-6)
    hits = searcher.text_to_image("a pizza on a table", k=25)
    embeddings = {}
    for sample in iter_samples(shards):
        vector = model.embed_images(searcher.transform(sample.image).unsqueeze(0))[0].numpy()
        embeddings[sample.key] = float(vector @ unit / np.linalg.norm(vector))
    assert [h.key for h in hits] == sorted(embeddings, key=lambda key: -embeddings[key])
    assert [h.score for h in hits] == pytest.approx([embeddings[h.key] for h in hits], abs=1e-5)
    stale = build_index(model, shards, tmp_path / "stale", metric="l2")  # not what the run's config says
    with pytest.raises(DataError, match="rebuild") as error:
        Searcher.open(path, stale)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="index.metric"):
        build_index(model, shards, tmp_path / "bad", metric="euclid")


def test_checkpoints_in_the_old_loss_format_still_load(trained_run, tmp_path):
    def old_triplet(state):  # before loss settings sat beside the name
        state["config"]["loss"] = {"name": "triplet", "margin": 0.4, "squared": False, "negatives": "hard",
                                   "params": {}}

    model = load_checkpoint(copy_checkpoint(trained_run, tmp_path / "triplet", old_triplet))
    # renamed on load: hard → farthest
    assert model.config.loss == LossConfig("triplet", {"margin": 0.4, "squared": False, "negatives": "farthest"})
    assert model.loss.margin == 0.4
    reference = load_checkpoint(trained_run.best_checkpoint)
    pixels = torch.rand(2, 3, 64, 64)
    assert torch.equal(model.embed_images(pixels), reference.embed_images(pixels))

    def old_sigmoid(state):  # the triplet fields were written for every loss, and ignored by the others
        state["config"]["loss"] = {"name": "sigmoid-ce", "margin": 1.0, "squared": False, "negatives": "hard",
                                   "params": {}}
        state["loss"] = {"low": torch.full((50,), -2.0), "span": torch.full((50,), 4.0)}

    model = load_checkpoint(copy_checkpoint(trained_run, tmp_path / "sigmoid", old_sigmoid))
    assert model.config.loss == LossConfig("sigmoid-ce", {}) and model.loss.low.shape == (50,)
    outputs = reference.encoder(pixels)
    assert torch.allclose(model.embed_images(pixels), torch.sigmoid(outputs) * 4.0 - 2.0)


@pytest.mark.parametrize(
    "query, terms",
    [
        ("dog -cat", [(1, "dog"), (-1, "cat")]),
        ("dog- cat", [(1, "dog"), (-1, "cat")]),
        ("dog - cat", [(1, "dog"), (-1, "cat")]),
        ("dog+cat", [(1, "dog"), (1, "cat")]),
        ("dog\u2212cat", [(1, "dog"), (-1, "cat")]),
        ("t-shirt", [(1, "t-shirt")]),
        ("-dog", [(-1, "dog")]),
    ],
)
def test_search_reads_queries_with_the_parser_grammar(searcher, query, terms):
    """Search and ``parse_arithmetic`` agree: the query vector is the signed sum of the parsed terms."""
    assert parse_arithmetic(query) == terms
    encoder = searcher.model.caption_encoder
    vector = searcher.text_vector(query)
    if terms == [(1, query)]:  # one term: exactly the caption path
        np.testing.assert_array_equal(vector, encoder.encode_query(query))
        return
    expected = sum(sign * encoder.encode(term).astype(np.float64) for sign, term in terms)
    if encoder.normalize:
        expected = expected / np.linalg.norm(expected)
    np.testing.assert_allclose(vector, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(vector, searcher.text_vector(join_terms(terms)))


def test_image_plus_text_moves_the_image_by_the_parsed_words(searcher):
    first = searcher.images.metadata_for([0])[0]
    image = thumbnail_picture(searcher, first["key"])
    moved = searcher.image_vector(image) + searcher.text_vector("snow - grass")
    expected = [hit.key for hit in searcher.images_near(moved, 4)]
    for words in ("+ snow - grass", "snow -grass", "\uff0bsnow\u2212grass"):
        assert [hit.key for hit in searcher.image_plus_text(image, words, k=4)] == expected
    with pytest.raises(QueryError, match="missing term"):
        searcher.image_plus_text(image, "+ snow -", k=4)
