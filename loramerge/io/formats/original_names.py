"""diffusers module names → the original checkpoint's names, for writing ComfyUI and musubi-tuner layouts.

Reading needs no table: the family's diffusers converter resolves original names
(:mod:`loramerge.io.formats.converted`). Writing needs the inverse, which diffusers does not
have, so this module keeps it, and only it: a few rename rules per family, identity where the
original names are diffusers' own (Qwen-Image, HiDream, LTX-Video, Z-Image). Where one original
module holds several diffusers modules (HunyuanVideo's and Flux.2's fused ``qkv``, HunyuanVideo's
``linear1``, Lumina 2's ``attention.qkv``), or holds one with its rows reordered (HunyuanVideo's
final ``adaLN_modulation``), the row layout is not written here: it is read from the family's
converter, probed once at the released model's widths (:func:`released_targets`) and scaled to
the adapter's. Every name written is checked against the converter when diffusers is installed:
converting it must give back the rows it came from, or the write stops naming the module.

Example:
    >>> original_name("transformer.blocks.3.attn2.to_out.0", "wan")
    'blocks.3.cross_attn.o'
    >>> original_name("transformer.condition_embedder.time_embedder.linear_2", "wan")
    'time_embedding.2'
    >>> original_name("transformer.transformer_blocks.0.attn.to_q", "qwen_image")
    'transformer_blocks.0.attn.to_q'
    >>> original_name("transformer.transformer_blocks.1.attn.add_k_proj", "flux2")
    'double_blocks.1.txt_attn.qkv'
    >>> original_name("transformer.single_transformer_blocks.0.proj_mlp", "hunyuan_video")
    'single_blocks.0.linear1'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from functools import cache

from loramerge.core.adapter import Adapter
from loramerge.errors import UnsupportedAdapter
from loramerge.io.formats.converted import ProbeModule, convert_probe
from loramerge.io.formats.families import FAMILIES, diffusers_available, family_modules, require_diffusers
from loramerge.io.formats.sd_names import KohyaTarget, Piece

Shape = tuple[int, ...]
Rules = tuple[tuple[re.Pattern[str], str], ...]


def _rules(*pairs: tuple[str, str]) -> Rules:
    return tuple((re.compile(p), r) for p, r in pairs)


def _blocks(diffusers_block: str, original_block: str, renames: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Rules renaming ``<diffusers_block>.N.<d>`` to ``<original_block>.N.<o>`` for each ``d → o`` of ``renames``."""
    return tuple((rf"^{re.escape(diffusers_block)}\.(\d+)\.{re.escape(d)}$", rf"{original_block}.\1.{o}")
                 for d, o in renames.items())


