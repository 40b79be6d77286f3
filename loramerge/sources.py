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


def load(source: str | Path | Adapter, *, format: str | None = None, allow_pickle: bool = False,
         base: str | Path | None = None) -> Adapter:
    """Load an adapter from a file or folder, detecting its format.

    ``allow_pickle`` permits ``.bin`` checkpoints, read with ``torch.load(weights_only=True)``.
    ``base`` (a checkpoint file or folder) resolves kohya module names from its weight names.

    Example:
        >>> import tempfile, torch
        >>> from loramerge import Adapter, LowRank, load
        >>> path = Adapter({"fc": LowRank(torch.ones(2, 3), torch.ones(4, 2))}).save(tempfile.mkdtemp() + "/a")
        >>> load(path).modules
        ['fc']
    """
    if isinstance(source, Adapter):
        return source
    return read_adapter(resolve_source(source), format=format, allow_pickle=allow_pickle,
                        base=resolve_source(base) if base is not None else None)
