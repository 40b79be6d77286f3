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
    DataError,
    HubError,
    IncompatibleAdapters,
    InvalidParameter,
    LoramergeError,
    LoramergeWarning,
    MissingDependency,
    NonFiniteValues,
    OutOfMemory,
    OutputExists,
    PickleRefused,
    RecipeError,
    SourceNotFound,
    UnknownFormat,
    UnsupportedAdapter,
    UnsupportedModel,
    VerificationFailed,
    WriteFailed,
)
from loramerge.extract import extract
from loramerge.fold.engine import fold
from loramerge.hub.publish import push_output as push_to_hub
from loramerge.io.quant.view import BaseQuant
from loramerge.io.sources import load
from loramerge.merge.methods import available_methods, get_method
from loramerge.merge.resize import resize
from loramerge.merge.statistics import InputStatistics
from loramerge.recipe.plan import plan_recipe
from loramerge.recipe.reader import load_recipe
from loramerge.recipe.run import run_recipe
from loramerge.runtime.data import load_tasks
from loramerge.runtime.evaluate import Evaluation, evaluate
from loramerge.runtime.merging import merge
from loramerge.runtime.resident import Runtime
from loramerge.runtime.verify import Verification, verify
from loramerge.tune.result import TuneResult
from loramerge.tune.run import tune


def save(adapter: Adapter, path: str, **kwargs) -> object:
    """Write ``adapter`` to ``path``; the same as ``adapter.save(path, **kwargs)``."""
    return adapter.save(path, **kwargs)


__all__ = [
    "Adapter",
    "BaseQuant",
    "ConfigNotFound",
    "CorruptFile",
    "DataError",
    "Evaluation",
    "HubError",
    "IncompatibleAdapters",
    "InputStatistics",
    "InvalidParameter",
    "LoramergeError",
    "LoramergeWarning",
    "LowRank",
    "MergeReport",
    "MissingDependency",
    "ModuleReport",
    "NonFiniteValues",
    "OutOfMemory",
    "OutputExists",
    "PickleRefused",
    "RankPolicy",
    "RecipeError",
    "Runtime",
    "SourceNotFound",
    "TuneResult",
    "UnknownFormat",
    "UnsupportedAdapter",
    "UnsupportedModel",
    "Verification",
    "VerificationFailed",
    "WriteFailed",
    "__version__",
    "available_methods",
    "convert",
    "evaluate",
    "extract",
    "fold",
    "get_method",
    "load",
    "load_recipe",
    "load_tasks",
    "merge",
    "plan_recipe",
    "push_to_hub",
    "resize",
    "run_recipe",
    "save",
    "tune",
    "verify",
]
