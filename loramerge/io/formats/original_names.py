"""diffusers module names → the original checkpoint's names, for writing ComfyUI and musubi-tuner layouts.

Reading needs no table: the family's diffusers converter resolves original names
(:mod:`loramerge.io.formats.converted`). Writing needs the inverse, which diffusers does not
have, so this module keeps it, and only it: a few rename rules per family, identity where the
original names are diffusers' own (Qwen-Image, HiDream, LTX-Video). Every name written is
checked against the family's converter when diffusers is installed: converting it must give
back the module it came from, or the write stops naming the module.

Example:
    >>> original_name("transformer.blocks.3.attn2.to_out.0", "wan")
    'blocks.3.cross_attn.o'
    >>> original_name("transformer.condition_embedder.time_embedder.linear_2", "wan")
    'time_embedding.2'
    >>> original_name("transformer.transformer_blocks.0.attn.to_q", "qwen_image")
    'transformer_blocks.0.attn.to_q'
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from loramerge.core.adapter import Adapter
from loramerge.errors import UnsupportedAdapter

Shape = tuple[int, ...]

_WAN_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img"}
RULES: dict[str, tuple[tuple[re.Pattern[str], str], ...]] = {
    "wan": tuple((re.compile(p), r) for p, r in (
        *((rf"^blocks\.(\d+)\.attn1\.{re.escape(d)}$", rf"blocks.\1.self_attn.{o}") for d, o in _WAN_ATTN.items()),
        *((rf"^blocks\.(\d+)\.attn2\.{re.escape(d)}$", rf"blocks.\1.cross_attn.{o}") for d, o in _WAN_ATTN.items()),
        (r"^blocks\.(\d+)\.ffn\.net\.0\.proj$", r"blocks.\1.ffn.0"),
        (r"^blocks\.(\d+)\.ffn\.net\.2$", r"blocks.\1.ffn.2"),
        (r"^condition_embedder\.time_proj$", "time_projection.1"),
        (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
        (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
        (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
        (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
        (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj$", "img_emb.proj.1"),
        (r"^condition_embedder\.image_embedder\.ff\.net\.2$", "img_emb.proj.3"),
        (r"^proj_out$", "head.head"),
    )),
    "qwen_image": (),
    "hidream": (),
    "ltx_video": (),
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


def check_names(names: Mapping[str, str], shapes: Mapping[str, Shape], family: str, *, key_prefix: str,
                flat_names: bool) -> None:
    """Check written names against ``family``'s diffusers converter: each must convert back to its module.

    ``names`` maps each diffusers module to the module name written (``diffusion_model.blocks.0…``
    or ``lora_unet_blocks_0…``); ``key_prefix`` is empty for those. Skipped without diffusers.
    """
    from loramerge.io.formats.converted import ProbeModule, resolve
    from loramerge.io.formats.families import diffusers_available

    if not diffusers_available():
        return
    down, up = ("lora_down.weight", "lora_up.weight") if flat_names else ("lora_A.weight", "lora_B.weight")
    probes = [ProbeModule(written, shapes[module], f"{key_prefix}{written}.{down}", f"{key_prefix}{written}.{up}",
                          f"{key_prefix}{written}.alpha" if flat_names else None)
              for module, written in names.items()]
    found = resolve(probes, origin="output", family=family)
    back = {written: module for module, written in names.items()}
    wrong = []
    for written, module in back.items():
        target = found.targets.get(written)
        if target is None or [p.module.split(".", 1)[1] for p in target.pieces] != [module.split(".", 1)[1]]:
            wrong.append(module)
    if wrong:
        raise UnsupportedAdapter(
            f"module {wrong[0]} (and {len(wrong) - 1} more) would be written under a name that diffusers' "
            f"{family} converter reads as another module; write this adapter with --to diffusers"
        )
