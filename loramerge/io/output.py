"""The output layer: every file and folder loramerge writes goes through here.

What it promises, for adapters, folded models, reports and every side file alike:

* **Atomic.** Everything is written into a hidden temporary sibling (``.OUT.tmp-<pid>-<random>@<host>``),
  then renamed into place in one step. A failed or interrupted write leaves nothing behind.
* **No replace without force.** An existing, non-empty output is replaced only with ``force``;
  the final rename never replaces anything without it (``renameat2(RENAME_NOREPLACE)``, else a
  hard link for files, else a lock file), so of two runs racing for the same new output the
  second fails cleanly instead of silently replacing the first. A run that finds another live
  run writing the same output refuses at once.
* **Clear errors.** Every ``OSError`` (no space, file-size limit, read-only file system,
  permissions, a path under a file, ``/proc`` …) becomes one :class:`~loramerge.errors.WriteFailed`
  line naming the output; nothing is left behind.
* **Signal-safe.** The rename and its record happen with SIGINT held back, so after Ctrl-C
  :func:`committed_outputs` says truly which outputs are in place.
* **Tidy.** Temporary siblings that a killed run on this host left (its process is gone) are
  removed by the next run that writes there, with a warning; another host's are left alone. Outputs get the permissions the umask gives, not
  the 0700/0600 of a temporary folder or file.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loramerge.errors import CorruptFile, LoramergeError, LoramergeWarning, OutputExists, WriteFailed

_SPECIAL_ROOTS = ("/proc", "/sys", "/dev")
_TEMP = re.compile(r"\.(?P<name>.+)\.(?:tmp|old|lock)-(?P<pid>\d+)(?:-[0-9a-f]+)?(?:@(?P<host>[\w.-]+))?")
# A temporary name says which host wrote it: on a shared file system, a process id means nothing elsewhere.
_HOST = re.sub(r"[^\w.-]", "_", socket.gethostname())[:64] or "host"
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100

_committed: list[Path] = []
_active: dict[Path, str] = {}  # temporary paths being written → the output's name as the user gave it
_state_lock = threading.Lock()


# ------------------------------------------------------------------------------------- checks


def output_path(path: str | Path) -> Path:
    """``path`` made absolute without following a final symlink (``-o .`` is the current folder by name).

    Example:
        >>> output_path("/data/x/../out").as_posix()
        '/data/out'
    """
    return Path(os.path.abspath(os.fspath(path)))


def check_output(path: str | Path, *, force: bool, directory: bool | None = None) -> Path:
    """Refuse an output that cannot or may not be written; call it before any heavy work.

    Refused: a non-empty existing output without ``force``; the current folder or one of its
    parents; a path under ``/proc``, ``/sys`` or ``/dev``; a path below a regular file; a folder
    (or file) where the other kind is wanted, without ``force``; a symlink, without ``force``
    (then the link itself is replaced); an output another live run is writing right now.

    Example:
        >>> import tempfile
        >>> check_output(tempfile.mkdtemp(), force=False).is_dir()  # an empty folder is fine
        True
        >>> try:
        ...     check_output(".", force=True)
        ... except OutputExists as e:
        ...     print(str(e).split(": ", 1)[1])
        the output would replace the current folder (or a folder that holds it); give a new path
    """
    try:
        return _checked_output(output_path(path), str(path), force=force, directory=directory)
    except LoramergeError as exc:
        raise exc.fill(path=str(path)) from None


def _checked_output(out: Path, shown: str, *, force: bool, directory: bool | None) -> Path:
    real = os.path.realpath(out)
    for root in _SPECIAL_ROOTS:
        if real == root or real.startswith(root + "/"):
            raise WriteFailed(f"{shown}: cannot write an output under {root}")
    cwd = output_path(os.getcwd())
    if out == cwd or out in cwd.parents or out.parent == out:
        raise OutputExists(f"{shown}: the output would replace the current folder (or a folder that holds it); "
                           "give a new path")
    _check_parents(out, shown)
    busy = _live_writer(out)
    if busy is not None:
        raise OutputExists(f"{shown}: another loramerge run (process {busy}) is writing this output right now")
    if out.is_symlink():
        if not force:
            target = os.readlink(out)
            raise OutputExists(f"{shown}: is a symbolic link (to {target}); pass --force (force=True) to replace "
                               "the link itself, or give the path it should write to")
        return out
    if not out.exists():
        return out
    if out.is_dir() and not any(out.iterdir()):
        if directory is False and not force:
            raise OutputExists(f"{shown}: is a folder; a file is written here; pass --force (force=True) to replace it")
        return out
    if not force:
        raise OutputExists(f"{shown}: output exists and is not empty; pass --force (force=True) to overwrite it")
    return out


def _check_parents(out: Path, shown: str) -> None:
    """The nearest existing ancestor must be a folder (``-o file.txt/out`` cannot work)."""
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise WriteFailed(f"{shown}: cannot create it: {parent} is a file, not a folder")
            return


def _live_writer(out: Path) -> int | None:
    """The process id of another live run writing ``out`` now (its temporary sibling exists), else None."""
    for sibling, pid in _siblings(out):
        if pid != os.getpid() and _alive(pid) and ".tmp-" in sibling.name:
            return pid
    return None


def _siblings(out: Path) -> Iterator[tuple[Path, int]]:
    """The temporary siblings of ``out`` (``.OUT.tmp-<pid>-…``, ``.OUT.old-<pid>``) and their process ids."""
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if match and match["name"] == out.name and match["host"] in (None, _HOST):
            yield Path(entry.path), int(match["pid"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` that killed runs left behind (their process is gone).

    Each removal is reported as a :class:`~loramerge.errors.LoramergeWarning`; the removed paths are
    returned. Siblings of a live process are left alone.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".out.tmp-999999999-ab").mkdir()  # no such process
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     [p.name for p in clean_leftovers(root / "out")]
        ['.out.tmp-999999999-ab']
    """
    out = output_path(path)
    removed = []
    for sibling, pid in _siblings(out):
        if pid == os.getpid() or _alive(pid):
            continue
        size = _size(sibling)
        _remove(sibling)
        if not (sibling.exists() or sibling.is_symlink()):
            removed.append(sibling)
            warnings.warn(f"removed {sibling} ({size / 2**20:.1f} MiB), left by an interrupted run (process {pid})",
                          LoramergeWarning, stacklevel=3)
    return removed


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size if path.exists() or path.is_symlink() else 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


