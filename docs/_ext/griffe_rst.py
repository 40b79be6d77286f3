"""A griffe extension that lets mkdocstrings render loramerge's reStructuredText-flavoured docstrings.

The docstrings are written for ``help()`` and doctests: they use Sphinx roles
(:func:`~loramerge.io.names.hf_resolver`) and a singular ``Example:`` heading. Rather than edit
every module, the docs build rewrites them as it loads the package:

- a role becomes an optional cross-reference: a link where the target is rendered somewhere in
  the docs, plain code otherwise (so strict mode never fails on a private helper's name);
- ``Example:`` and ``Example (what it shows):`` become Google-style ``Examples:`` sections, so
  the doctests render as Python console blocks.

Configured in mkdocs.yml under the mkdocstrings handler's ``extensions``.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?P<role>func|meth|class|mod|data|attr|exc|obj):`(?P<body>[^`]+)`")
_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example(?:\s*\((?P<note>[^\n]*)\))?:[ \t]*$", re.MULTILINE)
_CALLABLE_ROLES = {"func", "meth"}


def _resolve(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` as seen from ``obj``'s scope, or ``name`` itself when unknown."""
    if name.startswith("loramerge"):
        return name
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            return scope.resolve(name)
        except (griffe.NameResolutionError, AttributeError, KeyError):
            scope = scope.parent
    return name


def _role_to_autoref(obj: griffe.Object, match: re.Match[str]) -> str:
    role, body = match["role"], match["body"].strip()
    explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
    if explicit:
        title, target = explicit["title"], explicit["target"]
    else:
        target = body.lstrip("~")
        title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        if role in _CALLABLE_ROLES:
            title += "()"
    identifier = _resolve(obj, target)
    return (
        f'<autoref identifier="{html.escape(identifier)}" optional>'
        f"<code>{html.escape(title)}</code></autoref>"
    )


def _example_heading(match: re.Match[str]) -> str:
    indent, note = match["indent"], match["note"]
    heading = f"{indent}Examples:"
    return f"{indent}{note[0].upper()}{note[1:]}:\n\n{heading}" if note else heading


def rewrite_docstring(obj: griffe.Object, text: str) -> str:
    """``text`` with its roles turned into cross-references and its example headings normalised."""
    text = _ROLE.sub(lambda m: _role_to_autoref(obj, m), text)
    return _EXAMPLE.sub(_example_heading, text)


class RstRoles(griffe.Extension):
    """Rewrite every docstring of a loaded package once all its modules are known."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rewrite_docstring(obj, obj.docstring.value)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
