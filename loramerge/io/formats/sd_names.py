"""Module-name tables for Stable Diffusion 1.x, 2.x, SDXL and Flux.1, and the kohya spellings of each module.

kohya names are the module path with every ``.`` turned into ``_`` behind a component prefix
(``lora_unet_``, ``lora_te_``, ``lora_te1_`` …), so they cannot be turned back into dotted paths
by string rules. Instead, every module of every supported model is listed here, generated from
the model's block structure, with the kohya spellings that name it. Lookups are exact.

Canonical names are the paths that diffusers itself uses, behind the pipeline component:
``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.…`` and
``transformer.transformer_blocks.0.attn.to_q``. A kohya SDXL file and the same LoRA saved by
diffusers therefore hold the same module names.

kohya's SD 1.x/2.x files flatten the diffusers UNet names; its SDXL files flatten the original
(SGM/LDM) UNet names (``input_blocks.4.1.…``); its Flux files flatten the original BFL names,
where q, k and v (and, in single blocks, the MLP input) are one fused ``Linear``. A fused kohya
module is described by :class:`KohyaTarget` pieces: which rows of its update belong to which
canonical module. Flux's final ``adaLN_modulation`` stores (shift, scale) where diffusers stores
(scale, shift); that is a two-piece target onto one module.

Example:
    >>> sdxl = ARCHITECTURES["sdxl"]
    >>> sdxl.kohya["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"].pieces[0].module
    'unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q'
    >>> sdxl.preferred["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q'
    >>> [p.module.rsplit(".", 1)[1] for p in ARCHITECTURES["flux"].kohya["lora_unet_double_blocks_0_img_attn_qkv"].pieces]
    ['to_q', 'to_k', 'to_v']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache

Shape = tuple[int, ...]

# Component prefix of canonical names → kohya prefixes that name it, per architecture family.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "transformer_2")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_", "lycoris_")


def flatten(path: str) -> str:
    """A dotted module path the way kohya spells it: every ``.`` becomes ``_``.

    Example:
        >>> flatten("down_blocks.0.attentions.0.proj_in")
        'down_blocks_0_attentions_0_proj_in'
    """
    return path.replace(".", "_")


@dataclass(frozen=True)
class Piece:
    """Rows ``[src, src+size)`` of a kohya module's update are rows ``[dst, dst+size)`` of canonical ``module``."""

    module: str
    src: int
    dst: int
    size: int


@dataclass(frozen=True)
class KohyaTarget:
    """Where one kohya module's update goes: its full shape and the canonical pieces of its rows."""

    name: str
    shape: Shape
    pieces: tuple[Piece, ...]
    # Row counts of the canonical modules, where a piece set does not reach a module's last row.
    rows: Mapping[str, int] | None = field(default=None, compare=False, hash=False)
    # Copies of lora_A to write (B shared out among them): a converter that splits lora_A along its rank
    # (HunyuanVideo's on final_layer.adaLN_modulation.1) gives the update back only from repeated halves.
    copies: int = field(default=1, compare=False)

    @property
    def fused(self) -> bool:
        """True when the kohya module is not one canonical module taken whole."""
        return len(self.pieces) != 1 or self.pieces[0].size != self.shape[0]


@dataclass
class Architecture:
    """One model family: every canonical module with its shape and the kohya spellings that name it.

    ``shapes`` maps a canonical name to its update shape ``(out, in[, kh, kw])``; ``kohya`` maps
    every accepted kohya spelling to its :class:`KohyaTarget`; ``preferred`` maps a canonical name
    to the kohya module name a writer uses (for fused Flux modules, the fused name);
    ``original`` maps a canonical name to the module path in the original single-file
    checkpoint (LDM/SGM or BFL names), where it differs and is a whole module;
    ``fused_original`` maps a fused kohya name to the original module it flattens (whose rows its
    :class:`KohyaTarget` pieces describe).
    """

    name: str
    label: str
    base_model_version: str
    network_module: str
    te_prefixes: Mapping[str, str]
    shapes: dict[str, Shape] = field(default_factory=dict)
    kohya: dict[str, KohyaTarget] = field(default_factory=dict)
    preferred: dict[str, str] = field(default_factory=dict)
    original: dict[str, str] = field(default_factory=dict)
    fused_original: dict[str, str] = field(default_factory=dict)

    def add(self, canonical: str, shape: Shape, kohya_names: Sequence[str], original: str | None = None) -> None:
        """Register a whole module under its canonical name; the first kohya spelling is preferred."""
        self.shapes[canonical] = tuple(shape)
        target_pieces = (Piece(canonical, 0, 0, shape[0]),)
        for name in kohya_names:
            self.kohya[name] = KohyaTarget(name, tuple(shape), target_pieces)
        self.preferred.setdefault(canonical, kohya_names[0])
        if original is not None:
            self.original[canonical] = original

    def add_fused(self, kohya_name: str, in_shape: Shape, parts: Sequence[tuple[str, int]],
                  pieces: Sequence[Piece] | None = None, original: str | None = None) -> None:
        """Register a fused kohya module whose rows are the canonical ``parts`` (name, rows) in order."""
        offset = 0
        made = []
        for module, rows in parts:
            self.shapes.setdefault(module, (rows, *in_shape))
            made.append(Piece(module, offset, 0, rows))
            offset += rows
        self.kohya[kohya_name] = KohyaTarget(kohya_name, (offset, *in_shape), tuple(pieces or made))
        for module, _ in parts:
            self.preferred[module] = kohya_name
        if original is not None:
            self.fused_original[kohya_name] = original


