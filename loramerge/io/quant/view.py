"""A base checkpoint as the fold sees it: quantized weights dequantized on the fly, one tensor at a time.

:func:`open_base` is the one place where quantization meets the fold. It opens the checkpoint and,
for a pre-quantized one (bitsandbytes 4-bit or LLM.int8, block FP8, GPTQ, AWQ), returns a
:class:`DequantizedCheckpoint`: each quantized weight appears under its plain name
(``<module>.weight``) with its logical shape and a float dtype, its quantization tensors are hidden,
and reading its rows dequantizes them. With ``base_quant`` it does the opposite for a
full-precision base: every weight transformers would quantize reads as ``dequant(quant(W))``, the
weights a QLoRA adapter was trained against. Everything else reads and copies as stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from loramerge.errors import CorruptFile, UnsupportedAdapter
from loramerge.io.checkpoint import Checkpoint, TensorInfo, dtype_code, open_checkpoint
from loramerge.io.quant import bnb4, bnb4_stream, fp8, gptq, int8, lookup
from loramerge.io.quant.targets import bnb_targets

SUPPORTED = ("bitsandbytes 4-bit (nf4/fp4)", "bitsandbytes 8-bit (LLM.int8)", "fp8 block-scaled", "gptq", "awq gemm")
_BNB4_STATE = tuple(f".{s}" for s in bnb4.STATE_SUFFIXES)
_BAND = 1 << 19  # elements per read when a whole weight's absmax comes first: a few MB, kept in cache


@dataclass
class BaseQuant:
    """``--base-quant``: fold into ``dequant(quant(W))`` of every weight transformers would quantize in 4-bit.

    ``quant_type`` is ``nf4`` or ``fp4``; ``blocksize`` and ``double_quant`` are bitsandbytes'
    (``bnb_4bit_use_double_quant``); ``skip_modules`` is ``llm_int8_skip_modules`` (it replaces
    transformers' default of keeping ``lm_head`` in full precision).

    Example:
        >>> BaseQuant("nf4", blocksize=128, double_quant=True).describe()["blocksize"]
        128
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    skip_modules: list[str] | None = None

    def __post_init__(self) -> None:
        try:
            bnb4.check_settings(self.quant_type, self.blocksize)
        except ValueError as exc:
            from loramerge.errors import InvalidParameter

            raise InvalidParameter(str(exc)) from None

    def describe(self) -> dict[str, Any]:
        return {"quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant,
                "skip_modules": self.skip_modules}


@dataclass
class Decoder:
    """How to produce one logical tensor's rows: ``rows(ckpt, start, stop, buffer)``, float values.

    ``buffer`` (uint8, or None) may receive the result instead of a new tensor. ``cast`` is the dtype the format's own dequantization rounds to (bitsandbytes 4-bit returns the
    weight's dtype); None keeps the exact float32 values, so the fold rounds once, after the update.
    """

    info: TensorInfo
    hidden: tuple[str, ...]
    rows: Callable[[Checkpoint, int, int, torch.Tensor | None], torch.Tensor]
    kind: str
    cast: torch.dtype | None = None
    block: tuple[int, int] | None = None  # FP8: the block size of the scales


@dataclass
class DequantizedCheckpoint(Checkpoint):
    """A :class:`Checkpoint` whose ``tensors`` show logical (dequantized) weights; see :func:`open_base`."""

    decoders: dict[str, Decoder] = field(default_factory=dict)
    stored: Checkpoint | None = None
    quantization: dict[str, Any] = field(default_factory=dict)
    workspace: bnb4_stream.Workspace = field(default_factory=bnb4_stream.Workspace)

    def copyable(self, name: str) -> bool:
        return name not in self.decoders and super().copyable(name)

    def read_rows(self, name: str, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name``, decoded; ``buffer`` (uint8) may hold the result."""
        decoder = self.decoders.get(name)
        assert self.stored is not None
        if decoder is None:
            return self.stored.read_rows(name, start, stop, buffer=buffer)
        values = decoder.rows(self.stored, start, stop, buffer)
        return values.to(decoder.cast) if decoder.cast is not None else values

    @contextmanager
    def mapped(self, name: str) -> Iterator[torch.Tensor]:
        if name in self.decoders:
            yield _LazyRows(self, name)  # type: ignore[misc]  # decoded a row block at a time, as sliced
            return
        assert self.stored is not None
        with self.stored.mapped(name) as view:
            yield view

    def release(self) -> None:
        if self.stored is not None:
            self.stored.release()


class _LazyRows:
    """Stands in for a mapped tensor: ``rows[start:stop]`` decodes just those rows."""

    def __init__(self, ckpt: DequantizedCheckpoint, name: str) -> None:
        self.ckpt, self.name = ckpt, name
        self.shape = ckpt.tensors[name].shape

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        # the caller converts the rows at once, so one reused buffer holds every block (4 bytes an element: any dtype)
        count = (stop - start) * math.prod(self.shape[1:])
        buffer = self.ckpt.workspace.get("rows", 4 * count, torch.uint8, torch.device("cpu"))
        return self.ckpt.read_rows(self.name, start, stop, buffer=buffer)


def open_base(folder: str | Path, *, allow_pickle: bool = False, base_quant: BaseQuant | None = None,
              dtype: torch.dtype | None = None) -> Checkpoint:
    """The base checkpoint at ``folder`` as the fold reads it (see the module docstring).

    ``dtype`` is the dtype the weights are loaded in: a pre-quantized weight dequantizes to it (by
    default the dtype its quantization recorded, else the config's), and ``base_quant`` quantizes
    from it (default bfloat16), as transformers does with ``dtype=...``.

    Example:
        >>> import tempfile
        >>> from loramerge.io.formats.tensorfile import write_safetensors
        >>> folder = Path(tempfile.mkdtemp())
        >>> write_safetensors({"fc.weight": torch.randn(4, 64)}, folder / "model.safetensors")
        >>> type(open_base(folder)).__name__
        'Checkpoint'
    """
    ckpt = open_checkpoint(folder, allow_pickle=allow_pickle)
    method = quantization_method(ckpt)
    if method is not None and base_quant is not None:
        raise UnsupportedAdapter(f"{ckpt.location}: the base model is already quantized ({method}); drop --base-quant")
    if method is not None:
        return _pre_quantized(ckpt, method, dtype)
    if base_quant is not None:
        return _fake_quantized(ckpt, base_quant, dtype or torch.bfloat16)
    return ckpt


def quantization_method(ckpt: Checkpoint) -> str | None:
    """``bnb4``, ``bnb8``, ``fp8``, ``gptq``, ``awq`` or None; an unknown quantization is an error naming it."""
    config = ckpt.config.get("quantization_config") or ckpt.config.get("compression_config")
    names = ckpt.tensors
    if isinstance(config, dict) and config:
        method = str(config.get("quant_method", "")).lower()
        if method == "bitsandbytes":
            if config.get("load_in_4bit") or config.get("_load_in_4bit"):
                return "bnb4"
            if config.get("load_in_8bit") or config.get("_load_in_8bit"):
                return "bnb8"
        elif method == "fp8" and any(n.endswith("_scale_inv") for n in names):
            return "fp8"
        elif method == "gptq" and int(config.get("bits", 4)) == 4:
            return "gptq"
        elif method == "awq" and int(config.get("bits", 4)) == 4 and str(config.get("version", "gemm")).lower() == "gemm":
            return "awq"
        detail = ", ".join(f"{k}={config[k]}" for k in ("bits", "version", "fmt") if k in config)
        raise UnsupportedAdapter(
            f"{ckpt.location}: the base model is quantized with {method or 'an unnamed method'}"
            f"{f' ({detail})' if detail else ''}, which loramerge cannot dequantize (it reads {', '.join(SUPPORTED)}); "
            "nothing was written"
        )
    if any(".quant_state.bitsandbytes__" in n for n in names):
        return "bnb4"
    if any(n.endswith(".SCB") for n in names):
        return "bnb8"
    if any(n.endswith(".weight_scale_inv") for n in names):
        return "fp8"
    packed = next((n for n in names if n.endswith((".qweight", ".qzeros"))), None)
    if packed is not None:
        raise UnsupportedAdapter(f"{ckpt.location}: tensor {packed} is a packed int4 weight (GPTQ or AWQ) but "
                                 "config.json has no quantization_config saying which; nothing was written")
    return None


# ------------------------------------------------------------------------------------ pre-quantized


def _pre_quantized(ckpt: Checkpoint, method: str, dtype: torch.dtype | None) -> DequantizedCheckpoint:
    config = ckpt.config.get("quantization_config") or {}
    default = dtype or _config_dtype(ckpt.config)
    decoders: dict[str, Decoder] = {}
    workspace = bnb4_stream.Workspace()  # one set of work buffers for all weights: they are read in turn
    if method == "bnb4":
        for name in [n for n in ckpt.tensors if ".quant_state.bitsandbytes__" in n]:
            weight = name.split(".quant_state.")[0]
            decoders[weight] = _bnb4_decoder(ckpt, weight, dtype, workspace)
    elif method == "bnb8":
        for name in [n for n in ckpt.tensors if n.endswith(".SCB")]:
            module = name[: -len(".SCB")]
            decoders[f"{module}.weight"] = _int8_decoder(ckpt, module, default)
    elif method == "fp8":
        block = tuple(config.get("weight_block_size") or fp8.DEFAULT_BLOCK)
        for name in [n for n in ckpt.tensors if n.endswith("_scale_inv")]:
            weight = name[: -len("_scale_inv")]
            if weight in ckpt.tensors and ckpt.tensors[weight].dtype.startswith("F8"):
                decoders[weight] = _fp8_decoder(ckpt, weight, name, (int(block[0]), int(block[1])), default)
    else:
        for name in [n for n in ckpt.tensors if n.endswith(".qweight")]:
            module = name[: -len(".qweight")]
            decoders[f"{module}.weight"] = _int4_decoder(ckpt, module, method, config, default)
    if not decoders:
        raise CorruptFile(f"{ckpt.location}: config.json says {method} but no tensor is quantized that way")
    view = _view(ckpt, decoders, workspace)
    view.quantization = {"format": _format_name(method, config, decoders), "dequantized": sorted(decoders)}
    return view


def _format_name(method: str, config: dict[str, Any], decoders: dict[str, Decoder]) -> str:
    if method == "bnb4":
        kinds = sorted({d.kind for d in decoders.values()})
        return "bitsandbytes " + "/".join(kinds)
    return {"bnb8": "bitsandbytes int8", "fp8": "fp8 block-scaled", "gptq": "gptq int4", "awq": "awq int4"}[method]


def _config_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


def _small(ckpt: Checkpoint, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: ckpt.read(n) for n in names if n in ckpt.tensors}


def _bnb4_decoder(ckpt: Checkpoint, weight: str, dtype: torch.dtype | None,
                  workspace: bnb4_stream.Workspace) -> Decoder:
    names = [weight + suffix for suffix in _BNB4_STATE]
    try:
        state = bnb4.state_from_tensors(_small(ckpt, names), weight)
    except (KeyError, ValueError) as exc:
        raise CorruptFile(f"{ckpt.location}: the 4-bit quant state of {weight} is unreadable ({exc})") from None
    packed = ckpt.tensors[weight]
    total = math.prod(state.shape)
    storage = max(1, packed.nbytes // max(1, math.prod(packed.shape)))  # bytes per stored element (quant_storage)
    if packed.nbytes * 2 < total:
        raise CorruptFile(f"{ckpt.location}: {weight} holds {packed.nbytes} bytes, too few for shape {state.shape}")
    scales = state.scales()
    columns = math.prod(state.shape[1:])
    pairs = lookup.pair_table(bnb4.kernel_map(state.quant_map, state.quant_type))

    def rows(stored: Checkpoint, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        first, last = start * columns, stop * columns
        byte0, byte1 = first // 2, (last + 1) // 2
        row0, row1 = byte0 // storage, -(-byte1 // storage)
        held = workspace.get("raw", (row1 - row0) * storage, torch.uint8, torch.device("cpu"))
        raw = stored.read_rows(weight, row0, row1, buffer=held).contiguous().view(torch.uint8).reshape(-1)
        raw = raw[byte0 - row0 * storage: byte1 - row0 * storage]
        values = bnb4_stream.dequantize_range(raw, first, last - first, scales, pairs, state.blocksize, state.dtype,
                                              workspace, out=_output(buffer, last - first, state.dtype))
        return values.reshape(stop - start, *state.shape[1:])

    info = _logical(packed, weight, state.shape, dtype or state.dtype)
    return Decoder(info, tuple(n for n in names if n in ckpt.tensors), rows, state.quant_type, cast=state.dtype)


def _int8_decoder(ckpt: Checkpoint, module: str, dtype: torch.dtype) -> Decoder:
    weight, scb_name = f"{module}.weight", f"{module}.SCB"
    if weight not in ckpt.tensors or ckpt.tensors[weight].dtype != "I8":
        raise CorruptFile(f"{ckpt.location}: {scb_name} has no int8 {weight} beside it")
    scb = ckpt.read(scb_name).float()

    def rows(stored: Checkpoint, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        return int8.dequantize_int8(stored.read_rows(weight, start, stop), scb[start:stop])

    hidden = tuple(n for n in (scb_name, f"{module}.weight_format") if n in ckpt.tensors)
    return Decoder(_logical(ckpt.tensors[weight], weight, ckpt.tensors[weight].shape, dtype), hidden, rows, "int8")


def _fp8_decoder(ckpt: Checkpoint, weight: str, scale_name: str, block: tuple[int, int], dtype: torch.dtype) -> Decoder:
    info = ckpt.tensors[weight]
    scale_inv = ckpt.read(scale_name).float()
    try:
        block = fp8.block_size_of(info.shape, tuple(scale_inv.shape), block)
    except ValueError as exc:
        raise CorruptFile(f"{ckpt.location}: {scale_name}: {exc}") from None

    def rows(stored: Checkpoint, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        return fp8.dequantize_fp8(stored.read_rows(weight, start, stop), scale_inv, block, rows=(start, stop))

    hidden = tuple(n for n in (scale_name, weight.rsplit(".", 1)[0] + ".input_scale") if n in ckpt.tensors)
    return Decoder(_logical(info, weight, info.shape, dtype), hidden, rows, "fp8", block=block)


def _int4_decoder(ckpt: Checkpoint, module: str, method: str, config: dict[str, Any], dtype: torch.dtype) -> Decoder:
    names = {part: f"{module}.{part}" for part in ("qweight", "qzeros", "scales", "g_idx")}
    missing = [n for part, n in names.items() if part != "g_idx" and n not in ckpt.tensors]
    if missing:
        raise CorruptFile(f"{ckpt.location}: {method} layer {module} has no {missing[0]}")
    group_size = int(config.get("group_size", 128))
    scales_info = ckpt.tensors[names["scales"]]
    out_features = scales_info.shape[1]
    qweight_info = ckpt.tensors[names["qweight"]]
    in_features = qweight_info.shape[0] * 8 if method == "gptq" else qweight_info.shape[0]
    cache: dict[str, torch.Tensor] = {}

    def whole(stored: Checkpoint) -> torch.Tensor:
        if "w" not in cache:
            parts = {part: stored.read(n) for part, n in names.items() if n in stored.tensors}
            if method == "gptq":
                v2 = str(config.get("checkpoint_format") or config.get("format") or "gptq").lower() == "gptq_v2"
                cache["w"] = gptq.dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"),
                                                  group_size=group_size, zero_offset=0 if v2 else 1)
            else:
                cache["w"] = gptq.dequantize_awq(parts["qweight"], parts["qzeros"], parts["scales"],
                                                 group_size=group_size)
        return cache["w"]

    def rows(stored: Checkpoint, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        result = whole(stored)[start:stop]
        if stop >= out_features:
            cache.clear()  # the fold reads rows in order: the last block frees the dequantized weight
        return result

    info = _logical(qweight_info, f"{module}.weight", (out_features, in_features), dtype)
    hidden = tuple(n for n in names.values() if n in ckpt.tensors)
    return Decoder(info, hidden, rows, method)


def _output(buffer: torch.Tensor | None, count: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``count`` elements of ``dtype`` in the uint8 ``buffer``, if there is room; else None (a new tensor)."""
    needed = count * dtype.itemsize
    if buffer is None or buffer.dtype != torch.uint8 or not buffer.is_contiguous() or buffer.numel() < needed:
        return None
    return buffer.reshape(-1)[:needed].view(dtype)


def _logical(primary: TensorInfo, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorInfo:
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return TensorInfo(name, dtype_code(dtype), tuple(shape), primary.shard, primary.start, primary.start + nbytes)


def _view(ckpt: Checkpoint, decoders: dict[str, Decoder], workspace: bnb4_stream.Workspace) -> DequantizedCheckpoint:
    hidden = {n for d in decoders.values() for n in d.hidden}
    primary = {_primary_of(d): d for d in decoders.values()}
    tensors: dict[str, TensorInfo] = {}
    for name, info in ckpt.tensors.items():
        owner = primary.get(name)
        if owner is not None:
            tensors[owner.info.name] = owner.info
        elif name not in hidden:
            tensors[name] = info
    values = {f.name: getattr(ckpt, f.name) for f in fields(Checkpoint)}
    values["tensors"] = tensors
    return DequantizedCheckpoint(**values, decoders=decoders, stored=ckpt, workspace=workspace)


def _primary_of(decoder: Decoder) -> str:
    return decoder.info.name.rsplit(".", 1)[0] + ".qweight" if decoder.kind in ("gptq", "awq") else decoder.info.name


# ------------------------------------------------------------------------------------ --base-quant


def _fake_quantized(ckpt: Checkpoint, spec: BaseQuant, dtype: torch.dtype) -> DequantizedCheckpoint:
    targets = bnb_targets(ckpt.config, set(ckpt.tensors), spec.skip_modules, where=ckpt.location)
    decoders = {}
    workspace = bnb4_stream.Workspace()  # one set of work buffers for all weights: they are read in turn
    for name in targets.weights:
        info = ckpt.tensors[name]
        if not info.is_float or len(info.shape) != 2:
            continue
        decoders[name] = _fake_decoder(info, spec, dtype, name in targets.transposed, workspace)
    view = _view(ckpt, decoders, workspace)
    view.quantization = {"base_quant": spec.describe(), "dtype": str(dtype).removeprefix("torch."),
                         "quantized": sorted(decoders), "kept": targets.skipped, "not_in_checkpoint": targets.missing}
    return view


def _fake_decoder(info: TensorInfo, spec: BaseQuant, dtype: torch.dtype, transposed: bool,
                  workspace: bnb4_stream.Workspace) -> Decoder:
    """``dequant(quant(W))`` rows, computed as they are read; with double quantization (whose offset
    is the mean of every block's absmax), or blocks that straddle rows, the absmax of the whole
    weight is computed first, a row band at a time."""
    name, shape = info.name, info.shape
    total, columns = math.prod(shape), shape[1]
    itemsize = info.torch_dtype.itemsize if info.torch_dtype is not None else 4
    whole_blocks = columns % spec.blocksize == 0
    cache: dict[str, Any] = {}

    def prepare(stored: Checkpoint) -> None:
        if transposed:  # GPT-2 Conv1D: transformers quantizes W.T, so blocks run down the stored columns
            weight = stored.read(name).to(dtype)
            cache["whole"] = bnb4.fake_quantize_4bit(weight.T.contiguous(), spec.quant_type, spec.blocksize,
                                                     spec.double_quant).T.contiguous()
            return
        if whole_blocks and not spec.double_quant:
            cache["absmax"] = None  # each row block's own absmax is all it needs
            return
        step = max(1, _BAND // columns) if whole_blocks else shape[0]
        absmax = torch.cat([bnb4.block_absmax(stored.read_rows(name, s, min(shape[0], s + step)).to(dtype),
                                              spec.blocksize) for s in range(0, shape[0], step)])
        cache["absmax"] = absmax
        cache["scales"] = bnb4.double_quantize(absmax).dequantize() if spec.double_quant else None

    def rows(stored: Checkpoint, start: int, stop: int, buffer: torch.Tensor | None) -> torch.Tensor:
        if not cache:
            prepare(stored)
        if "whole" in cache:
            result = cache["whole"][start:stop]
        else:
            held = workspace.get("raw", (stop - start) * columns * itemsize, torch.uint8, torch.device("cpu"))
            values = stored.read_rows(name, start, stop, buffer=held).to(dtype)
            result = bnb4_stream.fake_quantize_range(values, start * columns, total, spec.quant_type, spec.blocksize,
                                                     cache["absmax"], cache.get("scales"), workspace,
                                                     out=_output(buffer, values.numel(), dtype))
            result = result.reshape(stop - start, *shape[1:])
        if stop >= shape[0]:
            cache.clear()
        return result

    return Decoder(_logical(info, name, shape, dtype), (), rows, spec.quant_type, cast=dtype)
