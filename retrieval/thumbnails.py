"""Thumbnails in a few tar files: small JPEGs written as ``<key>.jpg`` members, read back by key without
extracting anything.

Each tar ``thumbs_<name>.tar`` has an offset table beside it (``thumbs_<name>.json``: key → [data offset,
size]), so :class:`ThumbnailReader` serves one thumbnail with one seek and one read. A tar without its table
(copied alone, say) is scanned once for its member headers instead.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torchvision.transforms.v2.functional import to_pil_image

from retrieval.errors import DataError
from retrieval.io import atomic_path

THUMBNAIL_SIZE = 192
THUMBNAIL_PREFIX, THUMBNAIL_SUFFIX = "thumbs_", ".jpg"


def thumbnail_jpeg(image: torch.Tensor, size: int = THUMBNAIL_SIZE) -> bytes:
    """A uint8 RGB tensor (3, H, W) → JPEG bytes of at most ``size`` × ``size`` pixels (aspect kept)."""
    picture = to_pil_image(image)
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def thumbnail_tar_path(folder: str | os.PathLike, name: str) -> Path:
    """Where the thumbnails of embedding shard ``name`` go in ``folder``."""
    return Path(folder) / f"{THUMBNAIL_PREFIX}{name}.tar"


def offsets_path(tar_path: str | os.PathLike) -> Path:
    """The offset table beside a thumbnail tar."""
    return Path(tar_path).with_suffix(".json")


def write_thumbnail_tar(path: str | os.PathLike, thumbnails: Iterable[tuple[str, bytes]]) -> dict[str, list[int]]:
    """Write ``(key, jpeg bytes)`` as ``<key>.jpg`` members of the tar ``path`` and its offset table, atomically.

    Returns the table: key → [offset of the member's data in the tar, size]. Members carry mtime 0, so the
    same thumbnails give the same bytes.
    """
    path = Path(path)
    offsets: dict[str, list[int]] = {}
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, data in thumbnails:
                info = tarfile.TarInfo(f"{key}{THUMBNAIL_SUFFIX}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
                padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # the data ends the member
                offsets[key] = [tar.offset - padded, len(data)]
    with atomic_path(offsets_path(path)) as tmp:
        tmp.write_text(json.dumps(offsets))
    return offsets


class ThumbnailTarWriter:
    """Thumbnails written as they come into tars of ``per_tar`` each (``thumbs_000000.tar``, …), so a
    collection of any size needs a few files and at most one tar's thumbnails in memory."""

    def __init__(self, folder: str | os.PathLike, per_tar: int = 4096) -> None:
        self.folder, self.per_tar = Path(folder), per_tar
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pending: list[tuple[str, bytes]] = []
        self._written = 0
        self.tar_of: dict[str, str] = {}  # key → the file name of the tar that holds it

    def add(self, key: str, data: bytes) -> None:
        self._pending.append((key, data))
        if len(self._pending) >= self.per_tar:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        path = thumbnail_tar_path(self.folder, f"{self._written:06d}")
        write_thumbnail_tar(path, self._pending)
        self.tar_of.update((key, path.name) for key, _ in self._pending)
        self._pending, self._written = [], self._written + 1


def scan_tar_offsets(path: str | os.PathLike) -> dict[str, list[int]]:
    """key → [data offset, size] of every ``<key>.jpg`` member of a tar, from its headers alone."""
    try:
        with tarfile.open(path, "r:") as tar:
            return {member.name[:-len(THUMBNAIL_SUFFIX)]: [member.offset_data, member.size]
                    for member in tar if member.isfile() and member.name.endswith(THUMBNAIL_SUFFIX)}
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{path}: cannot read thumbnail tar: {str(exc).splitlines()[0]}") from None


def read_offsets(tar_path: Path) -> dict[str, list[int]]:
    """The offset table of a thumbnail tar: its json beside it when that is readable, else a scan of the tar."""
    table = offsets_path(tar_path)
    if table.is_file() and table.stat().st_mtime >= tar_path.stat().st_mtime:
        try:
            offsets = json.loads(table.read_text(encoding="utf-8"))
            if isinstance(offsets, dict):
                return offsets
        except (OSError, ValueError):
            pass
    return scan_tar_offsets(tar_path)


class ThumbnailReader:
    """Thumbnails by key from the ``thumbs_*.tar`` files of a folder (one seek and one read each).

    Safe to share between threads: each read opens its tar file on its own.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._where: dict[str, tuple[Path, int, int]] = {}
        tars = sorted(self.folder.glob(f"{THUMBNAIL_PREFIX}*.tar")) if self.folder.is_dir() else []
        for tar_path in tars:
            for key, (offset, size) in read_offsets(tar_path).items():
                self._where[key] = (tar_path, int(offset), int(size))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def get(self, key: str) -> bytes | None:
        """The JPEG bytes of ``key``'s thumbnail; None when no tar holds it."""
        where = self._where.get(key)
        if where is None:
            return None
        path, offset, size = where
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        if len(data) != size:
            raise DataError(f"{path}: thumbnail {key!r} is cut short (the tar was truncated); rebuild it")
        return data
