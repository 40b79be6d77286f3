"""The exception hierarchy.

Every error a user can cause derives from :class:`LoramergeError`. Its message is one
self-contained line that names the file and, where it applies, the module, so the CLI can
print it as is and exit without a traceback.
"""

from __future__ import annotations


class LoramergeError(Exception):
    """Base class of every error loramerge raises for bad input or bad options."""


class SourceNotFound(LoramergeError):
    """A path or Hub id that does not resolve to an adapter or model."""


class ConfigNotFound(LoramergeError):
    """An adapter file without the config that gives its rank and alpha."""


class CorruptFile(LoramergeError):
    """A file that exists but cannot be parsed: truncated, garbage header, bad JSON."""


class UnknownFormat(LoramergeError):
    """Files whose layout matches no known adapter format."""


class UnsupportedAdapter(LoramergeError):
    """A variant that loramerge reads but cannot merge or write faithfully (DoRA, lora_bias, ...)."""


class PickleRefused(LoramergeError):
    """A pickle-based checkpoint (``.bin``/``.pt``) read without ``allow_pickle``."""


class IncompatibleAdapters(LoramergeError):
    """Sources that cannot be combined: shape mismatch, different base models, ..."""


class NonFiniteValues(LoramergeError):
    """NaN or Inf in adapter factors or weights."""


class InvalidParameter(LoramergeError):
    """A method, weight list or parameter that is unknown or out of range."""


class OutputExists(LoramergeError):
    """An output path that is not empty, written without ``force``."""


class HubError(LoramergeError):
    """A Hugging Face Hub request that failed: no connection, offline mode, credentials, rights."""


class RecipeError(LoramergeError):
    """A recipe that does not validate; the message gives the file, line and key."""


class WriteFailed(LoramergeError):
    """The output could not be written (no space left, permissions); nothing was left behind."""


class MissingDependency(LoramergeError, ImportError):
    """An optional extra that the work needs is not installed; the message says how to install it."""


class LoramergeWarning(UserWarning):
    """Something suspicious that does not stop the work (the CLI prints it as ``warning: ...``)."""
