"""The shared contract of every cross-modal loss: image embeddings against frozen caption vectors.

A loss receives a batch of image embeddings ``f(i)`` (B, D), the batch's caption vectors ``t``
(B, D) where ``t[b]`` is the caption of image ``b``, and integer ``labels`` (B,) saying which rows
belong together (image identity by default, a class id where the data has classes): image ``a``
and caption ``b`` are a positive pair iff ``labels[a] == labels[b]``. The caption vectors are
targets and never receive gradients.

A loss also owns its geometry and its settings: :attr:`distance` is how embeddings are compared
in training, evaluation and search; the keyword arguments of ``__init__`` are the settings a config
may give (see :mod:`retrieval.losses.settings`); :attr:`family` groups it for comparisons.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from retrieval.distances import L2, Distance
from retrieval.errors import ConfigError


class LossFamily(enum.StrEnum):
    """What kind of objective a loss is; comparisons group variants by it."""

    TRIPLET = "triplet"  # anchor, positive and negative distances (triplet, mined, offline, quadruplet)
    CROSS_ENTROPY = "cross-entropy"  # a cross-entropy on the image output (sigmoid-ce, softmax-ce)
    PAIR = "pair"  # every positive and negative (image, caption) pair (contrastive, multi-similarity, ...)
    PROXY = "proxy"  # learnable class proxies (center, ArcFace)
    REGRESSION = "regression"  # the output regressed onto its own caption vector (mse, cosine)


@dataclass(frozen=True)
class LossOutput:
    """A loss value plus the training signals that make a collapse visible."""

    value: torch.Tensor
    active_fraction: float
    mean_pos_distance: float
    mean_neg_distance: float
    #: the batch's image embeddings summed into :func:`retrieval.collapse.embedding_moments` (set by training)
    embedding_moments: torch.Tensor | None = None

    @classmethod
    def from_terms(
        cls, value: torch.Tensor, active: torch.Tensor, pos_distance: torch.Tensor, neg_distance: torch.Tensor
    ) -> LossOutput:
        """Build an output from per-term tensors (detached for the logged statistics)."""
        with torch.no_grad():
            if active.numel() and pos_distance.numel() and neg_distance.numel():  # one device sync for all three
                dtype = pos_distance.dtype if pos_distance.is_floating_point() else torch.float32
                stats = torch.stack([active.to(dtype).mean(), pos_distance.to(dtype).mean(),
                                     neg_distance.to(dtype).mean()]).tolist()
                return cls(value, *stats)
            return cls(
                value=value,
                active_fraction=float(active.float().mean()) if active.numel() else 0.0,
                mean_pos_distance=float(pos_distance.mean()) if pos_distance.numel() else float("nan"),
                mean_neg_distance=float(neg_distance.mean()) if neg_distance.numel() else float("nan"),
            )


def mean_or_zero(terms: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
    """The mean of a loss's terms; with no term (e.g. no row of the batch has a negative), a zero
    that is still connected to ``image_emb``, so backward works and moves nothing."""
    return terms.mean() if terms.numel() else (image_emb * 0).sum()


class CrossModalLoss(nn.Module):
    """Base class: owns input checks and the hooks; subclasses implement :meth:`compute`."""

    #: what kind of objective this is (every registered loss declares it)
    family: ClassVar[LossFamily]
    #: losses that need class labels (softmax cross-entropy, center loss, ArcFace) set this.
    needs_classes: ClassVar[bool] = False
    #: margin losses, where a zero term means no gradient: the collapse alarm watches their active fraction
    active_means_gradient: ClassVar[bool] = False
    #: how embeddings are compared: in the loss, in evaluation and in search (a loss whose settings
    #: change it, e.g. ``squared``, sets it in ``__init__``)
    distance: Distance = L2
    #: the loss's own random generator (negative sampling, banks), when it draws at random; saved for resume
    generator: torch.Generator | None = None

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        """Rules that join settings (e.g. ``second_margin <= margin``): raise a one-line ConfigError.

        ``settings`` holds every setting, defaults filled in. Called when a config is loaded and
        before the loss is built; a single setting's type and range come from its annotation.
        """

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> LossOutput:
        if image_emb.ndim != 2 or text_emb.ndim != 2:
            raise ConfigError(
                f"{type(self).__name__}: expected 2-D embeddings, got image {tuple(image_emb.shape)} "
                f"and text {tuple(text_emb.shape)}"
            )
        if image_emb.shape[0] != text_emb.shape[0]:
            raise ConfigError(
                f"{type(self).__name__}: batch sizes differ (image {image_emb.shape[0]}, text {text_emb.shape[0]})"
            )
        if labels is None:
            if self.needs_classes:
                raise ConfigError(f"loss {type(self).__name__} needs class labels; this data has captions only")
            labels = torch.arange(image_emb.shape[0], device=image_emb.device)
        return self.compute(image_emb, text_emb.detach(), labels.to(image_emb.device))

    def compute(self, image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        raise NotImplementedError

    def prepare(self, caption_vectors: torch.Tensor) -> None:
        """Hook called once before training with every training caption vector (default: nothing)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Hook called before each training epoch (1-based), e.g. to refresh a negative bank (default: nothing)."""

    def outputs_to_embedding(self, outputs: torch.Tensor) -> torch.Tensor:
        """Map network outputs into caption-vector space (default: identity; sigmoid-ce rescales)."""
        return outputs

    def embed(self, outputs: torch.Tensor) -> torch.Tensor:
        """Network outputs as search-space embeddings: caption-vector space, then the distance's mapping."""
        return self.distance.to_search_space(self.outputs_to_embedding(outputs))
