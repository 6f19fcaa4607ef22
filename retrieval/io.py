"""Atomic file writes: artefacts appear whole or not at all (temp file + rename).

A write goes to ``.NAME.<pid>.<random>.tmp`` beside its target. A writer killed before the rename
leaves that entry behind; the next write of the same target removes it once its process is gone
(same machine). Entries of the form ``.NAME.<random>.tmp`` (written before the pid was part of the
name) are removed when untouched for :data:`STALE_AFTER_SECONDS`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STALE_AFTER_SECONDS = 3600
_WRITER_TMP = re.compile(r"(?P<pid>\d+)\.[a-z0-9_]+")  # "<pid>.<random>" between ".NAME." and ".tmp"
_UNOWNED_TMP = re.compile(r"[a-z0-9_]{8}")  # "<random>" of mkstemp/mkdtemp, from before pids were recorded


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _give_default_permissions(path: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give them what a plain open()/mkdir() would."""
    umask = _current_umask()
    if path.is_dir():
        path.chmod(0o777 & ~umask)
        for child in path.rglob("*"):
            if not child.is_symlink():
                child.chmod((0o777 if child.is_dir() else 0o666) & ~umask)
    elif path.exists():
        path.chmod(0o666 & ~umask)


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of ``target`` left beside it; return the removed paths.

    A ``.NAME.<pid>.<random>.tmp`` entry is removed when process ``pid`` no longer runs, so a concurrent
    writer of the same target keeps its own; temporaries of other targets are never touched.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    prefix, removed = f".{target.name}.", []
    for entry in target.parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        middle = name[len(prefix):-len(".tmp")]
        owner = _WRITER_TMP.fullmatch(middle)
        if owner:
            stale = not _process_alive(int(owner["pid"]))
        elif _UNOWNED_TMP.fullmatch(middle):
            try:
                stale = time.time() - entry.lstat().st_mtime > STALE_AFTER_SECONDS
            except OSError:
                continue
        else:
            continue
        if stale:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success (stale ones go first)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _give_default_permissions(tmp_path)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` only on success (stale ones go first)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp_path = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp_path
        _give_default_permissions(tmp_path)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp_path, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