def _whole(renames: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Rules renaming whole module paths."""
    return tuple((rf"^{re.escape(d)}$", o) for d, o in renames.items())


def _qkv(fused: str, names: str = "attn.to_{}") -> dict[str, str]:
    return {names.format(x): fused for x in "qkv"}


# Hand-written: the inverse of each family's diffusers converter (which diffusers keeps only forwards).
_WAN_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img"}
RULES: dict[str, Rules] = {
    "wan": _rules(
        *_blocks("blocks", "blocks", {f"attn1.{d}": f"self_attn.{o}" for d, o in _WAN_ATTN.items()}),
        *_blocks("blocks", "blocks", {f"attn2.{d}": f"cross_attn.{o}" for d, o in _WAN_ATTN.items()}),
        *_blocks("blocks", "blocks", {"ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}),
        *_whole({"condition_embedder.time_proj": "time_projection.1",
                 "condition_embedder.text_embedder.linear_1": "text_embedding.0",
                 "condition_embedder.text_embedder.linear_2": "text_embedding.2",
                 "condition_embedder.time_embedder.linear_1": "time_embedding.0",
                 "condition_embedder.time_embedder.linear_2": "time_embedding.2",
                 "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
                 "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3", "proj_out": "head.head"}),
    ),
    "flux2": _rules(
        *_blocks("transformer_blocks", "double_blocks", {
            **_qkv("img_attn.qkv"), **_qkv("txt_attn.qkv", "attn.add_{}_proj"), "attn.to_out.0": "img_attn.proj",
            "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
            "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}),
        *_blocks("single_transformer_blocks", "single_blocks", {"attn.to_qkv_mlp_proj": "linear1",
                                                                "attn.to_out": "linear2"}),
        *_whole({"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
                 "norm_out.linear": "final_layer.adaLN_modulation.1",
                 **{f"time_guidance_embed.{e}_embedder.linear_{i}": f"{e.replace('step', '')}_in.{s}_layer"
                    for e in ("timestep", "guidance") for i, s in ((1, "in"), (2, "out"))},
                 **{f"{m}.linear": f"{m}.lin" for m in ("single_stream_modulation", "double_stream_modulation_img",
                                                         "double_stream_modulation_txt")}}),
    ),
    "hunyuan_video": _rules(
        *_blocks("transformer_blocks", "double_blocks", {
            **_qkv("img_attn_qkv"), **_qkv("txt_attn_qkv", "attn.add_{}_proj"), "attn.to_out.0": "img_attn_proj",
            "attn.to_add_out": "txt_attn_proj", "norm1.linear": "img_mod.linear", "norm1_context.linear": "txt_mod.linear",
            "ff.net.0.proj": "img_mlp.fc1", "ff.net.2": "img_mlp.fc2", "ff_context.net.0.proj": "txt_mlp.fc1",
            "ff_context.net.2": "txt_mlp.fc2"}),
        *_blocks("single_transformer_blocks", "single_blocks", {
            **_qkv("linear1"), "proj_mlp": "linear1", "proj_out": "linear2", "norm.linear": "modulation.linear"}),
        *_blocks("context_embedder.token_refiner.refiner_blocks", "txt_in.individual_token_refiner.blocks", {
            **_qkv("self_attn_qkv"), "attn.to_out.0": "self_attn_proj", "ff.net.0.proj": "mlp.fc1",
            "ff.net.2": "mlp.fc2", "norm_out.linear": "adaLN_modulation.1"}),
        *_whole({"x_embedder.proj": "img_in.proj", "context_embedder.proj_in": "txt_in.input_embedder",
                 "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
                 "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
                 "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
                 "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
                 "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
                 "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
                 "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
                 "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
                 "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                 "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
                 "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}),
    ),
    "lumina2": _rules(*(rule for block in ("layers", "noise_refiner", "context_refiner") for rule in _blocks(
        block, block, {**_qkv("attention.qkv"), "attn.to_out.0": "attention.out", "norm1.linear": "adaLN_modulation.1",
                       **{f"feed_forward.linear_{i}": f"feed_forward.w{i}" for i in (1, 2, 3)}}))),
    "qwen_image": (),
    "hidream": (),
    "ltx_video": (),
    "z_image": (),
}
DENOISERS = ("transformer.", "transformer_2.")


def writable(family: str) -> bool:
    """True when loramerge can name ``family``'s modules the way its original checkpoint does."""
    return family in RULES


def family_for_writing(adapter: Adapter) -> str | None:
    """The family whose original names an adapter is written with: the one it was read as, when that
    family's names are known here and every module is a denoiser module; else None."""
    recorded = [a for a in adapter.config.get("architectures") or [] if a in RULES]
    if recorded and all(m.startswith(DENOISERS) for m in adapter.layers):
        return recorded[0]
    return None


def original_name(module: str, family: str) -> str:
    """The original-checkpoint path of diffusers module ``module`` (``transformer.<path>``) in ``family``."""
    if family not in RULES:
        raise UnsupportedAdapter(
            f"module {module}: loramerge writes original-checkpoint names only for {', '.join(RULES)}; "
            "write this adapter with --to diffusers"
        )
    if not module.startswith(DENOISERS):
        raise UnsupportedAdapter(f"module {module}: only the denoiser (transformer) is written with original names")
    path = module.split(".", 1)[1]
    for pattern, replacement in RULES[family]:
        if pattern.match(path):
            return pattern.sub(replacement, path)
    return path


@cache
def released_targets(family: str) -> dict[str, KohyaTarget]:
    """Each original module of ``family``'s released model, with the rows its converter gives each diffusers module.

    The probe (:mod:`loramerge.io.formats.converted`) is rank 1, so the released widths cost nothing.
    Names the converter does not read are left out.
    """
    require_diffusers()
    groups: dict[str, list[str]] = {}
    shapes = family_modules(family)
    for module in shapes:
        groups.setdefault(original_name(module, family), []).append(module)
    written = {name: (sum(shapes[m][0] for m in members), *shapes[members[0]][1:]) for name, members in groups.items()}
    return converted_targets(written, family, key_prefix="diffusion_model.", flat_names=False)


def original_targets(shapes: Mapping[str, Shape], family: str) -> dict[str, KohyaTarget]:
    """The original modules that the diffusers modules ``shapes`` (one denoiser's) are written as, at their widths.

    A fused original module takes its row layout from :func:`released_targets`, scaled to these
    widths, with the parts the adapter lacks included (they are written as zero rows).
    """
    groups: dict[str, list[str]] = {}
    for module in shapes:
        groups.setdefault(original_name(module, family), []).append(module)
    released = released_targets(family)
    out = {}
    for name, members in groups.items():
        template = released.get(name)
        if template is None or not template.fused:
            if len(members) > 1:
                raise UnsupportedAdapter(f"modules {', '.join(members)} would all be written as module {name}")
            out[name] = KohyaTarget(name, shapes[members[0]], (Piece(members[0], 0, 0, shapes[members[0]][0]),))
        else:
            out[name] = _scaled(template, {m: shapes[m] for m in members})
    return out


def _scaled(template: KohyaTarget, shapes: Mapping[str, Shape]) -> KohyaTarget:
    """``template`` (released widths) at the widths of its members ``shapes``, the pieces named as they are."""
    component = next(iter(shapes)).split(".", 1)[0]
    path = {m.split(".", 1)[1]: m for m in shapes}
    released_rows: dict[str, int] = {}
    for p in template.pieces:
        released_rows[p.module] = max(released_rows.get(p.module, 0), p.dst + p.size)
    factors = {released_rows[f"transformer.{p}"] / shapes[m][0] for p, m in path.items()}
    factor = factors.pop() if len(factors) == 1 else 0
    if factor < 1 or factor != int(factor) or any(v % factor for p in template.pieces for v in (p.src, p.dst, p.size)):
        raise UnsupportedAdapter(f"modules {', '.join(shapes)}: their widths do not fit the fused module {template.name}")
    f = int(factor)
    pieces = tuple(Piece(f"{component}.{p.module.split('.', 1)[1]}", p.src // f, p.dst // f, p.size // f)
                   for p in template.pieces)
    first = next(iter(shapes.values()))
    return KohyaTarget(template.name, (template.shape[0] // f, *first[1:]), pieces, copies=template.copies)


def converted_targets(written: Mapping[str, Shape], family: str, *, key_prefix: str,
                      flat_names: bool) -> dict[str, KohyaTarget]:
    """What ``family``'s diffusers converter makes of a file of modules named ``written`` (with their shapes).

    The file is converted whole, as diffusers converts it. Where the converter refuses it (one
    module it cannot split fails the whole file), each kind of block (``double_blocks.``,
    ``layers.`` …, or one top-level module) is converted together with the first kind that
    converted (some converters only start on a file with a module they recognise the layout by,
    HunyuanVideo's on ``img_attn_qkv``), and failing that one module at a time. A module the
    converter refuses is left out.
    """
    down, up = ("lora_down.weight", "lora_up.weight") if flat_names else ("lora_A.weight", "lora_B.weight")
    kinds: dict[str, list[ProbeModule]] = {}
    for name, shape in written.items():
        kind = re.match(r"\D*(?=\d)", name)
        kinds.setdefault(kind[0] if kind else name, []).append(ProbeModule(
            name, shape, f"{key_prefix}{name}.{down}", f"{key_prefix}{name}.{up}",
            f"{key_prefix}{name}.alpha" if flat_names else None))
    whole = convert_probe(family, [p for probes in kinds.values() for p in probes], repeat_a=False)
    if whole is not None and not whole[1]:
        return whole[0]
    found: dict[str, KohyaTarget] = {}
    anchor: list[ProbeModule] = []
    for probes in [*kinds.values(), *kinds.values()]:  # the kinds before the anchor get a second try
        for attempt in (probes, *([p] for p in probes)) if len(probes) > 1 else (probes,):
            if all(p.name in found for p in attempt):
                continue
            converted = convert_probe(family, anchor + attempt, repeat_a=False)
            if converted is not None:
                found.update({p.name: converted[0][p.name] for p in attempt if p.name in converted[0]})
                if not anchor and not converted[1]:
                    anchor = attempt
            if all(p.name in found for p in probes):
                break
    for probes in kinds.values():  # what a converter that splits lora_A along its rank reads from a repeated A
        for probe in probes:
            converted = None if probe.name in found else convert_probe(family, [*anchor, replace(probe, rank=2)])
            if converted is not None and probe.name in converted[0]:
                found[probe.name] = converted[0][probe.name]
    return found


def check_names(targets: Mapping[str, KohyaTarget], family: str, *, key_prefix: str, flat_names: bool) -> None:
    """Check written names against ``family``'s diffusers converter: each must convert back to its target's rows.

    ``targets`` maps each module name written (``blocks.0…`` or ``lora_unet_blocks_0…``) to the
    rows of the diffusers modules it holds; ``key_prefix`` goes before the names in the file
    (``diffusion_model.`` or nothing). Skipped without diffusers.
    """
    if not diffusers_available():
        return
    found = converted_targets({n: t.shape for n, t in targets.items()}, family, key_prefix=key_prefix,
                              flat_names=flat_names)
    wrong = [n for n, t in targets.items() if _layout(found.get(n)) != _layout(t)]
    if wrong:
        first = targets[wrong[0]]
        got = found.get(wrong[0])
        reading = f"as {', '.join(sorted({p.module for p in got.pieces}))} rows" if got else "as no module"
        raise UnsupportedAdapter(
            f"module {first.pieces[0].module} (and {len(wrong) - 1} more) would be written as {key_prefix}{wrong[0]}, "
            f"which diffusers' {FAMILIES[family].label} converter reads {reading} other than written "
            "(at these widths, or in this layout); write this adapter with --to diffusers"
        )


def _layout(target: KohyaTarget | None) -> list[tuple[str, int, int, int]] | None:
    """The rows of ``target`` with the component left out (an expert, ``transformer_2``, converts as ``transformer``)."""
    if target is None:
        return None
    return sorted((p.module.split(".", 1)[1], p.src, p.dst, p.size) for p in target.pieces)