# ---------------------------------------------------------------------------------------------
# UNets (SD 1.x, SD 2.x, SDXL)


@dataclass(frozen=True)
class UNetSpec:
    """The block structure of a ``UNet2DConditionModel`` (only what decides module names and shapes)."""

    channels: tuple[int, ...]
    attention: tuple[bool, ...]
    depth: tuple[int, ...]
    mid_depth: int
    cross_dim: int
    linear_projection: bool
    layers: int = 2
    in_channels: int = 4
    out_channels: int = 4
    add_embedding_in: int | None = None


SD1_UNET = UNetSpec((320, 640, 1280, 1280), (True, True, True, False), (1, 1, 1, 0), 1, 768, False)
SD2_UNET = UNetSpec((320, 640, 1280, 1280), (True, True, True, False), (1, 1, 1, 0), 1, 1024, True)
SDXL_UNET = UNetSpec((320, 640, 1280), (False, True, True), (0, 2, 10), 10, 2048, True, add_embedding_in=2816)


def unet_modules(spec: UNetSpec) -> list[tuple[str, str, Shape]]:
    """``(diffusers path, LDM path, shape)`` of every Linear and Conv2d a LoRA can target in a UNet.

    The LDM (original checkpoint) numbering puts each resnet/attention pair, each downsampler and
    each upsampler stage in one ``input_blocks.N`` / ``output_blocks.N`` entry.

    Example:
        >>> mods = {d: (o, s) for d, o, s in unet_modules(SDXL_UNET)}
        >>> mods["up_blocks.0.upsamplers.0.conv"]
        ('output_blocks.2.2.conv', (1280, 1280, 3, 3))
    """
    out: list[tuple[str, str, Shape]] = []
    c0 = spec.channels[0]
    temb = 4 * c0

    def resnet(path: str, ldm: str, cin: int, cout: int) -> None:
        out.append((f"{path}.conv1", f"{ldm}.in_layers.2", (cout, cin, 3, 3)))
        out.append((f"{path}.time_emb_proj", f"{ldm}.emb_layers.1", (cout, temb)))
        out.append((f"{path}.conv2", f"{ldm}.out_layers.3", (cout, cout, 3, 3)))
        if cin != cout:
            out.append((f"{path}.conv_shortcut", f"{ldm}.skip_connection", (cout, cin, 1, 1)))

    def transformer(path: str, ldm: str, ch: int, depth: int) -> None:
        proj: Shape = (ch, ch) if spec.linear_projection else (ch, ch, 1, 1)
        out.append((f"{path}.proj_in", f"{ldm}.proj_in", proj))
        for k in range(depth):
            block = f"transformer_blocks.{k}"
            for attn, kv_in in (("attn1", ch), ("attn2", spec.cross_dim)):
                out.append((f"{path}.{block}.{attn}.to_q", f"{ldm}.{block}.{attn}.to_q", (ch, ch)))
                out.append((f"{path}.{block}.{attn}.to_k", f"{ldm}.{block}.{attn}.to_k", (ch, kv_in)))
                out.append((f"{path}.{block}.{attn}.to_v", f"{ldm}.{block}.{attn}.to_v", (ch, kv_in)))
                out.append((f"{path}.{block}.{attn}.to_out.0", f"{ldm}.{block}.{attn}.to_out.0", (ch, ch)))
            out.append((f"{path}.{block}.ff.net.0.proj", f"{ldm}.{block}.ff.net.0.proj", (8 * ch, ch)))
            out.append((f"{path}.{block}.ff.net.2", f"{ldm}.{block}.ff.net.2", (ch, 4 * ch)))
        out.append((f"{path}.proj_out", f"{ldm}.proj_out", proj))

    out.append(("conv_in", "input_blocks.0.0", (c0, spec.in_channels, 3, 3)))
    out.append(("time_embedding.linear_1", "time_embed.0", (temb, c0)))
    out.append(("time_embedding.linear_2", "time_embed.2", (temb, temb)))
    if spec.add_embedding_in is not None:
        out.append(("add_embedding.linear_1", "label_emb.0.0", (temb, spec.add_embedding_in)))
        out.append(("add_embedding.linear_2", "label_emb.0.2", (temb, temb)))

    n = len(spec.channels)
    ch = c0
    skips = [c0]
    ldm_index = 1
    for i, cout in enumerate(spec.channels):
        for j in range(spec.layers):
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{ldm_index}.0", ch, cout)
            ch = cout
            if spec.attention[i]:
                transformer(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{ldm_index}.1", ch, spec.depth[i])
            skips.append(ch)
            ldm_index += 1
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{ldm_index}.0.op", (ch, ch, 3, 3)))
            skips.append(ch)
            ldm_index += 1

    resnet("mid_block.resnets.0", "middle_block.0", ch, ch)
    transformer("mid_block.attentions.0", "middle_block.1", ch, spec.mid_depth)
    resnet("mid_block.resnets.1", "middle_block.2", ch, ch)

    ldm_index = 0
    for i, cout in enumerate(reversed(spec.channels)):
        down = n - 1 - i
        for j in range(spec.layers + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{ldm_index}.0", ch + skips.pop(), cout)
            ch = cout
            stage = 1
            if spec.attention[down]:
                transformer(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{ldm_index}.1", ch, spec.depth[down])
                stage = 2
            if j == spec.layers and i < n - 1:
                out.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{ldm_index}.{stage}.conv",
                            (ch, ch, 3, 3)))
            ldm_index += 1
    out.append(("conv_out", "out.2", (spec.out_channels, c0, 3, 3)))
    return out


# ---------------------------------------------------------------------------------------------
# Text encoders


def clip_modules(hidden: int, layers: int, intermediate: int, projection: int | None = None) -> list[tuple[str, Shape]]:
    """``(path, shape)`` of the Linear layers of a Hugging Face CLIP text model.

    Example:
        >>> clip_modules(768, 12, 3072)[4]
        ('text_model.encoder.layers.0.mlp.fc1', (3072, 768))
    """
    out: list[tuple[str, Shape]] = []
    for i in range(layers):
        base = f"text_model.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.append((f"{base}.self_attn.{name}", (hidden, hidden)))
        out.append((f"{base}.mlp.fc1", (intermediate, hidden)))
        out.append((f"{base}.mlp.fc2", (hidden, intermediate)))
    if projection is not None:
        out.append(("text_projection", (projection, hidden)))
    return out


def t5_modules(d_model: int = 4096, layers: int = 24, inner: int = 4096, d_ff: int = 10240) -> list[tuple[str, Shape]]:
    """``(path, shape)`` of the Linear layers of a T5 v1.1 encoder (gated feed-forward), as in Flux's T5-XXL."""
    out: list[tuple[str, Shape]] = []
    for i in range(layers):
        attn = f"encoder.block.{i}.layer.0.SelfAttention"
        out += [(f"{attn}.q", (inner, d_model)), (f"{attn}.k", (inner, d_model)),
                (f"{attn}.v", (inner, d_model)), (f"{attn}.o", (d_model, inner))]
        ff = f"encoder.block.{i}.layer.1.DenseReluDense"
        out += [(f"{ff}.wi_0", (d_ff, d_model)), (f"{ff}.wi_1", (d_ff, d_model)), (f"{ff}.wo", (d_model, d_ff))]
    return out


# ---------------------------------------------------------------------------------------------
# Flux.1


@dataclass(frozen=True)
class FluxSpec:
    """The structure of a ``FluxTransformer2DModel`` (Flux.1 dev/schnell: 19 double and 38 single blocks)."""

    double: int = 19
    single: int = 38
    hidden: int = 3072
    mlp: int = 12288
    in_channels: int = 64
    context_in: int = 4096
    pooled_in: int = 768
    time_in: int = 256
    guidance: bool = True


def flux_architecture(spec: FluxSpec) -> Architecture:
    """The name table of a Flux-shaped transformer of any size (the registry's ``flux`` is Flux.1 itself).

    Example:
        >>> tiny = flux_architecture(FluxSpec(double=1, single=1, hidden=16, mlp=64))
        >>> tiny.fused_original["lora_unet_single_blocks_0_linear1"], tiny.shapes["transformer.single_transformer_blocks.0.proj_mlp"]
        ('single_blocks.0.linear1', (64, 16))
    """
    arch = Architecture("flux", "Flux.1", "flux1", "networks.lora_flux",
                        {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"})
    _add_flux(arch, spec)
    return arch


def _add_flux(arch: Architecture, spec: FluxSpec) -> None:
    h, m = spec.hidden, spec.mlp
    t = "transformer."

    def whole(diffusers: str, bfl: str, shape: Shape) -> None:
        arch.add(t + diffusers, shape, ["lora_unet_" + flatten(bfl), "lora_transformer_" + flatten(diffusers),
                                        "lycoris_" + flatten(diffusers)], original=bfl)

    def alias(diffusers: str, shape: Shape) -> None:
        # Split modules of fused BFL weights: reachable under their diffusers spelling too.
        for prefix in ("lora_transformer_", "lycoris_"):
            arch.kohya[prefix + flatten(diffusers)] = KohyaTarget(
                prefix + flatten(diffusers), shape, (Piece(t + diffusers, 0, 0, shape[0]),))

    whole("x_embedder", "img_in", (h, spec.in_channels))
    whole("context_embedder", "txt_in", (h, spec.context_in))
    whole("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", (h, spec.time_in))
    whole("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", (h, h))
    whole("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", (h, spec.pooled_in))
    whole("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", (h, h))
    if spec.guidance:
        whole("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", (h, spec.time_in))
        whole("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", (h, h))
    for i in range(spec.double):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for stream, attn_out, ff, mod in (("img", "to_out.0", "ff", "norm1"), ("txt", "to_add_out", "ff_context", "norm1_context")):
            whole(f"{d}.attn.{attn_out}", f"{b}.{stream}_attn.proj", (h, h))
            whole(f"{d}.{ff}.net.0.proj", f"{b}.{stream}_mlp.0", (m, h))
            whole(f"{d}.{ff}.net.2", f"{b}.{stream}_mlp.2", (h, m))
            whole(f"{d}.{mod}.linear", f"{b}.{stream}_mod.lin", (6 * h, h))
            qkv = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
            parts = [(f"{t}{d}.attn.{name}", h) for name in qkv]
            arch.add_fused(f"lora_unet_{flatten(b)}_{stream}_attn_qkv", (h,), parts, original=f"{b}.{stream}_attn.qkv")
            for name in qkv:
                alias(f"{d}.attn.{name}", (h, h))
    for i in range(spec.single):
        s, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        parts = [(f"{t}{s}.attn.to_q", h), (f"{t}{s}.attn.to_k", h), (f"{t}{s}.attn.to_v", h), (f"{t}{s}.proj_mlp", m)]
        arch.add_fused(f"lora_unet_{flatten(b)}_linear1", (h,), parts, original=f"{b}.linear1")
        for name, rows in (("attn.to_q", h), ("attn.to_k", h), ("attn.to_v", h), ("proj_mlp", m)):
            alias(f"{s}.{name}", (rows, h))
        whole(f"{s}.proj_out", f"{b}.linear2", (h, h + m))
        whole(f"{s}.norm.linear", f"{b}.modulation.lin", (3 * h, h))
    whole("proj_out", "final_layer.linear", (spec.in_channels, h))
    # BFL's final modulation is (shift, scale); diffusers' norm_out is (scale, shift).
    norm_out = t + "norm_out.linear"
    arch.add_fused("lora_unet_final_layer_adaLN_modulation_1", (h,), [(norm_out, 2 * h)],
                   pieces=[Piece(norm_out, h, 0, h), Piece(norm_out, 0, h, h)], original="final_layer.adaLN_modulation.1")
    alias("norm_out.linear", (2 * h, h))


# ---------------------------------------------------------------------------------------------
# The registry


def _add_unet(arch: Architecture, spec: UNetSpec, *, sgm_names: bool) -> None:
    for path, ldm, shape in unet_modules(spec):
        diffusers_name = "lora_unet_" + flatten(path)
        names = ["lora_unet_" + flatten(ldm), diffusers_name] if sgm_names else [diffusers_name]
        names.append("lycoris_" + flatten(path))
        arch.add("unet." + path, shape, names, original=ldm)


def _add_text_encoder(arch: Architecture, component: str, kohya_prefixes: Iterable[str],
                      modules: list[tuple[str, Shape]]) -> None:
    prefixes = list(kohya_prefixes)
    for path, shape in modules:
        names = [p + flatten(path) for p in prefixes]
        if path.startswith("text_model."):
            # transformers ≥ 5 CLIPTextModel has no ``text_model`` level; trainers on it (LyCORIS, kohya)
            # write ``lora_te_encoder_layers_…``.
            names += [p + flatten(path.removeprefix("text_model.")) for p in prefixes]
        arch.add(f"{component}.{path}", shape, names)


@cache
def _build(name: str) -> Architecture:
    if name in ("sd1", "sd2"):
        v2 = name == "sd2"
        arch = Architecture(name, "SD 2.x" if v2 else "SD 1.x", "sd_v2" if v2 else "sd_v1", "networks.lora",
                            {"text_encoder": "lora_te_"})
        _add_unet(arch, SD2_UNET if v2 else SD1_UNET, sgm_names=False)
        clip = clip_modules(1024, 23, 4096) if v2 else clip_modules(768, 12, 3072)
        _add_text_encoder(arch, "text_encoder", ["lora_te_"], clip)
        return arch
    if name == "sdxl":
        arch = Architecture("sdxl", "SDXL", "sdxl_base_v1-0", "networks.lora",
                            {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"})
        _add_unet(arch, SDXL_UNET, sgm_names=True)
        _add_text_encoder(arch, "text_encoder", ["lora_te1_", "lora_te_"], clip_modules(768, 12, 3072))
        _add_text_encoder(arch, "text_encoder_2", ["lora_te2_"], clip_modules(1280, 32, 5120, projection=1280))
        return arch
    if name == "flux":
        arch = Architecture("flux", "Flux.1", "flux1", "networks.lora_flux",
                            {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"})
        _add_flux(arch, FluxSpec())
        _add_text_encoder(arch, "text_encoder", ["lora_te1_"], clip_modules(768, 12, 3072))
        _add_text_encoder(arch, "text_encoder_2", ["lora_te3_"], t5_modules())
        return arch
    raise KeyError(name)


class _Registry(Mapping[str, Architecture]):
    """Architectures by name, each table built on first use."""

    names = ("sd1", "sd2", "sdxl", "flux")

    def __getitem__(self, name: str) -> Architecture:
        if name not in self.names:
            raise KeyError(name)
        return _build(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


ARCHITECTURES: Mapping[str, Architecture] = _Registry()


def architectures_for_kohya(names: Iterable[str]) -> dict[str, set[str]]:
    """For each kohya module name, the architectures whose table knows it (empty set: none).

    Example:
        >>> found = architectures_for_kohya(["lora_unet_input_blocks_4_1_proj_in", "lora_unet_single_blocks_0_linear1"])
        >>> found["lora_unet_input_blocks_4_1_proj_in"], found["lora_unet_single_blocks_0_linear1"]
        ({'sdxl'}, {'flux'})
    """
    return {n: {a for a in ARCHITECTURES if n in ARCHITECTURES[a].kohya} for n in names}


def identify(shapes: Mapping[str, Shape]) -> list[str]:
    """The architectures whose tables hold every canonical module in ``shapes``, best first.

    Those whose shapes also match are preferred; when none match in shape (a small test model
    with the same block structure), every name match is kept.

    Example:
        >>> identify({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048)})
        ['sdxl']
        >>> identify({"unet.down_blocks.1.attentions.0.proj_in": (8, 8)})
        ['sd1', 'sd2', 'sdxl']
    """
    by_name = [a for a in ARCHITECTURES if all(m in ARCHITECTURES[a].shapes for m in shapes)]
    exact = [a for a in by_name if all(ARCHITECTURES[a].shapes[m] == tuple(s) for m, s in shapes.items())]
    by_size = [a for a in by_name if all(_same_size(ARCHITECTURES[a].shapes[m], s) for m, s in shapes.items())]
    return exact or by_size or by_name


def _same_size(table: Shape, shape: Shape) -> bool:
    # LoHa/LoKr conv updates may arrive flattened to (out, in·k·k); compare as matrices.
    def flat(s: Shape) -> tuple[int, int]:
        rest = 1
        for d in s[1:]:
            rest *= d
        return (s[0], rest)

    return tuple(table) == tuple(shape) or (len(shape) == 2 and flat(table) == tuple(shape))
