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

from loramerge.adapter import Adapter, LowRank
from loramerge.convert import convert
from loramerge.errors import (
    ConfigNotFound,
    CorruptFile,
    HubError,
    IncompatibleAdapters,
    InvalidParameter,
    LoramergeError,
    NonFiniteValues,
    OutputExists,
    PickleRefused,
    RecipeError,
    SourceNotFound,
    UnknownFormat,
    UnsupportedAdapter,
)
from loramerge.extract import extract
from loramerge.fold import fold
from loramerge.linalg import RankPolicy
from loramerge.merge import merge
from loramerge.methods import available_methods, get_method
from loramerge.publish import push_output as push_to_hub
from loramerge.recipe import load_recipe
from loramerge.recipe_run import plan_recipe, run_recipe
from loramerge.report import MergeReport, ModuleReport
from loramerge.sources import load

__version__ = "0.1.0"


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
    "LowRank",
    "MergeReport",
    "ModuleReport",
    "NonFiniteValues",
    "OutputExists",
    "PickleRefused",
    "RankPolicy",
    "RecipeError",
    "SourceNotFound",
    "UnknownFormat",
    "UnsupportedAdapter",
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
    "run_recipe",
    "save",
]
