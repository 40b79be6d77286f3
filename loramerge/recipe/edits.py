"""``--set key=value``: edits of a recipe's YAML tree before it is validated.

The key is dotted (``sources.0.weight``, ``output.path``); list items are addressed by index and
missing mappings are created. The value is YAML. Every node the edit adds is marked with
``--set key``, so a validation error about it names the edit rather than a line of the file.
"""

from __future__ import annotations

from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from loramerge.errors import RecipeError
from loramerge.io.structured import MAX_DEPTH, compose_yaml

_MAP, _STR, _NULL = "tag:yaml.org,2002:map", "tag:yaml.org,2002:str", "tag:yaml.org,2002:null"


def apply_set(root: Node | None, assignment: str) -> Node:
    """``root`` (None for an empty document) with ``assignment`` (``key=value``) applied in place.

    Example:
        >>> import yaml
        >>> root = apply_set(yaml.compose("sources: [a, b]\\n"), "sources.1=c")
        >>> yaml.safe_load(yaml.serialize(apply_set(root, "output.path=/tmp/x")))
        {'sources': ['a', 'c'], 'output': {'path': '/tmp/x'}}
    """
    key, sep, value = assignment.partition("=")
    key = key.strip()
    label = f"--set {key}"
    if not sep or not key:
        raise RecipeError(f"--set {assignment}: expected key=value, e.g. --set sources.0.weight=0.7")
    if key.count(".") >= MAX_DEPTH:
        raise RecipeError(f"{label}: the key has more than {MAX_DEPTH} parts")
    value_node = compose_yaml(value, name=label, error=RecipeError) if value.strip() else None
    mark = Mark(label, 0, 0, 0, None, None)
    if value_node is None:
        value_node = ScalarNode(_NULL, "", mark, mark)
    _remark(value_node, mark)
    if root is None:
        root = MappingNode(_MAP, [], mark, mark)
    node: Node = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        node = _step(node, part, value_node if i == len(parts) - 1 else None, mark, f"{label}: {where}")
    return root


def _step(node: Node, part: str, value: Node | None, mark: Mark, context: str) -> Node:
    """Go down to ``part`` of ``node`` (creating a mapping there if need be), or put ``value`` there."""
    if isinstance(node, MappingNode):
        found = next((kv for kv in node.value if isinstance(kv[0], ScalarNode) and kv[0].value == part), None)
        child = value if value is not None else found[1] if found is not None else MappingNode(_MAP, [], mark, mark)
        if found is not None:
            node.value[node.value.index(found)] = (found[0], child)
        else:
            node.value.append((ScalarNode(_STR, part, mark, mark), child))
        return child
    if isinstance(node, SequenceNode):
        if not part.isdigit() or int(part) >= len(node.value):
            what = context if not context.endswith(": ") else context + "the recipe"
            raise RecipeError(f"{what} is a list of {len(node.value)}; {part!r} is not an index in it")
        if value is not None:
            node.value[int(part)] = value
        return node.value[int(part)]
    raise RecipeError(f"{context} holds a single value, not a mapping or list")


def _remark(node: Node, mark: Mark) -> None:
    node.start_mark = node.end_mark = mark
    if isinstance(node, SequenceNode):
        for child in node.value:
            _remark(child, mark)
    elif isinstance(node, MappingNode):
        for k, v in node.value:
            _remark(k, mark)
            _remark(v, mark)
