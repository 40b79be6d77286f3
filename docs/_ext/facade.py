"""An mkdocs hook that documents the ``loramerge`` facade by its public names.

``loramerge.merge``, ``loramerge.fold``, ``loramerge.extract`` and ``loramerge.convert`` are both
subpackages (or modules) and the functions that the package root re-exports under the same name,
so mkdocstrings, which reads the source statically, finds the module. This hook rewrites a bare
``::: loramerge.NAME`` line (one without an options block) into the object's defining path,
found by importing the package, with ``loramerge.NAME`` as its heading. The pages therefore name
only the public API and keep working when a function moves between internal modules.

Configured in mkdocs.yml under ``hooks``.
"""

from __future__ import annotations

import importlib
import re
import types
from typing import Any

_BARE_DIRECTIVE = re.compile(r"^::: (?P<public>loramerge\.(?P<name>[A-Za-z_]\w*))\s*$")


def defining_path(public: str) -> str | None:
    """Where the object exported as ``loramerge.NAME`` is defined, or None for a module."""
    package = importlib.import_module("loramerge")
    obj = getattr(package, public.split(".", 1)[1])
    if isinstance(obj, types.ModuleType):
        return None
    return f"{obj.__module__}.{obj.__qualname__}"


def rewrite(markdown: str) -> str:
    """``markdown`` with every bare facade directive pointed at the defining object."""
    lines = markdown.split("\n")
    out: list[str] = []
    for i, line in enumerate(lines):
        match = _BARE_DIRECTIVE.match(line)
        has_options = i + 1 < len(lines) and lines[i + 1].startswith((" ", "\t"))
        target = defining_path(match["public"]) if match and not has_options else None
        if target is None:
            out.append(line)
            continue
        out += [
            f"::: {target}",
            "    options:",
            f'      heading: "{match["public"]}"',
            f'      toc_label: "{match["name"]}"',
            "      heading_level: 3",
        ]
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return rewrite(markdown)
