"""Hugging Face model checkpoints on disk, read one tensor (or one block of rows) at a time.

A checkpoint is a folder with ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (diffusers components: ``diffusion_pytorch_model.safetensors``
and its index; pickle ``pytorch_model*.bin`` only with ``allow_pickle``), or a single
``.safetensors`` file (an SD/SDXL/Flux single-file checkpoint). Only the headers are read up front; a tensor's bytes are read when it is needed, with a plain
positioned read rather than a memory map, so the resident memory of a fold or an extraction is
the tensors in flight, not the shard. Writing shards is :mod:`loramerge.io.shards`.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramerge.errors import CorruptFile, PickleRefused, SourceNotFound
from loramerge.io.formats.tensorfile import read_json_object, read_safetensors_header
from loramerge.io.structured import NULL, OBJECT, STRING, map_of, one_of, read_json, special_file_reason

CONFIG_NAME = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DIFFUSERS_SINGLE = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl")

# safetensors dtype codes and their element sizes; torch dtypes where torch has them.
_CODES: dict[str, tuple[int, torch.dtype | None]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64), "I32": (4, torch.int32), "I16": (2, torch.int16), "I8": (1, torch.int8),
    "U8": (1, torch.uint8), "BOOL": (1, torch.bool), "U16": (2, getattr(torch, "uint16", None)),
    "U32": (4, getattr(torch, "uint32", None)), "U64": (8, getattr(torch, "uint64", None)),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)), "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
}
_TORCH_CODES = {dt: code for code, (_, dt) in _CODES.items() if dt is not None}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` → ``"BF16"``).

    Example:
        >>> dtype_code(torch.float16)
        'F16'
    """
    return _TORCH_CODES[dtype]


def code_itemsize(code: str) -> int:
    """The bytes per element of a safetensors dtype code.

    Example:
        >>> code_itemsize("BF16"), code_itemsize("F8_E4M3")
        (2, 1)
    """
    return _CODES[code][0]


