"""From an adapter's module paths to a checkpoint's tensor names, and the layout facts a fold needs.

Everything that knows how a Hugging Face checkpoint names its tensors lives here:

- :func:`hf_resolver` maps a parameter path (``model.layers.0.self_attn.q_proj.weight``) to the
  checkpoint's tensor name, tolerating the usual prefix mismatch between an adapter trained on
  the inner model (``layers.0…``) or the task model (``model.layers.0…``) and the checkpoint.
  A fold takes any function of the same signature (:data:`Resolver`), so another naming scheme
  plugs in without touching the fold. A resolver may answer with :class:`Target` values instead
  of a name: a row slice of a fused tensor (q, k and v inside one ``in_proj_weight``), several
  slices, or a weight stored transposed (:mod:`loramerge.io.single_file` does this for SD/SDXL/Flux
  single-file checkpoints).
- :func:`tied_embeddings` finds the input embedding that ``lm_head`` shares.
- :func:`stored_transposed` says whether a 2-D weight is stored ``(in, out)`` (GPT-2's Conv1D).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """Where a module's update (or part of it) goes in a checkpoint.

    Rows ``[source, source + size)`` of the update, in its ``(out, in…)`` orientation, are added
    to rows ``[start, start + size)`` of tensor ``name``; ``size=None`` means every row of the
    update. For a bias the rows are its entries. ``transposed`` means the tensor stores the weight
    as ``(in, out)`` (OpenCLIP's ``text_projection``); it applies to whole tensors only.

    Example:
        >>> q = Target("attn.in_proj_weight", start=0, size=8)       # q: the first 8 rows
        >>> v = Target("attn.in_proj_weight", start=16, size=8)      # v: the last 8 of 24
        >>> q.rows(8), v.rows(8)
        ((0, 0, 8), (0, 16, 8))
    """

    name: str
    start: int = 0
    size: int | None = None
    source: int = 0
    transposed: bool = False

    def rows(self, update_rows: int) -> tuple[int, int, int]:
        """``(source, start, size)`` with ``size`` filled in from the update's row count."""
        return self.source, self.start, update_rows - self.source if self.size is None else self.size


ResolverResult = str | Target | Sequence[Target] | None
Resolver = Callable[[str, Collection[str]], ResolverResult]
"""``resolver(parameter_path, tensor_names)``: a tensor name, one or more :class:`Target`, or None."""


def as_targets(found: ResolverResult) -> list[Target] | None:
    """A resolver's answer as a list of :class:`Target` (a plain name is one whole-tensor target).

    Example:
        >>> as_targets("fc.weight"), as_targets(None)
        ([Target(name='fc.weight', start=0, size=None, source=0, transposed=False)], None)
    """
    if found is None:
        return None
    if isinstance(found, str):
        return [Target(found)]
    if isinstance(found, Target):
        return [found]
    return list(found) or None

_PREFIXES = ("base_model.model.", "model.")
OUTPUT_EMBEDDING = "lm_head.weight"
_INPUT_EMBEDDING_LEAVES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in", "shared")
# transformers models whose projections are GPT-2-style Conv1D layers, and those layers' names.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn", "c_fc1", "c_fc2"})


def hf_resolver(path: str, names: Collection[str]) -> str | None:
    """The tensor of ``names`` that parameter ``path`` refers to, or None.

    The exact name wins; then the path without a leading ``base_model.model.`` or ``model.``;
    then the path with ``model.`` added (an adapter trained on the inner model, folded into a
    ``…ForCausalLM`` checkpoint).

    Example:
        >>> names = {"model.layers.0.q_proj.weight", "lm_head.weight"}
        >>> hf_resolver("layers.0.q_proj.weight", names)
        'model.layers.0.q_proj.weight'
        >>> hf_resolver("base_model.model.lm_head.weight", names)
        'lm_head.weight'
        >>> hf_resolver("layers.0.k_proj.weight", names) is None
        True
    """
    if path in names:
        return path
    for candidate in _variants(path):
        if candidate in names:
            return candidate
    return None


def _variants(path: str) -> list[str]:
    out = []
    rest = path
    for prefix in _PREFIXES:
        if rest.startswith(prefix):
            rest = rest[len(prefix):]
            out.append(rest)
    out.append("model." + rest)
    return out


def nearest(path: str, names: Collection[str], count: int = 3) -> list[str]:
    """The names most like ``path`` (difflib), for 'did you mean' messages.

    Example:
        >>> nearest("model.layers.0.q_prj.weight", ["model.layers.0.q_proj.weight", "lm_head.weight"])
        ['model.layers.0.q_proj.weight']
    """
    return difflib.get_close_matches(path, list(names), n=count, cutoff=0.5)


def is_input_embedding(name: str) -> bool:
    """True for a tensor named like an input embedding (``…embed_tokens.weight``, ``…wte.weight``, …).

    Example:
        >>> is_input_embedding("model.embed_tokens.weight"), is_input_embedding("lm_head.weight")
        (True, False)
    """
    parts = name.split(".")
    if len(parts) < 2 or parts[-1] != "weight":
        return False
    leaf = parts[-2]
    return leaf in _INPUT_EMBEDDING_LEAVES or leaf == "wpe" or (
        (leaf.startswith("embed") or leaf.endswith(("embedding", "embeddings"))) and leaf != "embed_out"
    )


def config_value(config: dict[str, Any], key: str) -> Any:
    """``config[key]``, looking into a nested ``text_config`` too (multimodal configs keep it there).

    Example:
        >>> config_value({"text_config": {"tie_word_embeddings": True}}, "tie_word_embeddings")
        True
    """
    if key in config:
        return config[key]
    nested = config.get("text_config")
    if isinstance(nested, dict) and key in nested:
        return nested[key]
    return None


def tied_embeddings(config: dict[str, Any], names: Collection[str]) -> tuple[str, str] | None:
    """``(input embedding, "lm_head.weight")`` when the checkpoint ties them, else None.

    Tied means ``tie_word_embeddings`` is true, or unset while the checkpoint has an LM head
    architecture but stores no ``lm_head.weight`` (transformers drops the shared copy on save).

    Example:
        >>> tied_embeddings({"tie_word_embeddings": True}, ["model.embed_tokens.weight"])
        ('model.embed_tokens.weight', 'lm_head.weight')
        >>> tied_embeddings({"tie_word_embeddings": False}, ["model.embed_tokens.weight"]) is None
        True
    """
    candidates = sorted((n for n in names if is_input_embedding(n) and "position" not in n), key=len)
    if not candidates:
        return None
    flag = config_value(config, "tie_word_embeddings")
    if flag is None:
        architectures = " ".join(config.get("architectures") or [])
        has_head = any(k in architectures for k in ("ForCausalLM", "LMHead", "ForConditionalGeneration"))
        flag = has_head and OUTPUT_EMBEDDING not in names
    return (candidates[0], OUTPUT_EMBEDDING) if flag else None


def stored_transposed(name: str, shape: tuple[int, ...], out_in: tuple[int, int], config: dict[str, Any],
                      declared: bool) -> bool | None:
    """Whether a 2-D weight stores an ``(out, in)`` update transposed, as GPT-2's Conv1D does.

    The shape decides when it can; a square weight is transposed when the model is a known Conv1D
    architecture and the layer has a Conv1D name, else the adapter's ``fan_in_fan_out`` stands.
    None means neither orientation fits.

    Example:
        >>> stored_transposed("h.0.attn.c_attn.weight", (8, 24), (24, 8), {}, False)
        True
        >>> stored_transposed("h.0.attn.c_proj.weight", (8, 8), (8, 8), {"model_type": "gpt2"}, False)
        True
    """
    out_f, in_f = out_in
    plain, flipped = shape == (out_f, in_f), shape == (in_f, out_f)
    if plain and flipped:
        leaf = name.split(".")[-2] if "." in name else name
        if config.get("model_type") in CONV1D_MODEL_TYPES:
            return leaf in CONV1D_LEAVES
        return declared
    if plain or flipped:
        return flipped
    return None