# ------------------------------------------------------------------------------------- writing


@contextmanager
def atomic_output(path: str | Path, *, force: bool, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path`` in one step.

    With ``directory=True`` the yielded path is an empty folder, otherwise a file path (not yet
    created). Without ``force`` the rename never replaces an existing output. Any ``OSError`` in
    the block (or while renaming) becomes :class:`~loramerge.errors.WriteFailed` naming ``path``.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "out"
        >>> with atomic_output(target, force=False) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> (target / "a.txt").read_text(), oct(target.stat().st_mode & 0o777) != "0o700"
        ('hi', True)
    """
    out = check_output(path, force=force, directory=directory)
    shown = _shown(out, str(path))
    clean_leftovers(out)
    with translated_os_errors(shown):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}@{_HOST}")
        if directory:
            tmp.mkdir()
    trash = None
    with _state_lock:
        _active[tmp] = shown
    try:
        with translated_os_errors(shown, inside=tmp):
            yield tmp
            _normal_mode(tmp)
        with _sigint_held():
            with translated_os_errors(shown):
                trash = _commit(tmp, out, force=force, shown=shown)
            with _state_lock:
                _committed.append(out)
    except BaseException:
        with _sigint_held():
            _remove(tmp)
        raise
    finally:
        with _state_lock:
            _active.pop(tmp, None)
    if trash is not None:
        _remove(trash)  # a run killed here leaves .OUT.old-<pid>, which the next run removes


def _shown(out: Path, spelled: str) -> str:
    """How messages name ``out``: as the user spelled it, or, inside another output's temporary folder,
    as that output's path (the temporary name means nothing to the user)."""
    with _state_lock:
        for tmp, name in _active.items():
            if out == tmp or tmp in out.parents:
                rest = out.relative_to(tmp).as_posix()
                return name if rest == "." else f"{name}/{rest}"
    return spelled


def write_file(path: str | Path, data: bytes | str, *, force: bool) -> Path:
    """Write ``data`` (text is UTF-8) to the file ``path`` atomically, never replacing one without ``force``.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "report.json"
        >>> _ = write_file(p, "{}\\n", force=False)
        >>> try:
        ...     write_file(p, "{}\\n", force=False)
        ... except OutputExists as e:
        ...     print("refused")
        refused
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_output(path, force=force, directory=False) as tmp, open(tmp, "xb") as fh:
        fh.write(raw)
    return output_path(path)


def committed_outputs() -> list[Path]:
    """The outputs this process has moved into place since :func:`reset_committed` (for Ctrl-C messages)."""
    with _state_lock:
        return list(_committed)


def reset_committed() -> None:
    """Forget the outputs recorded so far (the CLI calls it when a command starts)."""
    with _state_lock:
        _committed.clear()


def _commit(tmp: Path, out: Path, *, force: bool, shown: str) -> Path | None:
    """Move ``tmp`` to ``out``; returns the old output moved aside (to delete after), if any."""
    if not force:
        if tmp.is_dir() and out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            with contextlib.suppress(OSError):
                out.rmdir()  # an empty folder may be replaced; if it filled meanwhile the rename refuses
        if not _rename_noreplace(tmp, out):
            raise OutputExists(f"{shown}: another run wrote this output while this one worked; nothing was "
                               "replaced (pass --force to replace it)")
        return None
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return None
    if out.is_symlink() or not out.is_dir():
        if tmp.is_dir():
            out.unlink()
            os.rename(tmp, out)
        else:
            os.replace(tmp, out)
        return None
    # Move the old output aside first so the swap is a pair of renames; it is deleted afterwards.
    trash = out.with_name(f".{out.name}.old-{os.getpid()}@{_HOST}")
    _remove(trash)
    os.replace(out, trash)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(trash, out)
        raise
    return trash


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist; False when it does (someone was faster)."""
    done = _renameat2(src, dst)
    if done is not None:
        return done
    if not src.is_dir():
        try:
            os.link(src, dst)  # fails with EEXIST instead of replacing
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        else:
            os.unlink(src)
            return True
    with _lock_file(dst):
        if dst.exists() or dst.is_symlink():
            if dst.is_dir() and not dst.is_symlink() and src.is_dir() and not any(dst.iterdir()):
                os.rename(src, dst)  # replacing an empty folder is allowed
                return True
            return False
        os.rename(src, dst)
        return True


_libc: ctypes.CDLL | bool | None = False


def _renameat2(src: Path, dst: Path) -> bool | None:
    """``renameat2(RENAME_NOREPLACE)``: True when renamed, False when ``dst`` exists, None when unavailable."""
    global _libc
    if _libc is False:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name, use_errno=True) if name else None
            _libc = lib if lib is not None and hasattr(lib, "renameat2") else None
        except OSError:
            _libc = None
    if _libc is None:
        return None
    result = _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)  # type: ignore[union-attr]
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        return False
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return None  # the file system does not support it: fall back
    raise OSError(code, os.strerror(code), str(dst))


