"""Were these adapters made for this base model? Warnings (or, strictly, refusals) before a fold."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loramerge.core.adapter import Adapter
from loramerge.errors import IncompatibleAdapters, LoramergeWarning


def check_bases(adapters: Sequence[Adapter], folder: Path, config: dict[str, Any], strict: bool) -> list[str]:
    """Warn about (or with ``strict`` refuse) each adapter whose declared base model is not ``folder``.

    Returns the warnings' messages, which the fold records among its notes.

    Example:
        >>> import torch
        >>> from loramerge.core.adapter import LowRank
        >>> ad = Adapter({"fc": LowRank(torch.ones(1, 2), torch.ones(2, 1))}, base_model="org/llama")
        >>> check_bases([ad], Path("/models/llama"), {}, strict=False)
        []
    """
    notes = []
    for adapter in adapters:
        declared = adapter.base_model
        if not declared or _same_base(str(declared), folder, config):
            continue
        message = (f"{adapter.source or 'adapter'} was trained on {declared}, but the base model is {folder}"
                   + (f" ({config.get('_name_or_path')})" if config.get("_name_or_path") else ""))
        if strict:
            raise IncompatibleAdapters(message + "; drop --strict to fold it anyway")
        warnings.warn(message, LoramergeWarning, stacklevel=4)
        notes.append(message)
    return notes


def _same_base(declared: str, folder: Path, config: dict[str, Any]) -> bool:
    declared = declared.rstrip("/")
    known = {str(folder), str(folder.resolve()), folder.name, str(config.get("_name_or_path") or "").rstrip("/")}
    if declared in known or Path(declared).name == folder.name:
        return True
    if "models--" + declared.replace("/", "--") in str(folder.resolve()):
        return True
    try:
        return Path(declared).expanduser().resolve() == folder.resolve()
    except OSError:
        return False


def check_family(adapters: Sequence[Adapter], families: Sequence[str] | None, described: str) -> None:
    """Refuse an image-generation LoRA for one architecture folded into a model of another."""
    from loramerge.io.formats.families import FAMILIES, compatible
    from loramerge.io.formats.sd_names import ARCHITECTURES

    if not families:
        return
    for adapter in adapters:
        recorded = [a for a in adapter.config.get("architectures") or [] if a in ARCHITECTURES or a in FAMILIES]
        if recorded and not compatible(set(recorded), set(families)):
            labels = "/".join((ARCHITECTURES[a] if a in ARCHITECTURES else FAMILIES[a]).label for a in recorded)
            raise IncompatibleAdapters(
                f"{adapter.source or 'adapter'} is a LoRA for {labels}, but {described}; "
                "pass --ignore-base-mismatch to fold it anyway"
            )