def code_dtype(code: str) -> torch.dtype | None:
    """The torch dtype of a safetensors code, or None when torch has no such dtype.

    Example:
        >>> code_dtype("BF16"), code_dtype("NOPE")
        (torch.bfloat16, None)
    """
    return _CODES[code][1] if code in _CODES else None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: shard, safetensors dtype code, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: Path
    start: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return code_dtype(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


@dataclass
class Checkpoint:
    """A model folder's config, shards (in order) and tensor index (name → :class:`TensorInfo`).

    ``file`` is set for a single-file checkpoint: then ``shards`` is that file, ``folder`` its
    parent and ``config`` empty.

    Example:
        >>> import tempfile, torch
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_safetensors({"w": torch.ones(2, 3)}, folder / "model.safetensors")
        >>> ckpt = open_checkpoint(folder)
        >>> ckpt.tensors["w"].shape, float(ckpt.read("w").sum())
        ((2, 3), 6.0)
    """

    folder: Path
    config: dict[str, Any]
    shards: list[Path]
    tensors: dict[str, TensorInfo]
    index_file: Path | None = None
    index_metadata: dict[str, Any] = field(default_factory=dict)
    shard_metadata: dict[Path, dict[str, str]] = field(default_factory=dict)
    pickled: bool = False
    file: Path | None = None
    _pickle_cache: tuple[Path, dict[str, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def location(self) -> Path:
        """The path the checkpoint was opened from: its folder, or the single file."""
        return self.file or self.folder

    @property
    def shard_stem(self) -> str:
        """``model``, or ``diffusion_pytorch_model`` for a diffusers component: the stem of new shard names."""
        first = self.shards[0].name if self.shards else ""
        return "diffusion_pytorch_model" if first.startswith("diffusion_pytorch_model") else "model"

    @property
    def weight_files(self) -> set[str]:
        """File names that hold weights or their index: never copied as plain files."""
        names = {p.name for p in self.shards}
        if self.index_file is not None:
            names.add(self.index_file.name)
        return names

    def tensors_in(self, shard: Path) -> list[TensorInfo]:
        """The tensors stored in ``shard``, in file order."""
        return [t for t in self.tensors.values() if t.shard == shard]

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def copyable(self, name: str) -> bool:
        """True when tensor ``name``'s stored bytes are its value, so a writer may copy them as they are."""
        return not self.pickled

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a fresh CPU tensor (no memory map stays behind)."""
        info = self.tensors[name]
        if not info.shape:
            return self.read_rows(name, 0, 1).reshape(())
        return self.read_rows(name, 0, info.shape[0])

    def read_rows(self, name: str, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (along the first dimension) of tensor ``name``, read from disk alone.

        ``buffer`` (uint8, large enough) is reused for the bytes instead of a new allocation.
        """
        info = self.tensors[name]
        if self.pickled:
            whole = self._pickled_shard(info.shard)[name]
            return (whole[start:stop] if whole.ndim else whole).clone()
        dtype = info.torch_dtype
        if dtype is None:
            raise CorruptFile(f"{info.shard}: tensor {name} has dtype {info.dtype}, which torch cannot hold")
        rows = info.shape[0] if info.shape else 1
        row_bytes = info.nbytes // rows if rows else 0
        count = (stop - start) * row_bytes
        if buffer is None or buffer.numel() < count:
            buffer = torch.empty(count, dtype=torch.uint8)
        buffer = buffer[:count]
        if count:
            with open(info.shard, "rb") as fh:
                fh.seek(info.start + start * row_bytes)
                got = fh.readinto(memoryview(buffer.numpy()))
            if got != count:
                raise CorruptFile(f"{info.shard}: tensor {name} is truncated")
        return buffer.view(dtype).reshape(stop - start, *info.shape[1:]) if info.shape else buffer.view(dtype)

    @contextmanager
    def mapped(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` as a read-only view of the file's pages (no copy), unmapped on exit.

        Converting straight from the page cache saves the copy :meth:`read_rows` makes; the
        mapping covers this one tensor only, so it adds at most one tensor to the resident set.
        """
        info = self.tensors[name]
        dtype = info.torch_dtype
        if self.pickled or dtype is None or info.nbytes == 0:
            yield self.read(name)
            return
        begin = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        with open(info.shard, "rb") as fh:
            view = mmap.mmap(fh.fileno(), info.end - begin, access=mmap.ACCESS_READ, offset=begin)
        flat: torch.Tensor | None = None  # set before the try: Ctrl-C may land before the assignment
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we only read it
                flat = torch.frombuffer(view, dtype=dtype, count=math.prod(info.shape), offset=info.start - begin)
            yield flat.view(info.shape)
        finally:
            flat = None
            with contextlib.suppress(BufferError):  # a caller still holding a view keeps the map alive
                view.close()

    def release(self) -> None:
        """Drop the cached pickle shard, if any."""
        self._pickle_cache = None

    def _pickled_shard(self, shard: Path) -> dict[str, torch.Tensor]:
        if self._pickle_cache is None or self._pickle_cache[0] != shard:
            self._pickle_cache = None
            self._pickle_cache = (shard, _load_pickle(shard))
        return self._pickle_cache[1]


SINGLE_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")


def open_checkpoint(folder: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Read the layout of the model checkpoint in ``folder``, or of a single ``.safetensors`` file (headers only).

    Refuses, naming the file: a folder without weights, an index naming a missing shard or a
    tensor its shard lacks, a truncated shard, and pickle weights unless ``allow_pickle``.
    """
    folder = Path(folder)
    if folder.is_file():
        if folder.suffix in SINGLE_PICKLE_SUFFIXES:
            # An original single-file .ckpt (SD 1.x/2.x, SDXL): read with weights_only, folded into a .safetensors.
            if not allow_pickle:
                raise PickleRefused(
                    f"{folder}: this checkpoint is a pickle, which can run code when loaded; pass --allow-pickle "
                    "(allow_pickle=True) to read it with torch.load(weights_only=True)"
                )
            ckpt = Checkpoint(folder.parent, {}, [folder], {}, file=folder, pickled=True)
            _index_pickles(ckpt, None)
            return ckpt
        if folder.suffix != ".safetensors":
            raise SourceNotFound(f"{folder}: a single-file checkpoint must be a .safetensors file "
                                 "(or, with --allow-pickle, a .ckpt)")
        ckpt = Checkpoint(folder.parent, {}, [folder], {}, file=folder)
        _index_safetensors(ckpt, None)
        return ckpt
    if not folder.is_dir():
        raise SourceNotFound(f"{folder}: not a model folder")
    config = _read_config(folder)
    for index_name in (SAFE_INDEX, DIFFUSERS_INDEX):
        if (folder / index_name).is_file():
            shards, index_meta, weight_map = _read_index(folder / index_name)
            ckpt = Checkpoint(folder, config, shards, {}, index_file=folder / index_name, index_metadata=index_meta)
            _index_safetensors(ckpt, weight_map)
            return ckpt
    for single_name in (SAFE_SINGLE, DIFFUSERS_SINGLE):
        if (folder / single_name).is_file():
            ckpt = Checkpoint(folder, config, [folder / single_name], {})
            _index_safetensors(ckpt, None)
            return ckpt
    if (folder / PICKLE_INDEX).is_file() or (folder / PICKLE_SINGLE).is_file():
        return _open_pickles(folder, config, allow_pickle)
    raise SourceNotFound(
        f"{folder}: no model weights ({SAFE_SINGLE}, {SAFE_INDEX}, or with --allow-pickle {PICKLE_SINGLE})"
    )


def _open_pickles(folder: Path, config: dict[str, Any], allow_pickle: bool) -> Checkpoint:
    """A folder of ``pytorch_model*.bin`` weights, read only when the caller allows pickles."""
    pickle_index = folder / PICKLE_INDEX
    where = pickle_index if pickle_index.is_file() else folder / PICKLE_SINGLE
    if not allow_pickle:
        raise PickleRefused(
            f"{where}: this model's weights are pickles, which can run code when loaded; pass --allow-pickle "
            "(allow_pickle=True) to read them with torch.load(weights_only=True)"
        )
    if pickle_index.is_file():
        shards, index_meta, weight_map = _read_index(pickle_index)
        ckpt = Checkpoint(folder, config, shards, {}, index_file=pickle_index, index_metadata=index_meta,
                          pickled=True)
    else:
        ckpt, weight_map = Checkpoint(folder, config, [folder / PICKLE_SINGLE], {}, pickled=True), None
    _index_pickles(ckpt, weight_map)
    return ckpt


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    return read_json_object(path) if path.is_file() else {}


def _read_index(path: Path) -> tuple[list[Path], dict[str, Any], dict[str, str]]:
    index = read_json(path, schema={"weight_map": map_of(STRING), "metadata": one_of(OBJECT, NULL)})
    if "weight_map" not in index:
        raise CorruptFile(f"{path}: not a valid weight index (no weight_map)")
    weight_map = index["weight_map"]
    shards: list[Path] = []
    for file_name in dict.fromkeys(weight_map.values()):
        shard = path.parent / file_name
        if Path(file_name).name != file_name:
            raise CorruptFile(f"{path}: shard name {file_name!r} is not a plain file name")
        if not shard.is_file():
            raise CorruptFile(f"{path}: names shard {file_name}, which is missing from {path.parent}")
        shards.append(shard)
    return sorted(shards), dict(index.get("metadata") or {}), weight_map


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """The tensors of one safetensors file in data order, with absolute offsets, and its metadata.

    Checks that every byte range lies inside the file and matches its dtype and shape.

    Example:
        >>> import tempfile
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> p = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> write_safetensors({"b": torch.zeros(3), "a": torch.zeros(2, dtype=torch.float16)}, p)
        >>> [(t.name, t.dtype, t.shape, t.nbytes) for t in read_header(p)[0]]
        [('b', 'F32', (3,), 12), ('a', 'F16', (2,), 4)]
    """
    header, metadata = read_safetensors_header(path)
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
    base = 8 + size
    file_size = path.stat().st_size
    infos = []
    for name, entry in header.items():
        try:
            code = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFile(f"{path}: tensor {name} has a malformed header entry") from None
        if code not in _CODES:
            raise CorruptFile(f"{path}: tensor {name} has unknown dtype {code!r}")
        expected = math.prod(shape) * _CODES[code][0]
        if end - begin != expected or begin < 0 or base + end > file_size:
            what = "is truncated" if base + end > file_size else "has a byte range that does not match its shape"
            raise CorruptFile(f"{path}: tensor {name} {what}")
        infos.append(TensorInfo(name, code, shape, path, base + begin, base + end))
    infos.sort(key=lambda t: t.start)
    return infos, metadata


def _index_safetensors(ckpt: Checkpoint, weight_map: dict[str, str] | None) -> None:
    for shard in ckpt.shards:
        infos, metadata = read_header(shard)
        ckpt.shard_metadata[shard] = metadata
        for info in infos:
            ckpt.tensors.setdefault(info.name, info)
    _check_weight_map(ckpt, weight_map)


def _index_pickles(ckpt: Checkpoint, weight_map: dict[str, str] | None) -> None:
    for shard in ckpt.shards:
        for name, tensor in _load_pickle(shard).items():
            code = _TORCH_CODES.get(tensor.dtype)
            if code is None:
                raise CorruptFile(f"{shard}: tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
            nbytes = tensor.numel() * tensor.element_size()
            ckpt.tensors.setdefault(name, TensorInfo(name, code, tuple(tensor.shape), shard, 0, nbytes))
        ckpt.shard_metadata[shard] = {"format": "pt"}
    _check_weight_map(ckpt, weight_map)


def _check_weight_map(ckpt: Checkpoint, weight_map: dict[str, str] | None) -> None:
    if weight_map is None:
        return
    for name, file_name in weight_map.items():
        info = ckpt.tensors.get(name)
        if info is None or info.shard.name != file_name:
            raise CorruptFile(f"{ckpt.index_file}: names tensor {name} in {file_name}, but that shard does not hold it")


def _load_pickle(shard: Path) -> dict[str, torch.Tensor]:
    from loramerge.io.formats.tensorfile import read_pickle

    try:
        state = torch.load(str(shard), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old (non-zip) pickle cannot be memory-mapped; read it whole
        return read_pickle(shard, allow_pickle=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a single-file .ckpt wraps its weights with training state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptFile(f"{shard}: expected a mapping of names to tensors")
    return state


def iter_plain_files(folder: Path, skip: set[str], *, follow_symlinks: bool = False) -> Iterator[Path]:
    """Files of ``folder`` (recursively) that are not weights, hidden, or named in ``skip``: the files a
    fold copies beside its shards, checked by :func:`iter_folder_files`.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> for name in ("config.json", "tokenizer.json", "model.safetensors", "tf_model.h5", ".cache"):
        ...     _ = (folder / name).write_text("x")
        >>> [p.name for p in iter_plain_files(folder, {"config.json"})]
        ['tokenizer.json']
    """
    def wanted(rel: Path) -> bool:
        name = rel.name
        return not (rel.as_posix() in skip or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"))

    return iter_folder_files(folder, wanted, follow_symlinks=follow_symlinks)


def iter_folder_files(folder: Path, wanted: Callable[[Path], bool] = lambda rel: True, *,
                      follow_symlinks: bool = False) -> Iterator[Path]:
    """The non-hidden files of ``folder`` (recursively, sorted) whose relative path ``wanted`` accepts,
    each checked as a file that may be copied into an output.

    Only regular files are accepted. A FIFO, device, socket, broken link or anything under
    ``/proc``, ``/sys`` or ``/dev`` is refused, and so is a symbolic link that leaves the folder
    (for a Hugging Face cache snapshot: the repository's cache folder, where its blobs live)
    unless ``follow_symlinks``: a link such as ``tokenizer.json -> /proc/self/environ`` would
    otherwise copy secrets into the output.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "vocab.txt").symlink_to("/proc/self/environ")
        >>> try:
        ...     list(iter_folder_files(folder))
        ... except CorruptFile as e:
        ...     print(str(e).split(": ", 1)[1])
        is a device or kernel file (it leads to /proc/...), not a regular file; only regular files are copied from the base folder
    """
    boundary = copy_boundary(folder)
    visited: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real_root = os.path.realpath(root)
        if real_root in visited:  # a link back up the tree
            dirs[:] = []
            continue
        visited.add(real_root)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs:
            _check_link(Path(root) / name, boundary, follow_symlinks)
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(folder)
            if any(part.startswith(".") for part in rel.parts) or not wanted(rel):
                continue
            if path.is_symlink() and not path.exists():
                raise CorruptFile(f"{path}: is a broken symbolic link (to {os.readlink(path)})")
            reason = special_file_reason(path)
            if reason is not None:
                raise CorruptFile(f"{path}: {reason}; only regular files are copied from the base folder")
            _check_link(path, boundary, follow_symlinks)
            yield path


def copy_boundary(folder: Path) -> Path:
    """The folder that links inside ``folder`` may point into: ``folder`` itself, or for a Hugging Face
    cache snapshot (``models--org--name/snapshots/<commit>``) the repository's cache folder.

    Example:
        >>> copy_boundary(Path("/c/hub/models--org--m/snapshots/" + "a" * 40)).name
        'models--org--m'
    """
    real = Path(os.path.realpath(folder))
    for parent in (real, *real.parents):
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith("models--"):
            return parent.parent.parent
    return real


def _check_link(path: Path, boundary: Path, follow: bool) -> None:
    """Refuse ``path`` when it resolves outside ``boundary`` (a symlink somewhere on its way), unless ``follow``."""
    real = Path(os.path.realpath(path))
    if follow or real == boundary or boundary in real.parents:
        return
    raise CorruptFile(
        f"{path}: is a symbolic link to {real}, outside the base folder; a fold copies only files inside it "
        "(pass --follow-symlinks, follow_symlinks=True, to copy what it points to)"
    )
