"""The exception hierarchy.

Every error a user can cause derives from :class:`LoramergeError`. Its message is one
self-contained line that names the file and, where it applies, the module, so the CLI can
print it as is and exit without a traceback.

Each class is also the builtin exception a Python user would reach for, so ``except
FileNotFoundError`` or ``except ValueError`` in their code sees it too:

| class | also a | why |
|---|---|---|
| `SourceNotFound` | `FileNotFoundError` (ENOENT) | a path or Hub id that is not there |
| `ConfigNotFound` | `FileNotFoundError` (ENOENT) | a file the adapter needs is missing |
| `OutputExists` | `FileExistsError` (EEXIST) | the output is there and `force` was not given |
| `WriteFailed` | `OSError` | the file system refused the output |
| `HubError` | `OSError` | a failed Hub request (connection, offline mode, credentials, rights); huggingface_hub's own HTTP errors are `OSError`s, and not every case is a `ConnectionError` |
| `PickleRefused` | `PermissionError` (EPERM) | the file is readable, but reading it is not permitted until the caller allows pickles: a refusal, not a malformed value |
| `CorruptFile` | `ValueError` | a file whose content cannot be parsed |
| `UnknownFormat` | `ValueError` | files whose layout matches no format |
| `UnsupportedAdapter` | `ValueError` | a variant that cannot be merged or written |
| `IncompatibleAdapters` | `ValueError` | sources that cannot be combined |
| `InvalidParameter` | `ValueError` | an option, method, weight or device that is wrong |
| `RecipeError` | `ValueError` | a recipe that does not validate |
| `NonFiniteValues` | `ValueError` and `ArithmeticError` | NaN/Inf read from a file (a bad value) or produced by a merge that overflowed (an arithmetic failure) |
| `OutOfMemory` | `MemoryError` | the compute device ran out of memory on a module |
| `MissingDependency` | `ImportError` | an optional extra the work needs is not installed (the message says how to install it: `loramerge[eval]`, `loramerge[diffusion]`, …) |
| `DataError` | `ValueError` | evaluation data that cannot be used (names the file and row) |
| `UnsupportedModel` | `ValueError` | a base model the runtime cannot load or run |
| `VerificationFailed` | `AssertionError` | `verify` found that a merge or fold does not do what the unmerged adapters do: a failed check, not bad input |

Every error carries optional structured fields, ``None`` when unknown: ``path`` (the file,
folder or Hub id), ``module`` (the module path being processed) and ``parameter`` (the option at
fault, by its API name). The ``OSError`` classes set ``errno`` and ``filename`` as well, but
``str(exc)`` is always the one-line message.

Example:
    >>> exc = SourceNotFound("a/b: no such file or folder", path="a/b")
    >>> isinstance(exc, FileNotFoundError), str(exc), exc.filename, exc.module
    (True, 'a/b: no such file or folder', 'a/b', None)
"""

from __future__ import annotations

import errno as _errno
from functools import partial
from typing import Any


