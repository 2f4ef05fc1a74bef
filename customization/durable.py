"""Durable renames: what a rename put in place survives a power loss or a kernel crash.

``os.replace`` is atomic but not durable: without an fsync of the file before the rename,
a crash can leave the new name pointing at empty or partial data; without an fsync of the
directory after it, the rename itself can be lost. Artifacts are written to a temporary
name, made durable here, renamed, and the directory is made durable last.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    """Flush one file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (names created, renamed or removed in it)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform without directory handles (Windows): nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data is flushed
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file below ``folder``, then the folders themselves (deepest first)."""
    root = Path(folder)
    folders = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            fsync_file(path)
    for path in reversed(folders):
        fsync_dir(path)


def replace_durably(source: str | Path, target: str | Path) -> None:
    """``os.replace`` with the source flushed before and the target's directory after."""
    source, target = Path(source), Path(target)
    if source.is_dir():
        fsync_tree(source)
    else:
        fsync_file(source)
    os.replace(source, target)
    fsync_dir(target.parent)


@contextmanager
def atomic_dir(target: str | Path, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it becomes ``target`` durably.

    The staging folder is a hidden sibling (same filesystem, so the rename is atomic), every
    file in it is flushed before the rename and the parent after it. An existing ``target``
    is swapped out and removed only once the new folder is in place. On an error the
    staging folder is removed and ``target`` is left as it was. ``mode`` widens the
    private permissions ``mkdtemp`` gives (a base model is read by other processes).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if mode is not None:
            staging.chmod(mode)
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            replace_durably(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            replace_durably(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
