"""Word-vector loading (all formats + packaged GloVe), caption Word2Vec, fingerprint, save."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gensim.models import KeyedVectors, Word2Vec

from retrieval.errors import ConfigError, DataError
from retrieval.text import (
    VECTOR_KINDS,
    load_word_vectors,
    save_word_vectors,
    train_caption_word2vec,
    vectors_fingerprint,
)

WORDS = ["cat", "dog", "red", "snow"]
VECTORS = np.array(
    [[0.5, -1.25, 2.0], [1.0, 0.0, -0.75], [-2.5, 3.0, 0.125], [0.0, 0.25, 1.5]], dtype=np.float32
)
CAPTIONS = [
    "a dog runs on the snow",
    "a red cat sleeps on a red sofa",
    "two dogs play in the snow",
    "a cat and a dog on the grass",
] * 5


def toy_kv() -> KeyedVectors:
    kv = KeyedVectors(vector_size=3)
    kv.add_vectors(WORDS, VECTORS)
    return kv


def assert_toy(kv: KeyedVectors, n: int = len(WORDS)) -> None:
    assert kv.index_to_key == WORDS[:n]
    np.testing.assert_array_equal(kv.vectors, VECTORS[:n])


def write_glove_text(path) -> None:
    lines = [" ".join([w] + [repr(float(x)) for x in v]) for w, v in zip(WORDS, VECTORS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_glove_text(tmp_path):
    write_glove_text(tmp_path / "g.txt")
    assert_toy(load_word_vectors("glove-text", tmp_path / "g.txt"))
    assert_toy(load_word_vectors("glove-text", str(tmp_path / "g.txt"), limit=2), n=2)


@pytest.mark.parametrize("kind, binary", [("word2vec-text", False), ("word2vec-binary", True)])
def test_word2vec_formats(tmp_path, kind, binary):
    path = tmp_path / "w2v"
    toy_kv().save_word2vec_format(str(path), binary=binary)
    assert path.read_bytes().startswith(b"4 3\n")
    assert_toy(load_word_vectors(kind, path))


def test_gensim_keyedvectors_and_save_word_vectors(tmp_path):
    path = tmp_path / "sub" / "vectors.kv"
    save_word_vectors(toy_kv(), path)
    assert os.listdir(path.parent) == ["vectors.kv"]  # one file, no temp or side files
    assert_toy(load_word_vectors("gensim", path))
    assert_toy(load_word_vectors("gensim", path, limit=3), n=3)


def test_gensim_full_word2vec(tmp_path):
    model = Word2Vec([c.split() for c in CAPTIONS], vector_size=4, min_count=1, epochs=1, workers=1, seed=1)
    model.save(str(tmp_path / "w2v.model"))
    kv = load_word_vectors("gensim", tmp_path / "w2v.model")
    assert kv.index_to_key == model.wv.index_to_key
    np.testing.assert_array_equal(kv.vectors, model.wv.vectors)


@pytest.mark.parametrize(
    "kind, content, reason",
    [
        ("glove-text", b"", "is empty"),
        ("glove-text", b"cat 0.1 0.2\ndog 0.3 abc\n", "could not convert"),
        ("glove-text", b"cat 0.1 0.2\ndog 0.3\n", "line 2 has 1 values, expected 2"),  # gensim broadcasts
        ("glove-text", b"caf\xe9 0.1 0.2\n", "UnicodeDecodeError"),
        ("word2vec-text", b"cat 0.1 0.2\n", "invalid literal"),
        ("word2vec-text", b"3 2\ncat 0.1 0.2\ndog 0.3 0.4\n", "unexpected end of input"),
        ("word2vec-text", b"2 2\ncat 0.1 0.2\ndog 0.3 0.4 0.5\n", "line 3 has 3 values, expected 2"),
        ("word2vec-binary", b"2 4\ncat \x00\x00", "unexpected end of input"),
        ("gensim", b"hello world", "not a gensim"),
    ],
)
def test_malformed_file_is_one_line_data_error(tmp_path, kind, content, reason):
    path = tmp_path / "bad-vectors.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_word_vectors(kind, path)
    message = str(err.value)
    assert str(path) in message and reason in message and "\n" not in message


def test_missing_file_unknown_kind_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.txt$"):
        load_word_vectors("glove-text", tmp_path / "nope.txt")
    with pytest.raises(ConfigError) as err:
        load_word_vectors("fasttext", tmp_path / "x")
    assert all(kind in str(err.value) for kind in VECTOR_KINDS)
    with pytest.raises(ConfigError, match="needs a path"):
        load_word_vectors("word2vec-binary")


def write_glove_package_dir(root, words, vectors) -> None:
    root.mkdir()
    pq.write_table(pa.table({"index": words}), root / "glove_6B_index.parquet")
    np.save(root / "glove_6B_50d_emb.npy", np.asfortranarray(vectors))  # the package ships Fortran order


def test_glove_package_layout_from_directory(tmp_path):
    write_glove_package_dir(tmp_path / "ok", WORDS, VECTORS)
    assert_toy(load_word_vectors("glove-6b-50d", tmp_path / "ok"))
    assert_toy(load_word_vectors("glove-6b-50d", tmp_path / "ok", limit=2), n=2)
    write_glove_package_dir(tmp_path / "bad", WORDS[:3], VECTORS)
    with pytest.raises(DataError, match="shape \\(4, 3\\) but .* lists 3 words"):
        load_word_vectors("glove-6b-50d", tmp_path / "bad")
    with pytest.raises(DataError, match="GloVe file not found"):
        load_word_vectors("glove-6b-50d", tmp_path / "missing")


def test_packaged_glove():
    kv = load_word_vectors()
    assert kv.vectors.shape == (400000, 50) and kv.vectors.dtype == np.float32
    assert load_word_vectors("glove-6b-50d") is kv  # cached in-process
    assert not kv.vectors.flags.writeable
    # Row 0 is "the", with the published glove.6B.50d values.
    assert kv.index_to_key[0] == "the"
    np.testing.assert_allclose(kv["the"][:3], [0.418, 0.24968, -0.41242])
    assert kv.most_similar(positive=["king", "woman"], negative=["man"], topn=1)[0][0] == "queen"
    assert "cat" in [w for w, _ in kv.most_similar("dog", topn=3)]
    assert kv.similarity("snow", "winter") > kv.similarity("snow", "economy")


def test_caption_word2vec_is_deterministic():
    first = train_caption_word2vec(CAPTIONS, vector_size=8, epochs=5)
    second = train_caption_word2vec(CAPTIONS, vector_size=8, epochs=5)
    assert first.index_to_key == second.index_to_key
    np.testing.assert_array_equal(first.vectors, second.vectors)
    assert {"dog", "snow", "red", "cat"} <= set(first.key_to_index)
    other_seed = train_caption_word2vec(CAPTIONS, vector_size=8, epochs=5, seed=1)
    assert not np.array_equal(other_seed.vectors, first.vectors)


@pytest.mark.slow
def test_caption_word2vec_is_identical_in_another_process():
    """Python's salted str hash differs per process; the crc32 hashfxn must make that irrelevant."""
    here = vectors_fingerprint(train_caption_word2vec(CAPTIONS, vector_size=8, epochs=5))
    code = (
        "from retrieval.text import train_caption_word2vec, vectors_fingerprint\n"
        f"print(vectors_fingerprint(train_caption_word2vec({CAPTIONS!r}, vector_size=8, epochs=5)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here


def test_caption_word2vec_without_words():
    with pytest.raises(DataError, match="no words"):
        train_caption_word2vec(["...", ""])
    with pytest.raises(DataError, match="occurs 50 times"):
        train_caption_word2vec(CAPTIONS, min_count=50)


def test_vectors_fingerprint():
    kv = toy_kv()
    digest = vectors_fingerprint(kv)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert vectors_fingerprint(toy_kv()) == digest
    changed = toy_kv()
    changed.vectors[2, 1] += 0.001
    assert vectors_fingerprint(changed) != digest
    reordered = KeyedVectors(vector_size=3)
    reordered.add_vectors(WORDS[::-1], VECTORS)
    assert vectors_fingerprint(reordered) != digest
