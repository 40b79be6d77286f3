"""loramerge: exact, fast composition and merging of LoRA adapters.

Example:
    >>> import tempfile, torch
    >>> import loramerge
    >>> a = loramerge.Adapter({"fc": loramerge.LowRank(torch.ones(2, 4), torch.ones(3, 2))})
    >>> merged = loramerge.merge([a, a], method="svd", weights=[0.5, 0.5])
    >>> out = merged.save(tempfile.mkdtemp() + "/merged")
    >>> loramerge.load(out)["fc"].rank
    2
"""

from loramerge._version import __version__
from loramerge.convert import convert
from loramerge.core.adapter import Adapter, LowRank
from loramerge.core.rank import RankPolicy
from loramerge.core.report import MergeReport, ModuleReport
from loramerge.errors import (
    ConfigNotFound,
    CorruptFile,
    HubError,
    IncompatibleAdapters,
    InvalidParameter,
    LoramergeError,
    LoramergeWarning,
    NonFiniteValues,
    OutOfMemory,
    OutputExists,
    PickleRefused,
    RecipeError,
    SourceNotFound,
    UnknownFormat,
    UnsupportedAdapter,
    WriteFailed,
)
from loramerge.extract import extract
from loramerge.fold.engine import fold
from loramerge.hub.publish import push_output as push_to_hub
from loramerge.io.sources import load
from loramerge.merge.engine import merge
from loramerge.merge.methods import available_methods, get_method
from loramerge.merge.resize import resize
from loramerge.recipe.plan import plan_recipe
from loramerge.recipe.reader import load_recipe
from loramerge.recipe.run import run_recipe


def save(adapter: Adapter, path: str, **kwargs) -> object:
    """Write ``adapter`` to ``path``; the same as ``adapter.save(path, **kwargs)``."""
    return adapter.save(path, **kwargs)


__all__ = [
    "Adapter",
    "ConfigNotFound",
    "CorruptFile",
    "HubError",
    "IncompatibleAdapters",
    "InvalidParameter",
    "LoramergeError",
    "LoramergeWarning",
    "LowRank",
    "MergeReport",
    "ModuleReport",
    "NonFiniteValues",
    "OutOfMemory",
    "OutputExists",
    "PickleRefused",
    "RankPolicy",
    "RecipeError",
    "SourceNotFound",
    "UnknownFormat",
    "UnsupportedAdapter",
    "WriteFailed",
    "__version__",
    "available_methods",
    "convert",
    "extract",
    "fold",
    "get_method",
    "load",
    "load_recipe",
    "merge",
    "plan_recipe",
    "push_to_hub",
    "resize",
    "run_recipe",
    "save",
]
