"""The layout of a run folder and of an index folder: every path inside them is named here, and only here.

A run folder (``train.run_dir``)::

    config.yaml               the resolved config the run was trained with
    metrics.csv               one row per epoch
    steps.csv                 one row per optimizer step (step, epoch, loss, lr)
    tensorboard/              TensorBoard event files (``train.tensorboard: true``)
    checkpoints/<name>.pt     best.pt (best held-out score) and last.pt
    training-state.pt         everything to resume training exactly (``retrieval train --resume``)
    word2vec-captions.kv      word vectors trained on the captions (``text.vectors: word2vec-captions``)
    report/evaluate.json      the report of ``retrieval evaluate``
    compare_run.json          a compare run's record (reused while its config is unchanged)
    index/                    the run's search index: an index folder
    embeddings/               embedding shards of ``retrieval embed`` (:mod:`retrieval.embedding_shards`)

Other files in a run folder (e.g. the demo's ``shards/``) are not part of the run: :meth:`RunDir.clear`
leaves them.

An index folder (written by :mod:`retrieval.indexing`, read by :mod:`retrieval.search`)::

    images/           vector index of the image embeddings, with the stamp of the model that made them
    captions/         vector index of the collection's caption vectors (for image→text)
    thumbnails/       small JPEGs for the UI in a few tars, thumbs_NNNNNN.tar (+ .json offset tables;
                      see :mod:`retrieval.thumbnails`); indexes from before hold <key>.jpg files
    vocabulary.json   content words of the captions and their mean vector (for nearest words)

A vector index folder (``images/``, ``captions/``; see :class:`retrieval.index.VectorIndex`) holds
``index.faiss``, ``metadata.jsonl`` and ``stamp.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrieval.checkpoint import LoadedModel

# the files of a vector index folder
INDEX_FILE, METADATA_FILE, STAMP_FILE = "index.faiss", "metadata.jsonl", "stamp.json"

BEST_CHECKPOINT, LAST_CHECKPOINT = "best.pt", "last.pt"
CHECKPOINT_SUFFIX = ".pt"
CHECKPOINTS_DIR = "checkpoints"
TRAINING_STATE_FILE = "training-state.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
STEPS_FILE = "steps.csv"
TENSORBOARD_DIR = "tensorboard"
CAPTION_WORD2VEC_FILE = "word2vec-captions.kv"
REPORT_DIR = "report"
EVALUATION_REPORT_FILE = "evaluate.json"
COMPARE_RECORD_FILE = "compare_run.json"
INDEX_DIR = "index"
EMBEDDINGS_DIR = "embeddings"

IMAGE_INDEX_DIR = "images"
CAPTION_INDEX_DIR = "captions"
THUMBNAILS_DIR = "thumbnails"
THUMBNAIL_SUFFIX = ".jpg"
VOCABULARY_FILE = "vocabulary.json"


def index_stamp(model: LoadedModel) -> dict:
    """The identity of the checkpoint and text side that embed a collection; an index is searched only with them."""
    return {"model": model.checkpoint_fingerprint, "vectors": model.vectors_fingerprint}


@dataclass(frozen=True)
class _Folder:
    """A folder that works as a path (``open``, ``Path(...)`` and ``os.fspath`` accept it)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class IndexDir(_Folder):
    """An index folder: image and caption vector indexes, thumbnails and the caption vocabulary."""

    @property
    def images(self) -> Path:
        """The vector index of the image embeddings."""
        return self.path / IMAGE_INDEX_DIR

    @property
    def captions(self) -> Path:
        """The vector index of the collection's caption vectors."""
        return self.path / CAPTION_INDEX_DIR

    @property
    def thumbnails(self) -> Path:
        return self.path / THUMBNAILS_DIR

    @property
    def vocabulary_file(self) -> Path:
        return self.path / VOCABULARY_FILE

    @property
    def stamp_file(self) -> Path:
        """The stamp of the image index: which checkpoint and text side built this index."""
        return self.images / STAMP_FILE

    def file(self, relative: str) -> Path:
        """A file named relative to the index folder (a thumbnail of the metadata)."""
        return self.path / relative

    def exists(self) -> bool:
        """Whether an index has been written here (its image index is present)."""
        return self.images.is_dir()

    def is_index(self) -> bool:
        """Whether this looks like an index folder written by ``retrieval index`` (its stamp is present)."""
        return self.stamp_file.is_file()

    def read_stamp(self) -> dict | None:
        """The stamp the index was built with (``{"model": …, "vectors": …}``); None when missing or unreadable."""
        try:
            stamp = json.loads(self.stamp_file.read_text(encoding="utf-8"))["stamp"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return stamp if isinstance(stamp, dict) else None

    def model_fingerprint(self) -> str | None:
        """The fingerprint of the checkpoint that built the index (None when the stamp is unreadable)."""
        stamp = self.read_stamp()
        return str(stamp["model"]) if stamp and "model" in stamp else None


@dataclass(frozen=True)
class RunDir(_Folder):
    """A run folder: config, metrics, checkpoints, text vectors, reports and the index of one training run."""

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> RunDir:
        """The run folder a checkpoint file lies in (``<run>/checkpoints/<name>.pt``)."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def steps_file(self) -> Path:
        """One row per optimizer step: step, epoch, loss, learning rate."""
        return self.path / STEPS_FILE

    @property
    def tensorboard(self) -> Path:
        """The folder of the run's TensorBoard event files."""
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, name: str = BEST_CHECKPOINT) -> Path:
        """A checkpoint of the run by file name (``best.pt`` by default)."""
        return self.checkpoints / name

    def checkpoint_names(self) -> list[str]:
        """File names of the run's checkpoints, sorted (none when the folder is missing)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(path.name for path in self.checkpoints.glob(f"*{CHECKPOINT_SUFFIX}"))

    @property
    def training_state(self) -> Path:
        """The last training state (model, optimizer, schedule, RNGs, position): what ``--resume`` continues."""
        return self.path / TRAINING_STATE_FILE

    @property
    def caption_word2vec(self) -> Path:
        """Word vectors trained on the run's captions (``text.vectors: word2vec-captions``)."""
        return self.path / CAPTION_WORD2VEC_FILE

    @property
    def report(self) -> Path:
        return self.path / REPORT_DIR

    @property
    def evaluation_report(self) -> Path:
        """Where ``retrieval evaluate`` writes its JSON report by default."""
        return self.report / EVALUATION_REPORT_FILE

    @property
    def compare_record(self) -> Path:
        """A compare run's record: its identity and results, reused while they match."""
        return self.path / COMPARE_RECORD_FILE

    @property
    def index(self) -> IndexDir:
        """The run's default index folder."""
        return IndexDir(self.path / INDEX_DIR)

    @property
    def embeddings(self) -> Path:
        """The run's default embedding folder (``retrieval embed``)."""
        return self.path / EMBEDDINGS_DIR

    def holds_run(self) -> bool:
        """Whether a run was started or finished here: its config or a checkpoint is present."""
        return self.config_file.is_file() or bool(self.checkpoint_names()) or self.training_state.is_file()

    def run_files(self) -> list[Path]:
        """The artefacts of a run present in the folder (config, metrics, step log, TensorBoard events, checkpoints,
        vectors, reports, indexes).

        Anything else in the folder (shards, the user's own files) is not part of the run.
        """
        named = [self.config_file, self.metrics_file, self.steps_file, self.tensorboard, self.checkpoints,
                 self.training_state,
                 self.caption_word2vec, self.report, self.compare_record, self.index.path, self.embeddings]
        found = [path for path in named if path.exists()]
        return found + [index.path for index in self.indexes() if index.path not in found]

    def clear(self) -> None:
        """Remove the run's artefacts (:meth:`run_files`), leaving the folder and everything else in it."""
        for path in self.run_files():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def indexes(self) -> list[IndexDir]:
        """Index folders in the run: the default ``index`` first, then any other sub-folder holding one."""
        if not self.path.is_dir():
            return []
        found = [IndexDir(child) for child in sorted(self.path.iterdir()) if child.is_dir()]
        return sorted((index for index in found if index.is_index()), key=lambda index: index.path.name != INDEX_DIR)


