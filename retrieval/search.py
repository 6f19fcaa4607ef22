"""Search over a built index: text→image, image→text (captions and words), image→image, arithmetic.

A :class:`Searcher` joins a trained checkpoint (image encoder + frozen text side) with the faiss
index of a collection that the same checkpoint produced; a mismatch is refused when loading.

Every hit has a ``score`` (the index's own: inner product, or the negative squared L2 distance)
and a ``similarity`` a person can read, higher is better (:data:`SIMILARITIES`): the cosine of the
query and the item where the items have unit length (exact for any query length: with unit items,
``cos = (|q|² + 1 - d²) / (2|q|)``), else the inner product (``ip``) or the negative L2 distance ``-d``.

One Searcher may answer queries from several threads at once: faiss CPU indexes search
concurrently (the per-call OpenMP thread count that ``VectorIndex.search`` sets is per calling
thread), and searches of an index on the GPU, which faiss does not make thread-safe, take a lock.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retrieval.checkpoint import LoadedModel, load_checkpoint
from retrieval.distances import COSINE, search_distance
from retrieval.embed import eval_transform
from retrieval.errors import DataError
from retrieval.imagefile import open_image
from retrieval.index import SearchResult, VectorIndex
from retrieval.rundir import BEST_CHECKPOINT, IndexDir, RunDir, index_stamp
from retrieval.thumbnails import THUMBNAIL_SUFFIX, ThumbnailReader

COSINE_SIMILARITY, INNER_PRODUCT, NEGATIVE_L2 = "cosine", "inner product", "negative L2 distance"
#: what a hit's ``similarity`` is, by name
SIMILARITIES = {
    COSINE_SIMILARITY: "cosine of the query and the item, from -1 to 1",
    INNER_PRODUCT: "inner product of the query and the item",
    NEGATIVE_L2: "minus the Euclidean distance between the query and the item",
}
UNIT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ImageHit:
    """One image result: its key, score (the index's; higher is better), captions, thumbnail JPEG bytes
    (None when the index has none) and similarity (higher is better, see :data:`SIMILARITIES`; None when
    not worked out)."""

    key: str
    score: float
    captions: list[str]
    thumbnail: bytes | None
    similarity: float | None = None


@dataclass(frozen=True)
class TextHit:
    """One text result: a caption of the collection or a vocabulary word."""

    text: str
    score: float
    similarity: float | None = None


@dataclass(frozen=True)
class ImageToText:
    """What an image query returns: nearest captions of the collection and nearest words."""

    captions: list[TextHit]
    words: list[TextHit]


class Searcher:
    """Answers queries against one index directory with one checkpoint."""

    def __init__(self, model: LoadedModel, images: VectorIndex, captions: VectorIndex,
                 index_dir: str | Path | IndexDir) -> None:
        self.model = model
        self.images = images
        self.captions = captions
        self.index_dir = IndexDir(index_dir)
        self._thumbnails: ThumbnailReader | None = None  # opened at the first thumbnail asked for
        self._thumbnail_lock = threading.Lock()
        # what the index build compared by: the loss's distance, unless the run's index.metric names another
        self.distance = search_distance(model.loss.distance, model.config.index.metric)
        if images.metric != self.distance.faiss_metric:
            raise DataError(f"the index in {self.index_dir} compares by {images.metric}, but this model searches by "
                            f"{self.distance.name}; rebuild it with `retrieval index`")
        self._load_vocabulary()
        self.transform = eval_transform(model.config.data.image_size, model.encoder.mean, model.encoder.std)
        self.image_similarity = self._similarity_kind(self._images_have_unit_length())
        self.caption_similarity = self._similarity_kind(self.distance.unit_length
                                                        or bool(model.caption_encoder.normalize))
        self._gpu_lock = threading.Lock()  # faiss GPU indexes are not thread-safe, not even for search

    @classmethod
    def open(cls, checkpoint: str | Path, index_dir: str | Path | IndexDir, device: str = "cpu") -> Searcher:
        """Load a checkpoint and the index it produced (a different model or vector set is refused)."""
        model = load_checkpoint(checkpoint, device=device)
        index_dir = IndexDir(index_dir)
        if not index_dir.exists():
            raise DataError(f"no index in {index_dir}; build one with `retrieval index`")
        stamp = index_stamp(model)
        images = VectorIndex.load(index_dir.images, expected_stamp=stamp)
        captions = VectorIndex.load(index_dir.captions, expected_stamp=stamp)
        return cls(model, images, captions, index_dir)

    def _load_vocabulary(self) -> None:
        """Content words of the collection's captions, centred on the mean caption vector.

        Centring removes the direction every caption mean shares (frequent words); without it the
        nearest words of any image are words like "making", "way", "time".
        """
        path = self.index_dir.vocabulary_file
        try:
            saved = json.loads(path.read_text())
            self.words, self.caption_center = saved["words"], np.asarray(saved["center"], dtype=np.float32)
        except (OSError, ValueError, KeyError):
            raise DataError(f"{path} is missing or unreadable; rebuild the index with `retrieval index`") from None
        word_vectors, _, _ = self.model.caption_encoder.encode_batch(self.words)
        centred = word_vectors - self.caption_center
        self.word_matrix = COSINE.to_search_space(centred)

    # -- similarities -------------------------------------------------------------------------
    def _images_have_unit_length(self) -> bool:
        """Whether the model's image embeddings have unit length (probed on random features)."""
        if self.distance.unit_length:
            return True
        encoder = self.model.encoder
        generator = torch.Generator().manual_seed(0)
        features = torch.randn(4, encoder.feature_dim, generator=generator)
        features = features.to(next(encoder.parameters()).device)
        norms = self.model.embed_features(features).norm(dim=1)
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=UNIT_TOLERANCE))

    def _similarity_kind(self, unit_items: bool) -> str:
        """The similarity hits of an index with (or without) unit-length items get."""
        if self.distance.faiss_metric == "ip":
            return COSINE_SIMILARITY if self.distance.unit_length else INNER_PRODUCT
        return COSINE_SIMILARITY if unit_items else NEGATIVE_L2

    def _similarity(self, kind: str, query: np.ndarray, score: float) -> float:
        """A hit's ``similarity`` from its index ``score`` (see the module docstring)."""
        if self.distance.faiss_metric == "ip":
            return score
        squared = max(0.0, -score)  # the l2 index's score is minus the squared distance
        if kind == NEGATIVE_L2:
            return -math.sqrt(squared)
        length = float(np.linalg.norm(query))
        return (length * length + 1.0 - squared) / (2.0 * length) if length > 0 else 0.0

    def _search(self, index: VectorIndex, query: np.ndarray, k: int) -> SearchResult:
        if index.on_gpu:
            with self._gpu_lock:
                return index.search(query, k)
        return index.search(query, k)

    # -- query vectors ------------------------------------------------------------------------
    def text_vector(self, query: str) -> np.ndarray:
        """A query in caption-vector space: a caption, or word arithmetic ``a - b + c``
        (grammar: ``retrieval.text.query``)."""
        return self.model.caption_encoder.encode_arithmetic(query)

    def image_vector(self, image: Image.Image | str | Path) -> np.ndarray:
        """An image (PIL or file) in the search space; a file over PIL's pixel limit or unreadable is a QueryError."""
        if not isinstance(image, Image.Image):
            image = open_image(image)
        pixels = self.transform(image.convert("RGB")).unsqueeze(0).to(next(self.model.encoder.parameters()).device)
        return self.model.embed_images(pixels)[0].cpu().numpy()

    # -- queries ------------------------------------------------------------------------------
    def _query(self, vector: np.ndarray) -> np.ndarray:
        """One query row in the search space of the index's distance (unit length for cosine)."""
        return self.distance.to_search_space(np.asarray(vector, dtype=np.float32)[None, :])

    def images_near(self, vector: np.ndarray, k: int) -> list[ImageHit]:
        query = self._query(vector)
        result = self._search(self.images, query, k)
        hits = []
        for score, item in zip(result.scores[0], self.images.metadata_for(result.ids[0])):
            hits.append(ImageHit(item["key"], float(score), list(item.get("captions", [])),
                                 self._thumbnail_of(item),
                                 self._similarity(self.image_similarity, query[0], float(score))))
        return hits

    def thumbnail(self, key: str) -> bytes | None:
        """The JPEG thumbnail of image ``key`` (None when the index has none for it)."""
        return self._thumbnail_of({"key": key})

    def _thumbnail_of(self, item: dict) -> bytes | None:
        if self._thumbnails is None:
            with self._thumbnail_lock:
                if self._thumbnails is None:
                    self._thumbnails = ThumbnailReader(self.index_dir.thumbnails)
        found = self._thumbnails.get(str(item["key"]))
        legacy = item.get("thumbnail")  # an index from before the tars: one <key>.jpg file per image
        if found is None and isinstance(legacy, str) and legacy.endswith(THUMBNAIL_SUFFIX):
            path = self.index_dir.file(legacy)
            if path.resolve().parent == self.index_dir.thumbnails.resolve() and path.is_file():
                return path.read_bytes()
        return found

    def text_to_image(self, query: str, k: int = 5) -> list[ImageHit]:
        """Top-k images for a caption-like query or word arithmetic (``"dog - grass + snow"``)."""
        return self.images_near(self.text_vector(query), k)

    def image_to_image(self, image: Image.Image | str | Path, k: int = 5) -> list[ImageHit]:
        """Top-k images of the collection nearest to an image."""
        return self.images_near(self.image_vector(image), k)

    def image_plus_text(self, image: Image.Image | str | Path, text: str, k: int = 5) -> list[ImageHit]:
        """An image moved by words: ``"+ snow - grass"`` adds and subtracts word vectors (same grammar
        as :meth:`text_vector`; a leading ``+`` is optional)."""
        shift = self.model.caption_encoder.encode_arithmetic(text)
        return self.images_near(self.image_vector(image) + shift, k)

    def image_to_text(self, image: Image.Image | str | Path, k: int = 5) -> ImageToText:
        """Nearest captions of the collection and nearest vocabulary words for an image."""
        return self.texts_near(self.image_vector(image), k)

    def texts_near(self, vector: np.ndarray, k: int) -> ImageToText:
        """Nearest captions and words of an image vector (``image_vector``): one encoder pass serves
        :meth:`images_near` and this."""
        query = self._query(vector)
        result = self._search(self.captions, query, k)
        captions = [TextHit(item["caption"], float(score),
                            self._similarity(self.caption_similarity, query[0], float(score)))
                    for score, item in zip(result.scores[0], self.captions.metadata_for(result.ids[0]))]
        return ImageToText(captions, self.nearest_words(vector, k))

    def nearest_words(self, vector: np.ndarray, k: int) -> list[TextHit]:
        """Nearest words of the collection's vocabulary, by cosine after centring (see above)."""
        if not self.words:
            return []
        query = np.asarray(vector, dtype=np.float32) - self.caption_center
        scores = self.word_matrix @ COSINE.to_search_space(query)
        best = np.argsort(-scores, kind="stable")[:k]
        return [TextHit(self.words[i], float(scores[i]), float(scores[i])) for i in best]


def open_searcher(run_dir: str | Path, checkpoint: str = BEST_CHECKPOINT, index: str | Path | None = None,
                  device: str = "cpu") -> Searcher:
    """A searcher over a run's index (``<run>/index`` unless ``index`` is given) with one of its checkpoints."""
    run = RunDir(run_dir)
    return Searcher.open(run.checkpoint(checkpoint), index if index is not None else run.index, device=device)
