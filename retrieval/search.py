"""Search over a built index: text→image, image→text (captions and words), image→image, arithmetic.

A :class:`Searcher` joins a trained checkpoint (image encoder + frozen text side) with the faiss
index of a collection that the same checkpoint produced; a mismatch is refused when loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval.checkpoint import LoadedModel, load_checkpoint
from retrieval.distances import COSINE, search_distance
from retrieval.embed import eval_transform
from retrieval.errors import DataError
from retrieval.imagefile import open_image
from retrieval.index import VectorIndex
from retrieval.rundir import BEST_CHECKPOINT, IndexDir, RunDir, index_stamp


@dataclass(frozen=True)
class ImageHit:
    """One image result: its key, score (higher is better), captions and thumbnail file."""

    key: str
    score: float
    captions: list[str]
    thumbnail: str | None


@dataclass(frozen=True)
class TextHit:
    """One text result: a caption of the collection or a vocabulary word."""

    text: str
    score: float


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
        # what the index build compared by: the loss's distance, unless the run's index.metric names another
        self.distance = search_distance(model.loss.distance, model.config.index.metric)
        if images.metric != self.distance.faiss_metric:
            raise DataError(f"the index in {self.index_dir} compares by {images.metric}, but this model searches by "
                            f"{self.distance.name}; rebuild it with `retrieval index`")
        self._load_vocabulary()
        self.transform = eval_transform(model.config.data.image_size, model.encoder.mean, model.encoder.std)

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
        result = self.images.search(self._query(vector), k)
        hits = []
        for score, item in zip(result.scores[0], self.images.metadata_for(result.ids[0])):
            thumbnail = item.get("thumbnail")
            hits.append(ImageHit(item["key"], float(score), list(item.get("captions", [])),
                                 str(self.index_dir.file(thumbnail)) if thumbnail else None))
        return hits

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
        vector = self.image_vector(image)
        result = self.captions.search(self._query(vector), k)
        captions = [TextHit(item["caption"], float(score))
                    for score, item in zip(result.scores[0], self.captions.metadata_for(result.ids[0]))]
        return ImageToText(captions, self.nearest_words(vector, k))

    def nearest_words(self, vector: np.ndarray, k: int) -> list[TextHit]:
        """Nearest words of the collection's vocabulary, by cosine after centring (see above)."""
        if not self.words:
            return []
        query = np.asarray(vector, dtype=np.float32) - self.caption_center
        scores = self.word_matrix @ COSINE.to_search_space(query)
        best = np.argsort(-scores, kind="stable")[:k]
        return [TextHit(self.words[i], float(scores[i])) for i in best]


def open_searcher(run_dir: str | Path, checkpoint: str = BEST_CHECKPOINT, index: str | Path | None = None,
                  device: str = "cpu") -> Searcher:
    """A searcher over a run's index (``<run>/index`` unless ``index`` is given) with one of its checkpoints."""
    run = RunDir(run_dir)
    return Searcher.open(run.checkpoint(checkpoint), index if index is not None else run.index, device=device)
