"""The optional ``eval`` extra: transformers, imported only by the code that runs a model."""

from __future__ import annotations

import importlib
from types import ModuleType

from loramerge.errors import MissingDependency

INSTALL_HINT = 'pip install "loramerge[eval]"'


def require(package: str = "transformers", *, what: str = "running a model") -> ModuleType:
    """Import ``package`` or raise :class:`MissingDependency` saying how to install the ``eval`` extra.

    Example:
        >>> require("json").__name__
        'json'
        >>> require("no_such_package_here")
        Traceback (most recent call last):
        ...
        loramerge.errors.MissingDependency: running a model needs no_such_package_here, which is not installed; install it with: pip install "loramerge[eval]"
    """
    try:
        return importlib.import_module(package)
    except ImportError:
        raise MissingDependency(
            f"{what} needs {package}, which is not installed; install it with: {INSTALL_HINT}"
        ) from None
