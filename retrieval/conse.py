"""ConSE (Norouzi et al. 2014, "Zero-Shot Learning by Convex Combination of Semantic Embeddings").

A reference that needs no training: an image's vector is the probability-weighted mean of the text
vectors of its top-T ImageNet classes, as the pretrained backbone's own classifier ranks them,

    f(x) = sum_t p(y_t | x) s(y_t) / sum_t p(y_t | x),   t = 1..T,

where s(y) is the class name encoded as a phrase by the run's caption encoder. Classes whose name
has no known word are never among the T. The ImageNet class names are torchvision's (standard
ImageNet order, which EfficientNet-Lite0's 1000 outputs follow too; no download involved).
The result lives in caption-vector space; compare it with captions by cosine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval.errors import ConfigError, DataError


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard order (torchvision's metadata, offline)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_name_vectors(names: Sequence[str], caption_encoder: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each class name encoded as a phrase: (K, D) float32 vectors and a bool mask of names with a known word."""
    vectors, known, _ = caption_encoder.encode_batch(list(names))
    return np.asarray(vectors, dtype=np.float32), np.asarray(known, dtype=bool)


def _check_top_t(top_t: int) -> int:
    if isinstance(top_t, bool) or not isinstance(top_t, (int, np.integer)) or top_t < 1:
        raise ConfigError(f"ConSE top_t must be a positive integer, got {top_t!r}")
    return int(top_t)


def _module_device(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def conse_embeddings(features: torch.Tensor, classifier: nn.Module, caption_encoder: Any, top_t: int = 10,
                     class_names: Sequence[str] | None = None, batch_size: int = 1024) -> np.ndarray:
    """(N, F) pooled backbone features → (N, D) ConSE vectors (float32) in the caption encoder's space.

    ``classifier`` maps features to class logits (the backbone's ImageNet head); ``class_names``
    (default: ImageNet's) names its outputs in order. Softmax probabilities of the T most likely
    classes with a known name weight their name vectors; the weights are renormalised to sum to 1.
    """
    top_t = _check_top_t(top_t)
    names = list(class_names) if class_names is not None else imagenet_class_names()
    vectors, known = class_name_vectors(names, caption_encoder)
    if not known.any():
        raise DataError("ConSE: no class name has a known word in the text vectors")
    device = _module_device(classifier)
    table = torch.from_numpy(vectors).to(device)
    unknown = torch.from_numpy(~known).to(device)
    was_training = classifier.training
    classifier.eval()
    out = []
    try:
        for start in range(0, len(features), batch_size):
            logits = classifier(features[start:start + batch_size].to(device, torch.float32))
            if logits.shape[-1] != len(names):
                raise ConfigError(f"ConSE: the classifier has {logits.shape[-1]} outputs but {len(names)} class names")
            probs = logits.float().softmax(dim=-1).masked_fill(unknown, 0.0)
            top = probs.topk(min(top_t, int(known.sum())), dim=-1)
            weights = top.values / top.values.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            out.append((weights.unsqueeze(-1) * table[top.indices]).sum(dim=1).cpu())
    finally:
        classifier.train(was_training)
    if not out:
        return np.zeros((0, caption_encoder.dim), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)
