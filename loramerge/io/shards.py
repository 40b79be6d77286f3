"""Writing safetensors shards tensor by tensor, and naming and sizing them.

:class:`ShardWriter` writes a safetensors file the way :mod:`loramerge.io.checkpoint` reads one:
the header first (every tensor's dtype and shape is known before any data), then each tensor in
order, either computed (in row blocks, on a background thread) or copied byte for byte from an
input shard. :func:`pack_shards`, :func:`shard_names` and :func:`parse_size` decide how a model is
split into files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import queue
import re
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramerge.errors import CorruptFile, InvalidParameter
from loramerge.io.checkpoint import TensorInfo, code_itemsize, dtype_code

_COPY_CHUNK = 64 << 20
_ABORT_WAIT = 2.0  # seconds an abort waits for the writer thread before leaving it behind


def parse_size(text: str | int | None) -> int | None:
    """Bytes from ``"5GB"`` (10⁹), ``"500MiB"`` (2²⁰), ``"123"`` or an int; None stays None.

    Example:
        >>> parse_size("5GB"), parse_size("1.5GiB"), parse_size(4096)
        (5000000000, 1610612736, 4096)
    """
    if text is None or isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not match:
            raise InvalidParameter(f"--shard-size must look like 5GB, 500MB or 2GiB, got {text!r}")
        number, unit = float(match.group(1)), match.group(2).rstrip("B") or ""
        powers = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                  "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
        if unit not in powers:
            raise InvalidParameter(f"--shard-size must look like 5GB, 500MB or 2GiB, got {text!r}")
        value = int(number * powers[unit])
    if value is not None and value <= 0:
        raise InvalidParameter(f"--shard-size must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class OutEntry:
    """One tensor of an output shard: its name, stored dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * code_itemsize(self.dtype)


