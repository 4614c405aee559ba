"""Writing files that a later run reads, so that a kill at any moment leaves either the old file or the new one.

Each write goes to a temporary name *in the destination's own folder* (a rename is atomic only within
one file system; a temp file in ``$TMPDIR`` would be copied, and a kill mid-copy truncates the target),
is flushed to disk, then renamed over the destination. A kill can leave only a temp file behind, whose
name marks it (``.<stem>.partial-<pid><suffix>``); ``remove_partials`` clears those at the next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

PARTIAL_MARKER = ".partial-"


def is_partial(path: Path) -> bool:
    """Whether ``path`` is a temp file or folder left by an interrupted atomic write."""
    return path.name.startswith(".") and PARTIAL_MARKER in path.name


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(path: Path) -> None:
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        _fsync(file)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (same suffix, so writers that go by the extension work);
    once the block succeeds, the temp file is synced and renamed to ``path``. On an exception the
    temp file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}{PARTIAL_MARKER}{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself survives a power cut only once the folder is synced
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_image(image, path: str | os.PathLike, **save_kwargs) -> Path:
    """``PIL.Image.save``, atomically (format taken from ``path``'s extension)."""
    from PIL import Image

    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r}")
    with atomic_path(path) as tmp:
        image.save(tmp, format=image_format, **save_kwargs)
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; once the block succeeds it replaces ``path``
    (a previous folder there is removed only after the new one is in place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}{PARTIAL_MARKER}{os.getpid()}")
    previous = path.with_name(f".{path.name}{PARTIAL_MARKER}{os.getpid()}-previous")
    for leftover in (staging, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        _sync_tree(staging)
        if path.exists():
            os.replace(path, previous)
        os.replace(staging, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


def remove_partials(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete what interrupted atomic writes left in ``folder``; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in (folder.rglob(".*") if recursive else folder.glob(".*")) if is_partial(p)]
    for leftover in found:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        log.warning("removed %s, left by an interrupted write", leftover)
    return found
