"""Cross-modal evaluation of embeddings: text→image and image→text metrics in one call."""

from __future__ import annotations

import numpy as np

from retrieval.metrics import chance_recall, retrieval_metrics


def cross_modal_report(image_emb: np.ndarray, caption_emb: np.ndarray, caption_labels: np.ndarray,
                       image_labels: np.ndarray, ks=(1, 5, 10), metric: str = "l2") -> dict[str, float]:
    """Flat dict ``{"text_to_image/R@1": …, "image_to_text/mAP": …}``.

    Relevance: caption ``c`` and image ``i`` match iff ``caption_labels[c] == image_labels[i]``
    (the image's identity for captioned photos, its class where the data has classes).
    """
    directions = {
        "text_to_image": retrieval_metrics(caption_emb, image_emb, caption_labels, image_labels, ks=ks, metric=metric),
        "image_to_text": retrieval_metrics(image_emb, caption_emb, image_labels, caption_labels, ks=ks, metric=metric),
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
        i2t = np.mean([chance_recall(k, len(caption_labels), captions_per_label.get(label, 0)) for label in image_labels])
        report[f"text_to_image/R@{k}"] = float(t2i)
        report[f"image_to_text/R@{k}"] = float(i2t)
    return report
