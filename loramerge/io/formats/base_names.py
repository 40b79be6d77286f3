"""Resolving kohya module names against a base checkpoint's own weight names (safetensors headers only).

kohya flattens ``a.b_c.d`` to ``a_b_c_d``; this cannot be undone by string rules, but it can be
looked up: flatten every weight name of the model and match. This is how kohya's own merge
scripts, A1111 and ComfyUI resolve names, and it covers models that have no built-in table.

The base may be a single ``.safetensors`` file (an SD/SDXL single-file checkpoint, a bare UNet or
transformer), a folder of ``.safetensors`` shards, or a diffusers pipeline folder
(``model_index.json`` with ``unet/``, ``text_encoder/`` … subfolders; module names then carry
the component, as in ``unet.down_blocks.0…``). Only headers are read.

Example:
    >>> names = BaseNames({"model.diffusion_model.input_blocks.1.1.proj_in": (320, 320, 1, 1)})
    >>> names.lookup("lora_unet_input_blocks_1_1_proj_in")
    'model.diffusion_model.input_blocks.1.1.proj_in'
"""

from __future__ import annotations

from pathlib import Path

from loramerge.errors import SourceNotFound, UnknownFormat
from loramerge.io.formats.sd_names import KOHYA_PREFIXES, Shape, flatten
from loramerge.io.formats.tensorfile import read_safetensors_header
from loramerge.io.structured import read_json

_DENOISER = ("lora_unet_", "lora_transformer_", "lycoris_")
# Where each kohya prefix's modules live in the checkpoints people use as a base.
_CONTAINERS: dict[str, tuple[str, ...]] = {
    "model.diffusion_model.": _DENOISER,
    "diffusion_model.": _DENOISER,
    "unet.": _DENOISER,
    "transformer.": _DENOISER,
    "model.": _DENOISER,
    "cond_stage_model.transformer.": ("lora_te_", "lora_te1_"),
    "cond_stage_model.": ("lora_te_", "lora_te1_"),
    "conditioner.embedders.0.transformer.": ("lora_te1_", "lora_te_"),
    "conditioner.embedders.1.model.": ("lora_te2_",),
    "text_encoder.": ("lora_te_", "lora_te1_"),
    "text_encoder_2.": ("lora_te2_", "lora_te3_"),
    "text_encoder_3.": ("lora_te3_",),
    "": KOHYA_PREFIXES,
}


class BaseNames:
    """A base model's weight names (module path → weight shape), indexed by their kohya spelling."""

    def __init__(self, modules: dict[str, Shape], origin: str = "base") -> None:
        self.modules = dict(modules)
        self.origin = origin
        self._index: dict[str, str] = {}
        for path in self.modules:
            for container, prefixes in _CONTAINERS.items():
                if container and not path.startswith(container):
                    continue
                for rest in _spellings(path[len(container):], prefixes):
                    for prefix in prefixes:
                        self._index.setdefault(prefix + rest, path)

    @classmethod
    def from_path(cls, path: str | Path) -> BaseNames:
        """Read the weight names and shapes of the checkpoint at ``path`` (file or folder)."""
        path = Path(path)
        if not path.exists():
            raise SourceNotFound(f"{path}: no such base checkpoint")
        modules: dict[str, Shape] = {}
        if path.is_file():
            modules.update(_weights(path))
        elif (path / "model_index.json").is_file():
            index = read_json(path / "model_index.json")
            for component in index:
                folder = path / component
                if folder.is_dir():
                    for file in sorted(folder.glob("*.safetensors")):
                        modules.update({f"{component}.{k}": v for k, v in _weights(file).items()})
        else:
            for file in sorted(path.glob("*.safetensors")):
                modules.update(_weights(file))
        if not modules:
            raise UnknownFormat(f"{path}: no .safetensors weights found to resolve module names from")
        return cls(modules, origin=str(path))

    def index_names(self) -> list[str]:
        """Every spelling the index knows (for 'nearest name' suggestions)."""
        return list(self._index)

    def lookup(self, kohya_name: str) -> str | None:
        """The base module path that ``kohya_name`` flattens, or None."""
        return self._index.get(kohya_name)


_CLIP_TOP = ("encoder.", "embeddings.", "final_layer_norm.")


def _spellings(rest: str, prefixes: tuple[str, ...]) -> list[str]:
    """The flattened spellings of a weight path: for a CLIP text model both with and without the
    ``text_model`` level that transformers ≥ 5 dropped, so either kind of LoRA finds either kind of base.

    Example:
        >>> _spellings("encoder.layers.0.mlp.fc1", ("lora_te_",))
        ['encoder_layers_0_mlp_fc1', 'text_model_encoder_layers_0_mlp_fc1']
    """
    out = [flatten(rest)]
    if any(p.startswith("lora_te") for p in prefixes):
        if rest.startswith(_CLIP_TOP):
            out.append(flatten("text_model." + rest))
        elif rest.startswith("text_model."):
            out.append(flatten(rest.removeprefix("text_model.")))
    return out


def _weights(file: Path) -> dict[str, Shape]:
    header, _ = read_safetensors_header(file)
    out: dict[str, Shape] = {}
    for key, info in header.items():
        shape = info.get("shape", []) if isinstance(info, dict) else []
        if key.endswith(".weight") and len(shape) >= 2:
            out[key[: -len(".weight")]] = tuple(int(d) for d in shape)
    return out
