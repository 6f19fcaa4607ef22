"""Checkpoints: everything needed to embed images and queries exactly as during training.

The file holds only tensors and plain values and is read without running code (see
:mod:`retrieval.checkpoint_io`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from retrieval.checkpoint_io import plain_value, read_checkpoint_state, tensor_state
from retrieval.config import Config, TextConfig, config_from_dict, config_to_dict
from retrieval.errors import DataError
from retrieval.io import atomic_path
from retrieval.losses import CrossModalLoss, build_loss
from retrieval.models import ImageEncoder, create_encoder
from retrieval.negatives import RENAMED
from retrieval.rundir import RunDir
from retrieval.targets import restore_caption_encoder
from retrieval.text import TextEncoder
from retrieval.text.sentence import SENTENCE_KIND


def save_checkpoint(path: str | Path, *, config: Config, encoder: ImageEncoder, loss: CrossModalLoss,
                    caption_encoder: TextEncoder, epoch: int, metrics: dict, num_classes: int | None = None,
                    training: dict | None = None) -> None:
    """Write a checkpoint atomically (temp file + rename); every value is a tensor or JSON-like (see checkpoint_io).

    The text side is saved as its state and fingerprint. ``training`` (optimizer, schedule, RNG states,
    position) makes it a training state that ``retrieval train --resume`` continues from."""
    state = {
        "config": plain_value(config_to_dict(config), "config"),
        "encoder": tensor_state(encoder.state_dict(), "encoder"),
        "loss": tensor_state(loss.state_dict(), "loss"),
        "caption_encoder": plain_value(caption_encoder.state_dict(), "caption_encoder"),
        "vectors_fingerprint": plain_value(caption_encoder.fingerprint(), "vectors_fingerprint"),
        "num_classes": plain_value(num_classes, "num_classes"),
        "epoch": plain_value(epoch, "epoch"),
        "metrics": plain_value(metrics, "metrics"),
    }
    if training is not None:
        state["training"] = plain_value(training, "training")
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_training_state(path: str | Path, device: str = "cpu") -> dict:
    """A training state written by :func:`save_checkpoint` with ``training`` (read without running code)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"training state {file} does not exist")
    state = read_checkpoint_state(file, device)
    if not isinstance(state.get("training"), dict):
        raise DataError(f"checkpoint {file} holds no training state (optimizer, RNG states, position)")
    return state


def file_fingerprint(path: str | Path) -> str:
    """Short sha1 of a file's bytes: the identity of a checkpoint in index stamps."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@dataclass
class LoadedModel:
    """A trained encoder with the text side and loss it was trained with."""

    config: Config
    encoder: ImageEncoder
    loss: CrossModalLoss
    caption_encoder: TextEncoder
    vectors_fingerprint: str
    checkpoint_fingerprint: str
    epoch: int
    metrics: dict

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → search-space embeddings (B, D)."""
        self.encoder.eval()
        return self.loss.embed(self.encoder(images))

    @torch.no_grad()
    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, F) → search-space embeddings (B, D)."""
        self.encoder.eval()
        return self.loss.embed(self.encoder.embed_features(features))


def upgrade_saved_config(values: dict) -> dict:
    """A saved config in today's format (checkpoints written before loss settings sat beside the name).

    The old ``loss`` section had ``margin``, ``squared`` and ``negatives``, which only the triplet
    loss read (over any of the same name in ``params``), and ``params`` for every loss: this builds
    the loss those checkpoints were trained with. Negative samplers renamed since (``hard`` →
    ``farthest``, ``soft`` → ``far-random``) are read under their new names.
    """
    loss = values.get("loss")
    if not isinstance(loss, dict):
        return values
    if "params" in loss:
        settings = dict(loss.get("params") or {})
        if loss.get("name", "triplet") == "triplet":
            settings.update({key: loss[key] for key in ("margin", "squared", "negatives") if key in loss})
        loss = {"name": loss.get("name", "triplet"), **settings}
    if loss.get("name", "triplet") == "triplet" and loss.get("negatives") in RENAMED:
        loss = {**loss, "negatives": RENAMED[loss["negatives"]]}
    return {**values, "loss": loss} if loss is not values["loss"] else values


def _vectors_source(text: TextConfig, run: RunDir) -> str:
    """Where the text side of ``text`` is read from, for messages: the vectors file or model folder."""
    if text.vectors == SENTENCE_KIND:
        return f"sentence model {text.vectors_path or 'all-MiniLM-L6-v2 (packaged)'}"
    if text.vectors == "word2vec-captions":
        return f"word vectors {run.caption_word2vec}"
    return f"word vectors {text.vectors_path or f'{text.vectors} (packaged)'}"


def check_vectors(caption_encoder: TextEncoder, trained_with: str, text: TextConfig, run: RunDir) -> str:
    """The fingerprint of the text side actually loaded; one that differs from the one the model was trained
    with (``trained_with``, from the checkpoint) is refused, since every answer would silently change."""
    loaded = caption_encoder.fingerprint()
    if loaded != trained_with:
        raise DataError(f"{_vectors_source(text, run)} differ from the ones this model was trained with "
                        f"(fingerprint {loaded}, trained with {trained_with}); restore them or train again")
    return loaded


def load_checkpoint(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Rebuild encoder, loss and caption encoder from a checkpoint file (read without running code)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"checkpoint {file} does not exist; train a model first (retrieval train)")
    state = read_checkpoint_state(file, device)
    config = config_from_dict(upgrade_saved_config(state["config"]), str(file))
    caption_encoder = restore_caption_encoder(config.text, RunDir.of_checkpoint(file), state["caption_encoder"])
    fingerprint = check_vectors(caption_encoder, state["vectors_fingerprint"], config.text, RunDir.of_checkpoint(file))
    # The checkpoint holds every weight, so the backbone need not load its original file again.
    encoder = create_encoder(dataclasses.replace(config.model, weights="random"), caption_encoder.dim)
    encoder.load_state_dict(state["encoder"])
    loss = build_loss(config.loss, seed=config.train.seed, num_classes=state.get("num_classes"),
                      embedding_dim=caption_encoder.dim)
    loss.load_state_dict(state["loss"])
    encoder.to(device).eval()
    return LoadedModel(config, encoder, loss.to(device), caption_encoder, fingerprint,
                       file_fingerprint(file), state["epoch"], state["metrics"])
