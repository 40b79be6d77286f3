"""Single-file SD 1.x/2.x, SDXL and Flux.1 checkpoints: which tensor holds each adapter module's weight.

Adapters name modules the way diffusers does, behind the pipeline component
(``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj``,
``transformer.transformer_blocks.0.attn.to_q``). A single-file checkpoint keeps the original
names: LDM/SGM for the UNet (``model.diffusion_model.input_blocks.4.1.…``), HF CLIP behind
``cond_stage_model.transformer.`` (SD 1.x) or ``conditioner.embedders.0.transformer.`` (SDXL),
OpenCLIP behind ``cond_stage_model.model.`` (SD 2.x) or ``conditioner.embedders.1.model.`` (SDXL)
and BFL names for Flux (``double_blocks.0.img_attn.qkv``, bare or behind
``model.diffusion_model.``). Some original weights hold several modules: OpenCLIP's
``attn.in_proj_weight`` stacks q, k and v, Flux's ``qkv`` and ``linear1`` stack q, k, v (and the
MLP input), and Flux's final ``adaLN_modulation`` stores diffusers' (scale, shift) as (shift,
scale). Those modules resolve to row slices (:class:`~loramerge.io.names.Target`); OpenCLIP's
``text_projection`` is stored transposed.

The UNet and Flux maps are generated from the checkpoint's own block structure (levels, layers
per level, attention and transformer depth, block counts, widths), with the same generators as
the built-in name tables, so a pruned or tiny model maps as exactly as the real one. Module names
that are still kohya spellings (a LoRA for a model no table knows, such as SD3) are matched
against the checkpoint's flattened names, as A1111 and ComfyUI do.

Example:
    >>> from loramerge.io.formats.sd_names import SDXL_UNET
    >>> shapes = {f"model.diffusion_model.{ldm}.weight": shape for _, ldm, shape in unet_modules(SDXL_UNET)}
    >>> shapes["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] = (3840, 1280)
    >>> resolve = SingleFileResolver(shapes)
    >>> resolve.family
    'sdxl'
    >>> [t.name for t in resolve("unet.down_blocks.1.attentions.0.proj_in.weight", shapes)]
    ['model.diffusion_model.input_blocks.4.1.proj_in.weight']
    >>> resolve("text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.weight", shapes)
    Target(name='conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight', start=1280, size=1280, source=0, transposed=False)
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping

from loramerge.io.formats.base_names import BaseNames
from loramerge.io.formats.comfyui import control_norm
from loramerge.io.formats.sd_names import (
    ARCHITECTURES,
    KOHYA_PREFIXES,
    FluxSpec,
    Shape,
    UNetSpec,
    flux_architecture,
    unet_modules,
)
from loramerge.io.names import ResolverResult, Target

UNET_CONTAINERS = ("model.diffusion_model.", "diffusion_model.", "")
FLUX_CONTAINERS = ("", "model.diffusion_model.", "diffusion_model.")
# Where each text encoder lives, by pipeline component: (container, naming) in order of preference.
TEXT_CONTAINERS: dict[str, tuple[tuple[str, str], ...]] = {
    "text_encoder": (("cond_stage_model.transformer.", "hf"), ("conditioner.embedders.0.transformer.", "hf"),
                     ("cond_stage_model.model.", "openclip"), ("text_encoders.clip_l.transformer.", "hf")),
    "text_encoder_2": (("conditioner.embedders.1.model.", "openclip"), ("text_encoders.t5xxl.transformer.", "hf"),
                       ("text_encoders.clip_g.transformer.", "hf")),
}
_OPENCLIP_LAYER = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)")
_OPENCLIP_LEAVES = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
_OPENCLIP_TOP = {"final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
                 "embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding"}


class SingleFileResolver:
    """A :data:`~loramerge.io.names.Resolver` for one single-file checkpoint, built from its tensor shapes.

    ``family`` is the architecture the checkpoint's layout shows (``sd1``, ``sd2``, ``sdxl``,
    ``flux``) or None when it cannot tell (a bare UNet without text encoders or added embeddings).
    """

    def __init__(self, shapes: Mapping[str, Shape]) -> None:
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        # canonical module → (original module, rows in the original, rows in the module, count); None: all rows
        self.modules: dict[str, list[tuple[str, int, int, int | None]]] = {}
        self.components: dict[str, str] = {}
        self.parameters: dict[str, str] = {}  # canonical parameter → tensor, where the leaf is renamed too
        self.family: str | None = None
        self._unet()
        self._flux()
        self._text_encoders()
        self._kohya = BaseNames({n[: -len(".weight")]: s for n, s in self.shapes.items()
                                 if n.endswith(".weight") and len(s) >= 2}, origin="checkpoint")

    # ------------------------------------------------------------------------------------ lookups

    def __call__(self, path: str, names: Collection[str]) -> ResolverResult:
        if path in names:
            return path
        if path in self.parameters:
            return self.parameters[path]
        module, _, leaf = path.rpartition(".")
        if module in self.modules:
            return [Target(f"{original}.{leaf}", start=src, size=size, source=dst)
                    for original, src, dst, size in self.modules[module]]
        component, _, rest = path.partition(".")
        text = self.components.get(component)
        if text is not None:
            return self._text(text, rest, names)
        if module.startswith(KOHYA_PREFIXES):
            found = self._kohya.lookup(module)
            return f"{found}.{leaf}" if found is not None and f"{found}.{leaf}" in names else None
        return None

    def _text(self, layout: str, rest: str, names: Collection[str]) -> ResolverResult:
        container, naming = layout.split("|")
        if naming == "hf":
            for candidate in (rest, "text_model." + rest, rest.removeprefix("text_model.")):
                if container + candidate in names:
                    return container + candidate
            return None
        if rest.removeprefix("text_model.") in _OPENCLIP_TOP:
            return container + _OPENCLIP_TOP[rest.removeprefix("text_model.")]
        if rest == "text_projection.weight":
            return Target(container + "text_projection", transposed=True)
        match = _OPENCLIP_LAYER.fullmatch(rest)
        if match is None:
            return None
        layer, tail = match.groups()
        block = f"{container}transformer.resblocks.{layer}."
        module, _, leaf = tail.rpartition(".")
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused = f"{block}attn.in_proj_{leaf}"
            if fused not in self.shapes:
                return None
            rows = self.shapes[fused][0] // 3
            return Target(fused, start="qkv".index(module[-6]) * rows, size=rows)
        if module in _OPENCLIP_LEAVES:
            return f"{block}{_OPENCLIP_LEAVES[module]}.{leaf}"
        return None

    # ------------------------------------------------------------------------------ structure

    def _unet(self) -> None:
        container = next((c for c in UNET_CONTAINERS if f"{c}input_blocks.0.0.weight" in self.shapes
                          and f"{c}out.2.weight" in self.shapes), None)
        if container is None:
            return
        unet = {n[len(container):]: s for n, s in self.shapes.items() if n.startswith(container)}
        spec = infer_unet_spec(unet)
        if spec is None:
            return
        for path, ldm, _ in unet_modules(spec):
            if f"{ldm}.weight" in unet:
                self.modules[f"unet.{path}"] = [(container + ldm, 0, 0, None)]
        if spec.add_embedding_in is not None or any(n.startswith("conditioner.embedders.") for n in self.shapes):
            self.family = "sdxl"
        elif any(n.startswith("cond_stage_model.model.") for n in self.shapes):
            self.family = "sd2"
        elif any(n.startswith("cond_stage_model.transformer.") for n in self.shapes):
            self.family = "sd1"

    def _flux(self) -> None:
        container = next((c for c in FLUX_CONTAINERS if f"{c}double_blocks.0.img_attn.qkv.weight" in self.shapes
                          or f"{c}single_blocks.0.linear1.weight" in self.shapes), None)
        if container is None:
            return
        flux = {n[len(container):]: s for n, s in self.shapes.items() if n.startswith(container)}
        spec = infer_flux_spec(flux)
        if spec is None:
            return
        arch = flux_architecture(spec)
        for canonical, original in arch.original.items():
            if f"{original}.weight" in flux:
                self.modules[canonical] = [(container + original, 0, 0, None)]
        for kohya_name, original in arch.fused_original.items():
            if f"{original}.weight" not in flux:
                continue
            for piece in arch.kohya[kohya_name].pieces:
                self.modules.setdefault(piece.module, []).append((container + original, piece.src, piece.dst, piece.size))
        for name in flux:  # the q/k RMSNorm scales a Flux control LoRA replaces (BFL: scale, diffusers: weight)
            canonical = control_norm(name)
            if canonical is not None:
                self.parameters[canonical] = container + name
        self.family = "flux"

    def _text_encoders(self) -> None:
        for component, options in TEXT_CONTAINERS.items():
            for container, naming in options:
                if any(n.startswith(container) for n in self.shapes):
                    self.components[component] = f"{container}|{naming}"
                    break

    def describe(self) -> str:
        """What the checkpoint is, for messages: 'a single-file SDXL checkpoint (UNet, text_encoder, text_encoder_2)'."""
        parts = [p for p, found in (("UNet", any(m.startswith("unet.") for m in self.modules)),
                                    ("transformer", any(m.startswith("transformer.") for m in self.modules)))
                 if found]
        parts += list(self.components)
        label = ARCHITECTURES[self.family].label if self.family else "unrecognised"
        return f"a single-file {label} checkpoint ({', '.join(parts) or 'no known components'})"

    def nearest(self, path: str, count: int = 3) -> list[str]:
        """The known modules most like ``path``, each with its tensor in the checkpoint, for 'did you mean'."""
        module = path.rpartition(".")[0]
        close = difflib.get_close_matches(module, list(self.modules), n=count, cutoff=0.6)
        return [f"{m} ({self.modules[m][0][0]}.weight)" for m in close]


def infer_unet_spec(shapes: Mapping[str, Shape]) -> UNetSpec | None:
    """The :class:`~loramerge.io.formats.sd_names.UNetSpec` of an LDM/SGM UNet from its weight names and shapes.

    ``shapes`` holds the UNet's tensors without their container prefix (``input_blocks.0.0.weight`` …).
    None when the names do not form an LDM UNet.

    Example:
        >>> from loramerge.io.formats.sd_names import SDXL_UNET
        >>> fake = {f"{ldm}.weight": shape for _, ldm, shape in unet_modules(SDXL_UNET)}
        >>> infer_unet_spec(fake) == SDXL_UNET
        True
    """
    def blocks(kind: str) -> list[int]:
        return sorted({int(n.split(".")[1]) for n in shapes if n.startswith(kind + ".") and n.split(".")[1].isdigit()})

    inputs = blocks("input_blocks")
    if "input_blocks.0.0.weight" not in shapes or "out.2.weight" not in shapes or inputs != list(range(len(inputs))):
        return None
    downs = [k for k in inputs if f"input_blocks.{k}.0.op.weight" in shapes]
    layers = downs[0] - 1 if downs else len(inputs) - 1
    levels = len(downs) + 1
    if layers < 1 or len(inputs) != 1 + levels * layers + levels - 1:
        return None
    channels, attention, depth = [], [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        out = shapes.get(f"input_blocks.{first}.0.out_layers.3.weight")
        if out is None:
            return None
        channels.append(int(out[0]))
        attention.append(f"input_blocks.{first}.1.proj_in.weight" in shapes)
        depth.append(_transformer_depth(shapes, f"input_blocks.{first}.1."))
    proj = next((s for n, s in shapes.items() if n.endswith(".proj_in.weight")), None)
    cross = next((s for n, s in shapes.items() if n.endswith(".attn2.to_k.weight")), None)
    label = shapes.get("label_emb.0.0.weight")
    return UNetSpec(
        channels=tuple(channels), attention=tuple(attention), depth=tuple(depth),
        mid_depth=_transformer_depth(shapes, "middle_block.1."), cross_dim=int(cross[1]) if cross else channels[0],
        linear_projection=proj is not None and len(proj) == 2, layers=layers,
        in_channels=int(shapes["input_blocks.0.0.weight"][1]), out_channels=int(shapes["out.2.weight"][0]),
        add_embedding_in=int(label[1]) if label is not None else None,
    )


def _transformer_depth(shapes: Mapping[str, Shape], prefix: str) -> int:
    found = [int(n[len(prefix):].split(".")[1]) for n in shapes
             if n.startswith(prefix + "transformer_blocks.") and n[len(prefix):].split(".")[1].isdigit()]
    return max(found) + 1 if found else 0


def infer_flux_spec(shapes: Mapping[str, Shape]) -> FluxSpec | None:
    """The :class:`~loramerge.io.formats.sd_names.FluxSpec` of a BFL-named Flux transformer (names without container).

    Example:
        >>> from loramerge.io.formats.sd_names import ARCHITECTURES
        >>> arch = ARCHITECTURES["flux"]
        >>> fake = {f"{o}.weight": arch.shapes[c] for c, o in arch.original.items()}
        >>> fake.update({f"{o}.weight": arch.kohya[k].shape for k, o in arch.fused_original.items()})
        >>> infer_flux_spec(fake) == FluxSpec()
        True
    """
    def count(kind: str) -> int:
        found = {int(n.split(".")[1]) for n in shapes if n.startswith(kind + ".") and n.split(".")[1].isdigit()}
        return max(found) + 1 if found else 0

    img = shapes.get("img_in.weight")
    if img is None:
        return None
    mlp = shapes.get("double_blocks.0.img_mlp.0.weight") or shapes.get("single_blocks.0.linear2.weight")
    if mlp is None:
        return None
    hidden = int(img[0])
    mlp_rows = int(mlp[0]) if "double_blocks.0.img_mlp.0.weight" in shapes else int(mlp[1]) - hidden

    def width(name: str, default: int) -> int:
        return int(shapes[name][1]) if name in shapes else default

    return FluxSpec(
        double=count("double_blocks"), single=count("single_blocks"), hidden=hidden, mlp=mlp_rows,
        in_channels=int(img[1]), context_in=width("txt_in.weight", hidden), pooled_in=width("vector_in.in_layer.weight", hidden),
        time_in=width("time_in.in_layer.weight", 256), guidance="guidance_in.in_layer.weight" in shapes,
    )