class ShardWriter:
    """Write a safetensors file tensor by tensor: the header is written first, from ``entries``.

    Tensors must then be given in the same order, each either as a tensor (:meth:`write`, or row
    blocks with :meth:`write_parts`) or as a byte range of another file (:meth:`copy`).
    :meth:`close` checks that all came.

    With ``background=True`` a thread does the writing, so the next block is computed while the
    kernel takes (and, when dirty pages pile up, throttles) this one. At most two parts are in
    flight, so a caller that reuses part buffers must rotate at least three.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import load_file
        >>> path = Path(tempfile.mkdtemp()) / "s.safetensors"
        >>> with ShardWriter(path, [OutEntry("a", "F32", (2,)), OutEntry("b", "BF16", (1, 2))]) as w:
        ...     w.write("a", torch.tensor([1.0, 2.0]))
        ...     w.write("b", torch.ones(1, 2, dtype=torch.bfloat16))
        >>> load_file(path)["a"].tolist()
        [1.0, 2.0]
    """

    def __init__(self, path: Path, entries: Iterable[OutEntry], metadata: dict[str, str] | None = None,
                 background: bool = False) -> None:
        self.path = path
        self.entries = list(entries)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for e in self.entries:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._next = 0
        self._error: BaseException | None = None
        self._aborted = False
        self._queue: queue.Queue[Callable[[], None] | None] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._work, name="loramerge-writer", daemon=True)
            self._thread.start()

    def _expect(self, name: str) -> OutEntry:
        if self._next >= len(self.entries) or self.entries[self._next].name != name:
            expected = self.entries[self._next].name if self._next < len(self.entries) else "nothing"
            raise RuntimeError(f"internal error: {self.path} expected tensor {expected}, got {name}")
        self._next += 1
        return self.entries[self._next - 1]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (on any device); its dtype and shape must match the header."""
        if tuple(tensor.shape) != self.entries[min(self._next, len(self.entries) - 1)].shape:
            raise RuntimeError(f"internal error: {name} has shape {tuple(tensor.shape)}, header says otherwise")
        self.write_parts(name, [tensor])

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Append one tensor given as consecutive row blocks (each of the header's dtype)."""
        entry = self._expect(name)
        written = 0
        for part in parts:
            if dtype_code(part.dtype) != entry.dtype:
                raise RuntimeError(f"internal error: {name} part is {part.dtype}, header says {entry.dtype}")
            data = part.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._submit(lambda data=data: self._fh.write(memoryview(data.numpy())))
            written += data.numel()
        if written != entry.nbytes:
            raise RuntimeError(f"internal error: {name} got {written} bytes, header says {entry.nbytes}")

    def copy(self, name: str, source: TensorInfo) -> None:
        """Append ``source``'s bytes unchanged (no decoding, chunked)."""
        entry = self._expect(name)
        if source.nbytes != entry.nbytes:
            raise RuntimeError(f"internal error: {name} has {source.nbytes} bytes, header says {entry.nbytes}")
        self._submit(lambda: self._copy(name, source))

    def _copy(self, name: str, source: TensorInfo) -> None:
        self._fh.flush()
        with open(source.shard, "rb") as src:
            remaining, offset = source.nbytes, source.start
            out_fd, in_fd = self._fh.fileno(), src.fileno()
            while remaining:
                done = _copy_range(in_fd, out_fd, offset, min(remaining, _COPY_CHUNK))
                if done <= 0:
                    raise CorruptFile(f"{source.shard}: tensor {name} is truncated")
                remaining -= done
                offset += done

    def _submit(self, job: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        if self._queue is None:
            job()
            return
        while True:
            try:
                self._queue.put(job, timeout=0.05)
                return
            except queue.Full:
                if self._error is not None:
                    raise self._error from None

    def _work(self) -> None:
        assert self._queue is not None
        while (job := self._queue.get()) is not None:
            if self._error is None and not self._aborted:
                try:
                    job()
                except BaseException as exc:  # re-raised in the caller's thread
                    self._error = exc

    def _finish(self) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        try:
            self._finish()
            if self._error is not None:
                raise self._error
            if self._next != len(self.entries):
                missing = self.entries[self._next].name
                raise RuntimeError(f"internal error: {self.path} closed before tensor {missing} was written")
        finally:
            self._fh.close()

    def abort(self) -> None:
        """Stop writing: queued parts are dropped and the thread gets a bounded wait, never an endless one.

        A writer thread stuck in the kernel (a hung network file system, a full pipe) is left behind
        as the daemon it is, with the file still open under it: closing a file another thread is
        writing would block on its lock, and closing the descriptor could let a later file reuse it.
        """
        self._aborted = True
        thread, jobs = self._thread, self._queue
        if thread is not None and jobs is not None:
            with contextlib.suppress(queue.Empty):
                while True:
                    jobs.get_nowait()
            with contextlib.suppress(queue.Full):
                jobs.put_nowait(None)
            thread.join(_ABORT_WAIT)
            self._thread = None
            if thread.is_alive():
                return
        self._fh.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _copy_range(in_fd: int, out_fd: int, offset: int, count: int) -> int:
    """Copy ``count`` bytes from ``in_fd`` at ``offset`` to the current position of ``out_fd``."""
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(in_fd, out_fd, count, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    data = os.pread(in_fd, count, offset)
    os.write(out_fd, data)
    return len(data)


def pack_shards(entries: list[OutEntry], limit: int) -> list[list[OutEntry]]:
    """Split ``entries`` in order into groups of at most ``limit`` bytes (a larger tensor goes alone).

    Example:
        >>> es = [OutEntry(n, "F32", (s,)) for n, s in [("a", 2), ("b", 2), ("c", 5)]]
        >>> [[e.name for e in g] for g in pack_shards(es, 16)]
        [['a', 'b'], ['c']]
    """
    groups: list[list[OutEntry]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return [g for g in groups if g] or [[]]


def shard_names(count: int, stem: str = "model") -> list[str]:
    """transformers' shard names: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``.

    Example:
        >>> shard_names(2)
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
        >>> shard_names(1, "diffusion_pytorch_model")
        ['diffusion_pytorch_model.safetensors']
    """
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_name(shard: Path) -> str:
    """The safetensors file name that replaces a (pickle or safetensors) shard name.

    Example:
        >>> safetensors_name(Path("pytorch_model-00001-of-00002.bin"))
        'model-00001-of-00002.safetensors'
    """
    name = shard.name
    if name.endswith(".safetensors"):
        return name
    stem = shard.stem
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model"):]
    return stem + ".safetensors"

