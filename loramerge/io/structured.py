"""Reading JSON and YAML safely: one reader for every config, index, recipe and card.

Every structured file loramerge reads (``adapter_config.json``, ``config.json``,
``model_index.json``, safetensors indexes, recipes, ``--set`` values, model-card front matter)
comes through here, so the same limits hold everywhere:

* only **regular files** are read (no FIFO, device, socket, nothing under ``/proc``, ``/sys`` or
  ``/dev``), opened without blocking and read up to a **size cap**;
* binary input is refused as "not a text file";
* nesting is capped (:data:`MAX_DEPTH`) before any recursive code runs, so a deep document is one
  error line instead of a ``RecursionError``;
* YAML gets only plain tags (``!!python/...`` and custom tags are refused), integers of more
  than :data:`MAX_INT_DIGITS` digits are refused, and alias expansion is bounded;
* parser errors become one line, ``file:line: invalid JSON/YAML (reason)``;
* an optional small schema (:class:`Spec` values per key) checks types, with ``file:line: key``.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> p = Path(tempfile.mkdtemp()) / "adapter_config.json"
    >>> _ = p.write_text('{\\n  "r": 8.5\\n}')
    >>> try:
    ...     read_json(p, schema={"r": POSITIVE_INT})
    ... except CorruptFile as e:
    ...     print(str(e).split("/")[-1])
    adapter_config.json:2: r: must be a positive integer, got 8.5
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from loramerge.errors import CorruptFile, LoramergeError, SourceNotFound

MAX_BYTES = 64 << 20
"""Largest structured file read: far above any config, index or recipe (a 1,000-shard index is ~10 MB)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists accepted (real configs stay under 10)."""
MAX_INT_DIGITS = 4300
"""Longest integer accepted, Python's own ``int`` conversion limit."""
MAX_YAML_NODES = 1_000_000
"""Most nodes a YAML document may expand to through aliases."""

_SPECIAL_ROOTS = ("/proc", "/sys", "/dev")
_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in
                        ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge", "value"))

ErrorType = type[LoramergeError]
F = TypeVar("F", bound=Callable[..., Any])


