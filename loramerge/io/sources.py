"""Where adapters come from: a local path, or a Hub id ``org/name[/subfolder][@revision]``.

A local path always wins over a Hub id of the same spelling. Hub sources are downloaded (only the
adapter's files) into the Hugging Face cache by :mod:`loramerge.io.hub`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramerge.core.adapter import Adapter
from loramerge.errors import LoramergeError, SourceNotFound
from loramerge.io.formats import read_adapter
from loramerge.io.formats.component import for_component
from loramerge.io.hub import HubRef, fetch_adapter


def locate_source(source: str | Path) -> tuple[Path, dict[str, Any]]:
    """The local path of ``source`` and its provenance (see :attr:`Adapter.origin`).

    Example:
        >>> import tempfile
        >>> path, origin = locate_source(tempfile.gettempdir())
        >>> path.is_dir(), sorted(origin)
        (True, ['path'])
    """
    path = Path(source).expanduser()
    if path.exists():
        origin: dict[str, Any] = {"path": str(path.resolve())}
        from loramerge.io.hub import card_metadata

        license_ = card_metadata((path if path.is_dir() else path.parent) / "README.md").get("license")
        if license_:
            origin["license"] = license_
        return path, origin
    from loramerge.io.hub import not_a_hub_id, parse_hub_id

    ref = parse_hub_id(str(source)) if not isinstance(source, Path) else None
    if ref is None:
        raise SourceNotFound(f"{source}: no such file or folder{not_a_hub_id(str(source))}", path=str(source))
    snapshot = fetch_adapter(ref)
    return snapshot.path, snapshot.origin()


def resolve_source(source: str | Path) -> Path:
    """The local path of ``source``. A local path always wins over a Hub id of the same spelling.

    Example:
        >>> import tempfile
        >>> resolve_source(tempfile.gettempdir()).is_dir()
        True
    """
    return locate_source(source)[0]


def load(source: str | Path | Adapter | HubRef, *, format: str | None = None, allow_pickle: bool = False,
         base: str | Path | None = None, skip_unknown: bool = False, component: str | None = None) -> Adapter:
    """Load an adapter from a file or folder, or from the Hub, detecting its format.

    ``allow_pickle`` permits ``.bin`` checkpoints, read with ``torch.load(weights_only=True)``.
    ``base`` (a checkpoint file or folder) resolves kohya module names from its weight names.
    ``skip_unknown`` leaves out modules whose names resolve to nothing (``config["skipped"]``
    lists them) instead of refusing the file. ``component`` is the pipeline component (denoiser)
    the file is for when it cannot say so itself: ``"transformer_2"`` for a Wan 2.2 expert-2 LoRA.
    A Hub source keeps its spelling in ``.source`` and its resolved commit in ``.origin``; a
    :class:`~loramerge.io.hub.HubRef` goes to the Hub even when a local path has the same spelling.

    Example:
        >>> import tempfile, torch
        >>> from loramerge import Adapter, LowRank, load
        >>> path = Adapter({"fc": LowRank(torch.ones(2, 3), torch.ones(4, 2))}).save(tempfile.mkdtemp() + "/a")
        >>> load(path).modules
        ['fc']
    """
    if isinstance(source, Adapter):
        return for_component(source, component) if component else source
    if isinstance(source, HubRef):
        snapshot = fetch_adapter(source)
        path, origin = snapshot.path, snapshot.origin()
    else:
        path, origin = locate_source(source)
    try:
        adapter = read_adapter(path, format=format, allow_pickle=allow_pickle,
                               base=resolve_source(base) if base is not None else None, skip_unknown=skip_unknown,
                               component=component)
    except LoramergeError as exc:  # the readers name the file in the message; the field gets it too
        exc.fill(path=str(path))
        raise
    if "repo_id" in origin:
        adapter.source = str(source)
    if component:
        origin["component"] = component  # a recipe of this load says it again
    adapter.origin = origin
    return adapter


def resolve_model(source: str | Path) -> Path:
    """The local folder of a base model (``config.json`` and its weights) for fold and extract.

    A local folder wins; otherwise a Hub id ``org/name[/subfolder][@revision]`` is downloaded
    (configs, safetensors weights and tokenizer files) into the Hugging Face cache.

    Example:
        >>> import tempfile
        >>> resolve_model(tempfile.gettempdir()).is_dir()
        True
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceNotFound(f"{source}: a base model must be a folder with config.json and its weights",
                             path=str(source))
    from loramerge.io.hub import fetch_model, not_a_hub_id, parse_hub_id

    ref = parse_hub_id(str(source)) if not isinstance(source, Path) else None
    if ref is None:
        raise SourceNotFound(f"{source}: no such model folder{not_a_hub_id(str(source))}", path=str(source))
    return fetch_model(ref).path
