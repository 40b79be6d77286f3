"""Atomic outputs: everything is written into a temporary sibling, then renamed into place.

A failed or interrupted write leaves nothing behind, and an existing output is replaced only
with ``force``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loramerge.errors import OutputExists


def check_output(path: str | Path, *, force: bool) -> Path:
    """Refuse a non-empty existing output unless ``force``; call it before any heavy work.

    Example:
        >>> import tempfile
        >>> check_output(tempfile.mkdtemp(), force=False).is_dir()  # an empty folder is fine
        True
    """
    path = Path(path)
    if force or not path.exists():
        return path
    if path.is_dir() and not any(path.iterdir()):
        return path
    raise OutputExists(f"{path}: output exists and is not empty; pass --force (force=True) to overwrite it",
                       path=str(path))


@contextmanager
def atomic_output(path: str | Path, *, force: bool, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    With ``directory=True`` the yielded path is an empty folder, otherwise a file path.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> target = Path(tempfile.mkdtemp()) / "out"
        >>> with atomic_output(target, force=False) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> (target / "a.txt").read_text()
        'hi'
    """
    path = Path(path)
    check_output(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _replace(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    if target.is_dir() and new.is_dir() and not any(target.iterdir()):
        target.rmdir()
        os.replace(new, target)
        return
    # Move the old output aside first so the swap is a pair of renames, then delete it.
    trash = target.with_name(f".{target.name}.old-{os.getpid()}")
    _remove(trash)
    os.replace(target, trash)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(trash, target)
        raise
    _remove(trash)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
