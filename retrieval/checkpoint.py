"""Checkpoints: everything needed to embed images and queries exactly as during training."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from retrieval.config import Config, TextConfig, config_from_dict, config_to_dict
from retrieval.errors import DataError
from retrieval.io import atomic_path
from retrieval.losses import LOSSES, CrossModalLoss, create_loss
from retrieval.models import ImageEncoder, create_encoder
from retrieval.rundir import RunDir
from retrieval.targets import load_vectors, restore_caption_encoder, vectors_fingerprint
from retrieval.text import CaptionEncoder
from retrieval.text.sentence import SENTENCE_KIND, SentenceEncoder


def loss_kwargs(config: Config, num_classes: int | None = None) -> dict:
    """Keyword arguments for ``create_loss`` from the loss section."""
    kwargs = dict(config.loss.params)
    if config.loss.name == "triplet":
        kwargs.update(margin=config.loss.margin, squared=config.loss.squared, negatives=config.loss.negatives,
                      seed=config.train.seed)
    if num_classes is not None and LOSSES.get(config.loss.name).needs_classes:
        kwargs.setdefault("num_classes", num_classes)
    return kwargs


def save_checkpoint(path: str | Path, *, config: Config, encoder: ImageEncoder, loss: CrossModalLoss,
                    caption_encoder: CaptionEncoder | SentenceEncoder, vectors_fingerprint: str, epoch: int,
                    metrics: dict, num_classes: int | None = None) -> None:
    """Write a checkpoint atomically (temp file + rename)."""
    state = {
        "config": config_to_dict(config),
        "encoder": encoder.state_dict(),
        "loss": loss.state_dict(),
        "caption_encoder": caption_encoder.state_dict(),
        "vectors_fingerprint": vectors_fingerprint,
        "num_classes": num_classes,
        "epoch": epoch,
        "metrics": metrics,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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
    caption_encoder: CaptionEncoder | SentenceEncoder
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


def _vectors_source(text: TextConfig, run: RunDir) -> str:
    """Where the text side of ``text`` is read from, for messages: the vectors file or model folder."""
    if text.vectors == SENTENCE_KIND:
        return f"sentence model {text.vectors_path or 'all-MiniLM-L6-v2 (packaged)'}"
    if text.vectors == "word2vec-captions":
        return f"word vectors {run.caption_word2vec}"
    return f"word vectors {text.vectors_path or f'{text.vectors} (packaged)'}"


def check_vectors(vectors, trained_with: str, text: TextConfig, run: RunDir) -> str:
    """The fingerprint of the text side actually loaded; one that differs from the one the model was trained
    with (``trained_with``, from the checkpoint) is refused, since every answer would silently change."""
    loaded = vectors_fingerprint(vectors)
    if loaded != trained_with:
        raise DataError(f"{_vectors_source(text, run)} differ from the ones this model was trained with "
                        f"(fingerprint {loaded}, trained with {trained_with}); restore them or train again")
    return loaded


def load_checkpoint(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Rebuild encoder, loss and caption encoder from a checkpoint file."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"checkpoint {file} does not exist; train a model first (retrieval train)")
    try:
        state = torch.load(file, map_location=device, weights_only=False)
        config = config_from_dict(state["config"], str(file))
    except (KeyError, RuntimeError, EOFError, OSError) as error:
        raise DataError(f"checkpoint {file} is not readable ({type(error).__name__})") from None
    vectors = load_vectors(config.text, RunDir.of_checkpoint(file))
    fingerprint = check_vectors(vectors, state["vectors_fingerprint"], config.text, RunDir.of_checkpoint(file))
    caption_encoder = restore_caption_encoder(vectors, state["caption_encoder"])
    # The checkpoint holds every weight, so the backbone need not load its original file again.
    encoder = create_encoder(dataclasses.replace(config.model, weights="random"), caption_encoder.dim)
    encoder.load_state_dict(state["encoder"])
    loss = create_loss(config.loss.name, **loss_kwargs(config, state.get("num_classes")))
    loss.load_state_dict(state["loss"])
    encoder.to(device).eval()
    return LoadedModel(config, encoder, loss.to(device), caption_encoder, fingerprint,
                       file_fingerprint(file), state["epoch"], state["metrics"])
