"""Sentence-encoder targets on a tiny randomly initialised BERT written here (no real weights)."""

from __future__ import annotations

import json
import string
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from retrieval.checkpoint import load_checkpoint  # noqa: E402
from retrieval.config import TextConfig  # noqa: E402
from retrieval.errors import ConfigError, DataError, QueryError  # noqa: E402
from retrieval.targets import build_caption_encoder, restore_caption_encoder  # noqa: E402
from retrieval.text.sentence import SentenceEncoder, packaged_minilm_dir, read_sentence_settings  # noqa: E402
from retrieval.train import fit  # noqa: E402
from tests.conftest import demo_config  # noqa: E402

WORDS = ["a", "the", "dog", "cat", "man", "on", "of", "with", "table", "pizza", "runs", "red", "bus", "and"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert(folder: Path, seed: int = 0, sentence_layout: bool = True) -> Path:
    """A 1-layer, 32-d BERT with a WordPiece vocabulary that spells any lowercase word letter by letter."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase + string.digits)
    vocab = SPECIALS + WORDS + letters + [f"##{c}" for c in letters] + [",", ".", "-", "'"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformers.BertModel(config).save_pretrained(folder)
    if sentence_layout:  # what sentence-transformers saves beside the model, as all-MiniLM-L6-v2 has
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def encoder(bert_dir: Path) -> SentenceEncoder:
    return SentenceEncoder(bert_dir, progress=False)


def manual_mean_pool(folder: Path, text: str) -> np.ndarray:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[0]
    return hidden.mean(dim=0).numpy()


def test_settings_from_the_folder(encoder: SentenceEncoder, tmp_path: Path) -> None:
    assert encoder.dim == 32 and encoder.normalize and encoder.max_length == 48 and encoder.vectors is None
    plain = write_tiny_bert(tmp_path / "plain", sentence_layout=False)
    assert read_sentence_settings(plain).normalize is False
    (plain / "modules.json").write_text(json.dumps([{"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ConfigError, match="module 'Dense' is not supported"):
        read_sentence_settings(plain)


def test_encode_batch_shapes_mask_and_stats(encoder: SentenceEncoder, bert_dir: Path) -> None:
    captions = ["a dog runs", "  ", "A red bus ☃ on the table", "a dog runs"]
    vectors, mask, stats = encoder.encode_batch(captions)
    assert vectors.shape == (4, 32) and vectors.dtype == np.float32
    assert mask.tolist() == [True, False, True, True]
    np.testing.assert_allclose(np.linalg.norm(vectors[mask], axis=1), 1.0, rtol=1e-5)
    assert not vectors[1].any() and np.array_equal(vectors[0], vectors[3])
    assert stats.captions == 4 and stats.empty_captions == ["  "]
    assert stats.unknown_tokens == 1 and stats.unknown_words == {"☃": 1}
    assert stats.total_tokens == 3 + 7 + 3  # word pieces, special tokens excluded
    expected = manual_mean_pool(bert_dir, "a dog runs")
    np.testing.assert_allclose(vectors[0], expected / np.linalg.norm(expected), rtol=1e-4, atol=1e-5)
    alone = encoder.encode("A red bus ☃ on the table")
    np.testing.assert_allclose(alone, vectors[2], atol=1e-5)  # batching and padding do not change a vector
    again, _, _ = encoder.encode_batch(captions)
    assert np.array_equal(again, vectors)  # deterministic


def test_queries_and_arithmetic(encoder: SentenceEncoder) -> None:
    with pytest.raises(QueryError, match="empty query"):
        encoder.encode_query(" ")
    dog, cat = encoder.encode("dog"), encoder.encode("cat")
    total = dog - cat
    np.testing.assert_allclose(encoder.encode_arithmetic("dog - cat"), total / np.linalg.norm(total), atol=1e-5)
    with pytest.raises(QueryError, match="cancels out"):
        encoder.encode_arithmetic("dog - dog")


def test_state_dict_fingerprint_and_targets(encoder: SentenceEncoder, bert_dir: Path, tmp_path: Path) -> None:
    state = encoder.state_dict()
    assert state["kind"] == "sentence-transformer" and state["fingerprint"] == encoder.fingerprint()
    restored = SentenceEncoder.from_state_dict(bert_dir, state)
    assert restored.fingerprint() == encoder.fingerprint() and restored.normalize
    other = write_tiny_bert(tmp_path / "other", seed=1)
    assert SentenceEncoder(other).fingerprint() != encoder.fingerprint()
    with pytest.raises(DataError, match="differs from the one this model was trained with"):
        SentenceEncoder.from_state_dict(other, state)
    text = TextConfig(vectors="sentence-transformer", vectors_path=str(bert_dir))
    built = build_caption_encoder(text, tmp_path, [])
    assert isinstance(built, SentenceEncoder) and built.fingerprint() == encoder.fingerprint()
    assert restore_caption_encoder(text, tmp_path, built.state_dict()).fingerprint() == encoder.fingerprint()
    with pytest.raises(ConfigError, match="text.weighting: 'tfidf' does not apply"):
        build_caption_encoder(TextConfig(vectors="sentence-transformer", vectors_path=str(bert_dir),
                                         weighting="tfidf"), tmp_path, [])
    with pytest.raises(DataError, match="sentence model folder not found"):
        SentenceEncoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a transformers model folder"):
        SentenceEncoder(tmp_path / "empty")


def test_packaged_dir_extracts_once(bert_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import retrieval.text.sentence as sentence

    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in bert_dir.rglob("*"):
            if path.is_file():
                zf.write(path, path.relative_to(bert_dir).as_posix())
    monkeypatch.setattr(sentence, "packaged_minilm_zip", lambda: archive)
    folder = packaged_minilm_dir(tmp_path / "cache")
    assert (folder / "config.json").is_file() and (folder / "1_Pooling" / "config.json").is_file()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert packaged_minilm_dir(tmp_path / "cache") == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no temp folders left
    monkeypatch.undo()
    monkeypatch.setattr(sentence.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install -e \.\[sentence\]"):
        packaged_minilm_dir(tmp_path / "cache")


@pytest.mark.slow
def test_fit_and_reload(bert_dir: Path, sample_shards: Path, tmp_path: Path) -> None:
    config = demo_config(tmp_path / "run", f"data.shard_dir={sample_shards}", "data.image_size=64",
                         "text.vectors=sentence-transformer", f"text.vectors_path={bert_dir}",
                         "train.epochs=2", "train.eval_every=1")
    result = fit(config, progress=False)
    assert len(result.history) == 2 and "text_to_image/R@5" in result.final_metrics
    model = load_checkpoint(result.last_checkpoint)
    assert isinstance(model.caption_encoder, SentenceEncoder) and model.caption_encoder.dim == 32
    assert model.vectors_fingerprint == model.caption_encoder.fingerprint()
    query = torch.from_numpy(model.caption_encoder.encode_query("a dog on a table"))
    assert query.shape == (32,)
    features = torch.zeros(1, 1280)
    assert model.embed_features(features).shape == (1, 32)
