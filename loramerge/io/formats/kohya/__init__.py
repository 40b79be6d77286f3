"""kohya / A1111 LoRA files and LyCORIS files with the same module names: the format entry.

**Keys.** ``<name>.lora_down.weight`` (A), ``<name>.lora_up.weight`` (B) and an optional 0-d
``<name>.alpha``, where ``<name>`` is a component prefix (``lora_unet_``, ``lora_te_``,
``lora_te1_``, ``lora_te2_``, ``lora_te3_``, ``lora_transformer_``, ``lycoris_``) followed by
the module path with its dots turned into underscores. Conv LoRAs (LoCon) have 4-D factors
``(r, in, kh, kw)`` / ``(out, r, 1, 1)``; a Tucker ``lora_mid`` is folded into A exactly.
LyCORIS LoHa, LoKr and full (``diff``) modules are expanded exactly by
:mod:`loramerge.io.formats.lycoris`; ``dora_scale`` is kept as the DoRA magnitude (fold only).

**Scale.** ``alpha / r`` with ``r = lora_down.shape[0]`` (LoHa: ``hada_w1_b.shape[0]``; LoKr:
the rank of its factorised part). A missing alpha means ``alpha = r``, i.e. scale 1 — what
kohya's trainer, A1111 and ComfyUI all do. An A1111 ``<name>.scale`` tensor overrides
``alpha / r``. A LoKr whose two Kronecker factors are both stored full has no rank and scale 1,
as in LyCORIS and ComfyUI.

**Names** are resolved by :mod:`loramerge.io.formats.sd_names` (SD 1.x, SD 2.x, SDXL, Flux.1) or,
given a base checkpoint, by :mod:`loramerge.io.formats.base_names`. Flux's fused ``qkv`` and
``linear1`` are split into diffusers' ``to_q``/``to_k``/``to_v``/``proj_mlp``. A file none of
whose names is known keeps its kohya names as opaque module names (enough to merge such files
with each other and write them back).

**Writing** stores ``lora_down``/``lora_up`` with one float32 ``alpha`` per module such that
``alpha / r`` is the module's scale, re-fuses Flux modules (sharing A when the parts share it,
block-diagonal otherwise, with the alpha of the fused rank), writes minimal ``ss_*`` metadata,
the merge recipe as JSON under the ``loramerge`` key, and ``sshs_model_hash`` /
``sshs_legacy_hash`` computed the way kohya's sd-scripts do, over the tensors already cast to
the saved dtype.

One job per module: :mod:`.keys` (key grammar, detection, grouping), :mod:`.update` (a module's
tensors → LowRank), :mod:`.names` (kohya names ↔ canonical paths), :mod:`.fused` (split and
re-fuse fused modules), :mod:`.read`, :mod:`.write`, :mod:`.native` (LyCORIS files kept factored)
and :mod:`.metadata`.
"""

from __future__ import annotations

from loramerge.io.formats.kohya.keys import detect, detect_lycoris, header_keys, is_kohya_key
from loramerge.io.formats.kohya.native import write as write_lycoris
from loramerge.io.formats.kohya.read import NAME, read, read_lycoris
from loramerge.io.formats.kohya.write import write

__all__ = ["NAME", "detect", "detect_lycoris", "header_keys", "is_kohya_key", "read", "read_lycoris", "write", "write_lycoris"]
