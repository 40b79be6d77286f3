"""Where adapters come from: a local path today; Hub ids plug in here (``org/name[@revision]``)."""

from __future__ import annotations

from pathlib import Path

from loramerge.adapter import Adapter
from loramerge.errors import SourceNotFound
from loramerge.formats import read_adapter


def resolve_source(source: str | Path) -> Path:
    """The local path of ``source``. A local path always wins over a Hub id of the same spelling.

    Example:
        >>> import tempfile
        >>> resolve_source(tempfile.gettempdir()).is_dir()
        True
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    raise SourceNotFound(f"{source}: no such file or folder")


def load(source: str | Path | Adapter, *, format: str | None = None, allow_pickle: bool = False) -> Adapter:
    """Load an adapter from a file or folder, detecting its format.

    ``allow_pickle`` permits ``.bin`` checkpoints, read with ``torch.load(weights_only=True)``.

    Example:
        >>> import tempfile, torch
        >>> from loramerge import Adapter, LowRank, load
        >>> path = Adapter({"fc": LowRank(torch.ones(2, 3), torch.ones(4, 2))}).save(tempfile.mkdtemp() + "/a")
        >>> load(path).modules
        ['fc']
    """
    if isinstance(source, Adapter):
        return source
    return read_adapter(resolve_source(source), format=format, allow_pickle=allow_pickle)


def resolve_model(source: str | Path) -> Path:
    """The local folder of a base model (``config.json`` and its weights) for fold and extract.

    Base models resolve here, apart from adapters, so Hub ids for them can plug in without
    touching the adapter path; today only local folders are accepted.

    Example:
        >>> import tempfile
        >>> resolve_model(tempfile.gettempdir()).is_dir()
        True
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceNotFound(f"{source}: a base model must be a folder with config.json and its weights")
    raise SourceNotFound(f"{source}: no such model folder")