class LoramergeError(Exception):
    """Base class of every error loramerge raises for bad input or bad options.

    ``message`` is the one line shown to the user; ``path``, ``module`` and ``parameter`` say what
    it is about, where that is known.
    """

    # The errno an OSError subclass reports (None for the others).
    errno_code: int | None = None

    def __init__(self, message: str = "", *, path: str | None = None, module: str | None = None,
                 parameter: str | None = None) -> None:
        # One positional argument only: OSError reads two or more as (errno, strerror, filename)
        # and would then print "[Errno …] …" instead of the message.
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.module = module
        self.parameter = parameter
        if isinstance(self, OSError):
            self.errno = self.errno_code
            self.strerror = message
            self.filename = self.path

    @property
    def message(self) -> str:
        """The one-line message (the same as ``str(exc)``)."""
        return str(self.args[0]) if self.args else ""

    @property
    def fields(self) -> dict[str, str | None]:
        """The structured fields as a dict: ``path``, ``module``, ``parameter``."""
        return {"path": self.path, "module": self.module, "parameter": self.parameter}

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through __init__, so the fields (and an OSError's errno and filename) survive a
        # trip through pickle, e.g. from a worker process.
        return (partial(type(self), self.message, **self.fields), ())

    def with_context(self, message: str | None = None, **fields: str | None) -> LoramergeError:
        """A copy of this error with a new message and/or fields; fields already set are kept
        unless given again.

        Example:
            >>> exc = InvalidParameter("bad density", parameter="density")
            >>> new = exc.with_context(f"module fc: {exc}", module="fc")
            >>> str(new), new.module, new.parameter
            ('module fc: bad density', 'fc', 'density')
        """
        merged = {**self.fields, **fields}
        return type(self)(self.message if message is None else message, **merged)

    def fill(self, **fields: str | None) -> LoramergeError:
        """Set the fields that are still unknown (``None``) and return this same error, to re-raise."""
        for key, value in fields.items():
            if value is not None and getattr(self, key) is None:
                setattr(self, key, str(value) if key == "path" else value)
                if key == "path" and isinstance(self, OSError):
                    self.filename = self.path
        return self


class SourceNotFound(LoramergeError, FileNotFoundError):
    """A path or Hub id that does not resolve to an adapter or model."""

    errno_code = _errno.ENOENT


class ConfigNotFound(LoramergeError, FileNotFoundError):
    """An adapter file without the config that gives its rank and alpha."""

    errno_code = _errno.ENOENT


class CorruptFile(LoramergeError, ValueError):
    """A file that exists but cannot be parsed: truncated, garbage header, bad JSON."""


class UnknownFormat(LoramergeError, ValueError):
    """Files whose layout matches no known adapter format."""


class UnsupportedAdapter(LoramergeError, ValueError):
    """A variant that loramerge reads but cannot merge or write faithfully (DoRA, lora_bias, ...)."""


class PickleRefused(LoramergeError, PermissionError):
    """A pickle-based checkpoint (``.bin``/``.pt``) read without ``allow_pickle``."""

    errno_code = _errno.EPERM


class IncompatibleAdapters(LoramergeError, ValueError):
    """Sources that cannot be combined: shape mismatch, different base models, ..."""


class NonFiniteValues(LoramergeError, ValueError, ArithmeticError):
    """NaN or Inf in adapter factors or weights, or produced by a merge."""


class InvalidParameter(LoramergeError, ValueError):
    """A method, weight list, device or parameter that is unknown or out of range."""


class OutputExists(LoramergeError, FileExistsError):
    """An output path that is not empty, written without ``force``."""

    errno_code = _errno.EEXIST


class HubError(LoramergeError, OSError):
    """A Hugging Face Hub request that failed: no connection, offline mode, credentials, rights."""


class RecipeError(LoramergeError, ValueError):
    """A recipe that does not validate; the message gives the file, line and key."""


class WriteFailed(LoramergeError, OSError):
    """The output could not be written (no space left, permissions); nothing was left behind."""


class MissingDependency(LoramergeError, ImportError):
    """An optional extra that the work needs is not installed; the message says how to install it."""


class OutOfMemory(LoramergeError, MemoryError):
    """The compute device ran out of memory while processing a module; the message says what to do."""


class LoramergeWarning(UserWarning):
    """Something suspicious that does not stop the work (the CLI prints it as ``warning: ...``)."""



class DataError(LoramergeError, ValueError):
    """Evaluation data that cannot be used: a row of no known type, an empty task, a row longer than
    the model's context; the message names the file and the row."""


class UnsupportedModel(LoramergeError, ValueError):
    """A base model the runtime cannot load or run (an unknown model type, no tokenizer where one is needed)."""


class VerificationFailed(LoramergeError, AssertionError):
    """``verify`` found a merge or fold that does not do what the unmerged adapters do."""