def _names_path(function: F) -> F:
    """Fill the ``path`` field of the errors a reader raises with the file it was given."""
    @functools.wraps(function)
    def wrapper(path: str | Path, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(path, *args, **kwargs)
        except LoramergeError as exc:
            raise exc.fill(path=str(path)) from None

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- files


def special_file_reason(path: str | Path) -> str | None:
    """Why ``path`` is no regular file to read (FIFO, device, ``/proc`` …), or None when it is one.

    Symlinks are followed (the Hugging Face cache is made of them); the target decides.

    Example:
        >>> special_file_reason("/dev/zero")
        'is a device or kernel file, not a regular file'
        >>> special_file_reason(__file__) is None
        True
    """
    real = os.path.realpath(path)
    if any(real == root or real.startswith(root + "/") for root in _SPECIAL_ROOTS):
        target = f" (it leads to {real})" if real != os.path.abspath(path) else ""
        return f"is a device or kernel file{target}, not a regular file"
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return None  # the caller's open reports a missing file in its own words
    return None if stat.S_ISREG(mode) else f"is {_kind(mode)}, not a regular file"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


@_names_path
def read_bytes(path: str | Path, *, max_bytes: int = MAX_BYTES, error: ErrorType = CorruptFile,
               missing: ErrorType = SourceNotFound, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, at most ``max_bytes`` of them.

    A missing file raises ``missing``; anything else that is wrong (not a regular file, too large,
    unreadable) raises ``error``, in one line naming the file.

    Example:
        >>> try:
        ...     read_bytes("/dev/zero")
        ... except CorruptFile as e:
        ...     print(e)
        /dev/zero: is a device or kernel file, not a regular file
    """
    reason = special_file_reason(path)
    if reason is not None:
        raise error(f"{path}: {reason}")
    try:
        # O_NONBLOCK: a FIFO swapped in after the check above still cannot block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise missing(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise error(f"{path}: is {info.st_size:,} bytes, more than the {max_bytes:,} a {what} may have")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise error(f"{path}: is more than the {max_bytes:,} bytes a {what} may have")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{path}: cannot read it ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def decode_text(data: bytes, name: str, *, error: ErrorType = CorruptFile) -> str:
    """``data`` as UTF-8 text, or ``error`` saying it is not a text file (binary, NUL bytes).

    Example:
        >>> decode_text(b"\\xef\\xbb\\xbfr: 8\\n", "a.yaml")
        'r: 8\\n'
    """
    if b"\x00" in data[:65536]:
        raise error(f"{name}: not a text file (it holds binary data)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{name}: not a text file (not UTF-8 at byte {exc.start})") from None
    return text.removeprefix("\ufeff")


@_names_path
def read_text(path: str | Path, *, max_bytes: int = MAX_BYTES, error: ErrorType = CorruptFile,
              missing: ErrorType = SourceNotFound, what: str = "file") -> str:
    """The UTF-8 text of the regular file ``path`` (see :func:`read_bytes` and :func:`decode_text`).

    Example:
        >>> try:
        ...     read_text("/proc/version")
        ... except CorruptFile as e:
        ...     print(e)
        /proc/version: is a device or kernel file, not a regular file
    """
    return decode_text(read_bytes(path, max_bytes=max_bytes, error=error, missing=missing, what=what), str(path),
                       error=error)


# ---------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Spec:
    """One allowed shape of a value: a label for messages and a test.

    Example:
        >>> POSITIVE_INT.accepts(8), POSITIVE_INT.accepts(8.5), one_of(STRING, NULL).label
        (True, False, 'a string or null')
    """

    label: str
    test: Callable[[Any], bool]
    items: Spec | None = None  # for lists and mappings: each item's spec
    options: tuple[Spec, ...] = ()  # for one_of: the alternatives

    def accepts(self, value: Any) -> bool:
        return _problem(self, value, "") is None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


STRING = Spec("a string", lambda v: isinstance(v, str))
BOOL = Spec("true or false", lambda v: isinstance(v, bool))
NULL = Spec("null", lambda v: v is None)
INT = Spec("an integer", _is_int)
POSITIVE_INT = Spec("a positive integer", lambda v: _is_int(v) and v > 0)
NUMBER = Spec("a finite number", _is_number)
POSITIVE = Spec("a positive number", lambda v: _is_number(v) and v > 0)
OBJECT = Spec("an object", lambda v: isinstance(v, dict))
LIST = Spec("a list", lambda v: isinstance(v, list))
ANY = Spec("anything", lambda v: True)


def one_of(*specs: Spec) -> Spec:
    """A value that any of ``specs`` accepts; a list or mapping is judged by the spec of its kind.

    Example:
        >>> one_of(map_of(POSITIVE_INT), NULL).accepts({"q": 2.5})
        False
    """
    return Spec(" or ".join(s.label for s in specs), lambda v: True, options=specs)


def list_of(item: Spec) -> Spec:
    """A list whose every item ``item`` accepts."""
    return Spec(f"a list of {_plural(item.label)}", lambda v: isinstance(v, list), item)


def map_of(item: Spec) -> Spec:
    """An object whose every value ``item`` accepts (keys are strings)."""
    return Spec(f"an object of {_plural(item.label)}", lambda v: isinstance(v, dict), item)


def _plural(label: str) -> str:
    bare = re.sub(r"^(a|an) ", "", label).replace("true or false", "booleans")
    return bare + ("s" if label.startswith(("a ", "an ")) else "")


def _problem(spec: Spec, value: Any, key: str) -> tuple[str, Spec, Any] | None:
    """``(dotted key, refusing spec, value)`` of the first part of ``value`` that ``spec`` refuses, or None."""
    if spec.options:
        for option in spec.options:
            if option.test(value):
                found = _problem(option, value, key)
                if found is None or len(spec.options) == 1 or option.items is not None:
                    return found
        return key, spec, value
    if not spec.test(value):
        return key, spec, value
    if spec.items is not None:
        pairs = value.items() if isinstance(value, dict) else enumerate(value)
        for item_key, item in pairs:
            found = _problem(spec.items, item, f"{key}.{item_key}" if key else str(item_key))
            if found is not None:
                return found
    return None


def check_schema(data: Mapping[str, Any], schema: Mapping[str, Spec], *, name: str, text: str | None = None,
                 error: ErrorType = CorruptFile) -> None:
    """Refuse the first key of ``data`` whose value ``schema`` does not accept: ``file:line: key: must be …``.

    Keys absent from ``data`` or from ``schema`` are not checked. ``text`` (the document) gives the line.

    Example:
        >>> try:
        ...     check_schema({"target_modules": [1]}, {"target_modules": list_of(STRING)}, name="c.json")
        ... except CorruptFile as e:
        ...     print(e)
        c.json: target_modules.0: must be a string, got 1
    """
    for key, spec in schema.items():
        if key not in data:
            continue
        found = _problem(spec, data[key], key)
        if found is not None:
            where, refused, value = found
            raise error(f"{_where(name, text, where.split('.'))}: {where}: must be {refused.label}, got {_show(value)}")


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _where(name: str, text: str | None, keys: list[str]) -> str:
    """``name:line`` of the (nested) JSON key path in ``text``, or ``name`` when it cannot be found."""
    if text is None:
        return name
    position = 0
    for key in keys:
        match = re.compile(rf'"{re.escape(key)}"\s*:').search(text, position)
        if match is None:
            break
        position = match.start()
    return f"{name}:{text.count(chr(10), 0, position) + 1}" if position else name


# ------------------------------------------------------------------------------------------ JSON

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _json_depth(text: str) -> tuple[int, int]:
    """The deepest nesting of ``text`` (strings skipped) and the offset where it is first reached."""
    depth = deepest = where = 0
    for match in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        char = match.group()[0]
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, match.start()
                if deepest > MAX_DEPTH:
                    break
        elif char in "]}":
            depth -= 1
    return deepest, where


def parse_json(text: str, *, name: str, schema: Mapping[str, Spec] | None = None, error: ErrorType = CorruptFile,
               want_object: bool = True, lines: bool = True) -> Any:
    """The JSON value of ``text``; ``name`` labels the errors (one line each, with the line unless ``lines`` is false).

    Example:
        >>> parse_json('{"a": [1, 2]}', name="x.json")
        {'a': [1, 2]}
        >>> try:
        ...     parse_json("[" * 100_000, name="deep.json")
        ... except CorruptFile as e:
        ...     print(e)
        deep.json:1: invalid JSON (nested more than 64 levels deep)
    """
    deepest, where = _json_depth(text)
    if deepest > MAX_DEPTH:
        line = f":{text.count(chr(10), 0, where) + 1}" if lines else ""
        raise error(f"{name}{line}: invalid JSON (nested more than {MAX_DEPTH} levels deep)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{name}{f':{exc.lineno}' if lines else ''}: invalid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:
        reason = (f"an integer of more than {MAX_INT_DIGITS:,} digits" if "digits" in str(exc)
                  else _first_line(exc))
        raise error(f"{name}: invalid JSON ({reason})") from None
    if want_object and not isinstance(value, dict):
        raise error(f"{name}: expected a JSON object, got {type(value).__name__}")
    if schema is not None and isinstance(value, dict):
        check_schema(value, schema, name=name, text=text, error=error)
    return value


@_names_path
def read_json(path: str | Path, *, schema: Mapping[str, Spec] | None = None, error: ErrorType = CorruptFile,
              missing: ErrorType = SourceNotFound, max_bytes: int = MAX_BYTES, want_object: bool = True) -> Any:
    """The JSON value stored in the regular file ``path``, checked against ``schema`` when one is given.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> p = Path(tempfile.mkdtemp()) / "c.json"
        >>> _ = p.write_text('{"r": 8}')
        >>> read_json(p, schema={"r": POSITIVE_INT})
        {'r': 8}
    """
    text = read_text(path, max_bytes=max_bytes, error=error, missing=missing, what="JSON file")
    return parse_json(text, name=str(path), schema=schema, error=error, want_object=want_object)


# ------------------------------------------------------------------------------------------ YAML


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the composer's recursion capped at :data:`MAX_DEPTH`."""

    def __init__(self, stream: str, name: str, error: ErrorType) -> None:
        super().__init__(stream)
        self.name = name
        self._error = error
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # type: ignore[override]
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise self._error(f"{self.name}:{mark.line + 1}: invalid YAML (nested more than {MAX_DEPTH} "
                                  "levels deep)")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def compose_yaml(text: str, *, name: str, error: ErrorType = CorruptFile) -> Node | None:
    """The YAML node tree of ``text`` (None when empty), checked for depth, tags, integer size and aliases.

    Nodes keep ``name`` in their marks, so later messages can point at ``name:line``.

    Example:
        >>> compose_yaml("a: [1, 2]", name="r.yaml").value[0][0].value
        'a'
        >>> try:
        ...     compose_yaml("x: !!python/name:os.system", name="r.yaml")
        ... except CorruptFile as e:
        ...     print(e)
        r.yaml:1: the YAML tag !!python/name:os.system is not allowed; loramerge reads plain YAML only
    """
    loader = None
    try:
        loader = _BoundedLoader(text, name, error)  # its reader already refuses unprintable characters
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        parts = [p for p in (exc.context, exc.problem) if p] or ["syntax error"]
        reason = " ".join("; ".join(parts).split())
        raise error(f"{name}{line}: invalid YAML ({reason})") from None
    except yaml.YAMLError as exc:
        raise error(f"{name}: invalid YAML ({' '.join(str(exc).split())})") from None
    except LoramergeError:
        raise
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an escape beyond Unicode, "\\U99999999"
        raise error(f"{name}: invalid YAML ({_first_line(exc)})") from None
    finally:
        if loader is not None:
            loader.dispose()
    if root is not None:
        _check_nodes(root, name, error)
        _rename_marks(root, name)
    return root


def _check_nodes(root: Node, name: str, error: ErrorType) -> None:
    """Plain tags only, integers within :data:`MAX_INT_DIGITS`, no self-reference, bounded expansion."""
    sizes: dict[int, int] = {}
    # Iterative post-order walk; ``open_`` holds the nodes on the current path, to catch cycles.
    stack: list[tuple[Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > MAX_YAML_NODES:
                raise error(f"{name}:{node.start_mark.line + 1}: invalid YAML (aliases expand it to more than "
                            f"{MAX_YAML_NODES:,} values)")
            continue
        if key in sizes:
            continue
        if key in open_:
            raise error(f"{name}:{node.start_mark.line + 1}: invalid YAML (an alias refers to the value that holds it)")
        line = node.start_mark.line + 1
        if node.tag not in _PLAIN_TAGS:
            shown = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise error(f"{name}:{line}: the YAML tag {shown} is not allowed; loramerge reads plain YAML only")
        if isinstance(node, ScalarNode) and node.tag.endswith(":int"):
            digits = sum(ch.isdigit() for ch in node.value)
            if digits > MAX_INT_DIGITS:
                raise error(f"{name}:{line}: invalid YAML (an integer of {digits:,} digits; at most "
                            f"{MAX_INT_DIGITS:,} are accepted)")
        open_.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _rename_marks(root: Node, name: str) -> None:
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for mark in (node.start_mark, node.end_mark):
            if mark is not None:
                mark.name = name
        stack.extend(_children(node))


def construct_yaml(node: Node | None) -> Any:
    """The Python value of a node checked by :func:`compose_yaml` (plain types only).

    Example:
        >>> construct_yaml(compose_yaml("a: [1, 2.5, x]", name="r.yaml"))
        {'a': [1, 2.5, 'x']}
    """
    if node is None:
        return None
    return yaml.SafeLoader("").construct_document(node)


def parse_yaml(text: str, *, name: str, schema: Mapping[str, Spec] | None = None,
               error: ErrorType = CorruptFile) -> Any:
    """The Python value of the YAML ``text`` (see :func:`compose_yaml`), checked against ``schema``.

    Example:
        >>> parse_yaml("r: 8\\nalpha: 16\\n", name="c.yaml", schema={"r": POSITIVE_INT})
        {'r': 8, 'alpha': 16}
    """
    node = compose_yaml(text, name=name, error=error)
    value = construct_yaml(node)
    if schema is not None and isinstance(value, dict):
        for key, spec in schema.items():
            if key in value:
                line = _yaml_key_line(node, key)
                check_schema({key: value[key]}, {key: spec}, name=f"{name}:{line}" if line else name, error=error)
    return value


def _yaml_key_line(node: Node | None, key: str) -> int | None:
    if isinstance(node, MappingNode):
        for k, _ in node.value:
            if isinstance(k, ScalarNode) and k.value == key:
                return k.start_mark.line + 1
    return None


@_names_path
def read_yaml(path: str | Path, *, schema: Mapping[str, Spec] | None = None, error: ErrorType = CorruptFile,
              missing: ErrorType = SourceNotFound, max_bytes: int = MAX_BYTES) -> Any:
    """The YAML value stored in the regular file ``path`` (see :func:`parse_yaml`).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> p = Path(tempfile.mkdtemp()) / "r.yaml"
        >>> _ = p.write_bytes(b"\\x89PNG\\r\\n\\x1a\\n\\x00\\x00")
        >>> try:
        ...     read_yaml(p)
        ... except CorruptFile as e:
        ...     print(str(e).split("/")[-1])
        r.yaml: not a text file (it holds binary data)
    """
    text = read_text(path, max_bytes=max_bytes, error=error, missing=missing, what="YAML file")
    return parse_yaml(text, name=str(path), schema=schema, error=error)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