@contextmanager
def _lock_file(dst: Path) -> Iterator[None]:
    """An exclusive ``.DST.lock-<pid>`` file beside ``dst`` for the fallback check-and-rename."""
    lock = dst.with_name(f".{dst.name}.lock-{os.getpid()}@{_HOST}")
    deadline = time.monotonic() + 10
    while True:
        others = [p for p, pid in _siblings(dst) if ".lock-" in p.name and p != lock and _alive(pid)]
        if not others:
            break
        if time.monotonic() > deadline:
            raise OSError(errno.EBUSY, "another run holds the output's lock", str(dst))
        time.sleep(0.05)
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        yield
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(lock)


def _normal_mode(tmp: Path) -> None:
    """Give the temporary folder (0700) or file (0600) the permissions a plain mkdir/open would."""
    if not (tmp.exists() and not tmp.is_symlink()):
        return
    mask = _umask()
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    with _state_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT back (it is delivered on exit) so a rename and its record are never split by Ctrl-C."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


# ---------------------------------------------------------------------------------------- errors

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file would exceed the file-size limit (ulimit -f) or the file system's largest file",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "a folder is in the way",
    errno.ENAMETOOLONG: "the path is too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENOENT: "a folder on the way does not exist and cannot be created",
    errno.EIO: "an input/output error",
    errno.EXDEV: "the temporary and final paths are on different file systems",
    errno.EEXIST: "the path exists",
    errno.ENOTEMPTY: "a folder in the way is not empty",
}


def describe_os_error(exc: OSError) -> str:
    """A short reason for an ``OSError``, without the traceback's noise.

    Example:
        >>> describe_os_error(OSError(errno.ENOSPC, "No space left on device"))
        'no space left on the device'
    """
    reason = _REASONS.get(exc.errno or -1)
    if reason is None:
        reason = (exc.strerror or str(exc) or type(exc).__name__).strip().splitlines()[0]
    if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ENOENT, errno.EISDIR) and exc.filename:
        reason += f" ({exc.filename})"
    return reason


def write_error(shown: str, exc: BaseException) -> WriteFailed:
    """The one-line :class:`~loramerge.errors.WriteFailed` for an error raised while writing ``shown``."""
    reason = describe_os_error(exc) if isinstance(exc, OSError) else _first_line(exc)
    return WriteFailed(f"{shown}: cannot write the output ({reason}); nothing was left behind", path=shown)


@contextmanager
def translated_os_errors(shown: str, *, inside: Path | None = None) -> Iterator[None]:
    """Turn an ``OSError`` (or a safetensors I/O error) raised inside the block into one-line errors.

    An error about a named file outside ``inside`` (the temporary output) is a failed *read* of an
    input and says so; every other one is :class:`~loramerge.errors.WriteFailed` naming ``shown``.
    """
    try:
        yield
    except LoramergeError:
        raise
    except OSError as exc:
        name = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes)) else None
        if inside is not None and name and not output_path(name).is_relative_to(output_path(inside)):
            raise CorruptFile(f"{name}: cannot read it ({describe_os_error(exc).split(' (')[0]})") from None
        raise write_error(shown, exc) from None
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError" and "Io" in str(exc):
            raise write_error(shown, _safetensors_os_error(exc)) from None
        raise


def _safetensors_os_error(exc: BaseException) -> OSError:
    match = re.search(r"code: (\d+)", str(exc))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return OSError(errno.EIO, _first_line(exc))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
