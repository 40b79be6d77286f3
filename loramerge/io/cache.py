"""A small on-disk cache for answers that are slow to compute and cheap to keep (JSON values by key).

The cache lives in ``$LORAMERGE_CACHE`` (default ``$XDG_CACHE_HOME/loramerge``, else
``~/.cache/loramerge``); ``LORAMERGE_CACHE=off`` turns it off. It is best effort: an entry that is
absent, unreadable or malformed reads as a miss, and a failed write leaves nothing behind, so the
caller computes the answer as if there were no cache. Nothing in it is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

OFF = ("off", "0", "")


def cache_dir() -> Path | None:
    """The cache folder, or None when ``LORAMERGE_CACHE=off``.

    Example:
        >>> saved = os.environ.get("LORAMERGE_CACHE")
        >>> os.environ["LORAMERGE_CACHE"] = "off"
        >>> cache_dir() is None
        True
        >>> os.environ["LORAMERGE_CACHE"] = "/tmp/lm-cache"
        >>> str(cache_dir())
        '/tmp/lm-cache'
        >>> _ = os.environ.pop("LORAMERGE_CACHE") if saved is None else os.environ.update(LORAMERGE_CACHE=saved)
    """
    chosen = os.environ.get("LORAMERGE_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in OFF else Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loramerge"


def _entry(section: str, key: str) -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / section / f"{key}.json"


def read_cached(section: str, key: str) -> Any | None:
    """The JSON value stored under ``section``/``key``, or None (a miss).

    Example:
        >>> import tempfile
        >>> saved = os.environ.get("LORAMERGE_CACHE")
        >>> os.environ["LORAMERGE_CACHE"] = tempfile.mkdtemp()
        >>> write_cached("demo", "k", [1, 2]); read_cached("demo", "k"), read_cached("demo", "other")
        ([1, 2], None)
        >>> _ = os.environ.pop("LORAMERGE_CACHE") if saved is None else os.environ.update(LORAMERGE_CACHE=saved)
    """
    path = _entry(section, key)
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or not JSON: a miss
        return None


def write_cached(section: str, key: str, value: Any) -> None:
    """Store the JSON ``value`` under ``section``/``key``, whole or not at all (errors are ignored)."""
    path = _entry(section, key)
    if path is None:
        return
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as out:
            temporary = out.name
            json.dump(value, out)
        os.replace(temporary, path)  # a reader sees the old entry or the whole new one
    except OSError:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