@dataclass(frozen=True)
class RunsRoot:
    """A folder of run folders: the app lists the runs under it and opens nothing that resolves outside it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).resolve())

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def holding(cls, run: str | os.PathLike) -> RunsRoot:
        """The folder that holds ``run`` (``..`` resolved, links kept): the default root of an app on that run."""
        return cls(Path(os.path.abspath(run)).parent)

    def inside(self, path: str | os.PathLike) -> Path | None:
        """``path`` with symlinks and ``..`` resolved, or None when that lies outside the root."""
        resolved = Path(path).resolve()
        return resolved if resolved.is_relative_to(self.path) else None

    def label(self, run: RunDir) -> str:
        """A run's path relative to the root (``.`` for the root itself)."""
        return Path(run.path).resolve().relative_to(self.path).as_posix()

    def runs(self, max_depth: int = 3) -> list[RunDir]:
        """Run folders (a checkpoint and an index) up to ``max_depth`` folders below the root, by path.

        Hidden folders are skipped, a run's own sub-folders are not searched, and a link is followed only
        when it resolves inside the root.
        """
        found: dict[Path, RunDir] = {}
        pending, seen = [(self.path, 0)], set()
        while pending:
            folder, depth = pending.pop()
            if folder in seen:
                continue
            seen.add(folder)
            run = RunDir(folder)
            if run.checkpoint_names() and run.indexes():
                found.setdefault(folder, run)
                continue
            if depth == max_depth:
                continue
            try:
                children = sorted(child for child in folder.iterdir() if not child.name.startswith("."))
            except OSError:
                continue
            for child in children:
                resolved = self.inside(child)
                if resolved is not None and resolved.is_dir():
                    pending.append((resolved, depth + 1))
        return [found[path] for path in sorted(found)]
