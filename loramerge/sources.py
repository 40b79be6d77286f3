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


def resolve_model(source: str | Path) -> Path:
    """The local folder of a base model ``source``; Hub ids plug in here, like :func:`resolve_source`.

    Example:
        >>> import tempfile
        >>> resolve_model(tempfile.gettempdir()).is_dir()
        True
    """
    path = resolve_source(source)
    if not path.is_dir():
        raise SourceNotFound(f"{source}: a base model must be a folder with config.json and its weights")
    return path


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
