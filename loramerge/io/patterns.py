"""PEFT's module-pattern matching without backtracking: a ``rank_pattern`` key can never hang a read.

PEFT (≥ 0.15) applies a ``rank_pattern``/``alpha_pattern`` key to a module when
``re.match(rf"(.*\\.)?({key})$", module)`` succeeds: the key, a regular expression, must match a
dotted suffix of the module path. Python's ``re`` backtracks, so a key such as ``(a+)+b`` takes
exponential time on a long module name. This module gives the same answers in linear time:

* a key with no regex syntax but ``.`` (nearly every real key) is compared directly;
* any other key is compiled to a Thompson NFA (literals, ``.``, classes, ``\\d\\w\\s``, groups,
  ``|``, ``* + ? {m,n}`` (greedy, lazy or possessive: the same language), ``^``, ``$``) and
  simulated state-set by state-set, O(len(module) × len(key)).

Constructs that a state machine cannot decide (backreferences, lookarounds, ``\\b``, inline
flags) are refused with :class:`PatternError` rather than guessed.

Example:
    >>> suffix_match("q_proj", "model.layers.0.self_attn.q_proj")
    True
    >>> suffix_match("layers.[0-3].self_attn.q_proj", "model.layers.2.self_attn.q_proj")
    True
    >>> suffix_match("(a+)+b", "model." + "a" * 5000)  # instant; Python's re would never finish
    False
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

MAX_STATES = 20_000
_META = set("\\^$*+?{}[]()|")
_DIGITS = frozenset("0123456789")
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_SPACE = frozenset(" \t\n\r\f\v")


class PatternError(ValueError):
    """A pattern that is malformed, or uses a construct this matcher does not evaluate."""


# ------------------------------------------------------------------------------------ matching


def suffix_match(key: str, module: str) -> bool:
    """True when PEFT applies the pattern ``key`` to ``module``: ``(.*\\.)?(key)$`` matches it.

    Example:
        >>> suffix_match("^a.q", "a.q"), suffix_match("^a.q", "x.a.q"), suffix_match("a.q", "x.a.q")
        (True, False, True)
    """
    if not (_META & set(key)):
        return _literal_suffix(key, module)
    if key.startswith("^") and not (_META & set(key[1:])):
        return len(module) == len(key) - 1 and _dots_equal(key[1:], module)
    return _compiled(key).fullmatch(module)


def check_pattern(key: str) -> None:
    """Raise :class:`PatternError` when ``key`` is malformed or uses an unsupported construct.

    Example:
        >>> try:
        ...     check_pattern("(q|k)_proj\\\\1")
        ... except PatternError as e:
        ...     print(e)
        backreferences are not supported (at position 12)
    """
    if _META & set(key):
        _compiled(key)


def _literal_suffix(key: str, module: str) -> bool:
    n = len(key)
    if len(module) < n or not _dots_equal(key, module[len(module) - n:]):
        return False
    return len(module) == n or module[len(module) - n - 1] == "."


def _dots_equal(key: str, text: str) -> bool:
    """``text`` matches ``key`` where ``.`` in the key stands for any character but a newline."""
    return len(key) == len(text) and all(k == t or (k == "." and t != "\n") for k, t in zip(key, text))


@lru_cache(maxsize=4096)
def _compiled(key: str) -> _Machine:
    machine = _Machine()
    prefix = _Parser(r"(?:.*\.)?", machine).parse()  # PEFT's own wrapper around the key
    body = _Parser(key, machine).parse()
    end = machine.add(_State("end"))
    machine.patch(prefix.outs, body.start)
    machine.patch(body.outs, end)
    final = machine.add(_State("match"))
    machine.states[end].out = final
    machine.start = prefix.start
    return machine


# ------------------------------------------------------------------------------------- the NFA


@dataclass
class _State:
    kind: str  # "char", "split", "begin", "end", "match"
    chars: frozenset[str] | None = None
    negate: bool = False
    out: int | None = None
    out2: int | None = None


@dataclass
class _Fragment:
    start: int
    outs: list[tuple[int, int]]  # (state, 1 or 2): the exits still to connect


@dataclass
class _Machine:
    states: list[_State] = field(default_factory=list)
    start: int = 0

    def add(self, state: _State) -> int:
        if len(self.states) >= MAX_STATES:
            raise PatternError(f"the pattern is too large (more than {MAX_STATES:,} states)")
        self.states.append(state)
        return len(self.states) - 1

    def patch(self, outs: list[tuple[int, int]], target: int) -> None:
        for index, which in outs:
            if which == 1:
                self.states[index].out = target
            else:
                self.states[index].out2 = target

    def _closure(self, starts: list[int], position: int, length: int) -> set[int]:
        seen: set[int] = set()
        stack = list(starts)
        while stack:
            index = stack.pop()
            if index is None or index in seen:
                continue
            seen.add(index)
            state = self.states[index]
            if state.kind == "split":
                stack.extend(i for i in (state.out, state.out2) if i is not None)
            elif state.out is not None and (
                    (state.kind == "begin" and position == 0) or (state.kind == "end" and position == length)):
                stack.append(state.out)
        return seen

    def fullmatch(self, text: str) -> bool:
        current = self._closure([self.start], 0, len(text))
        for position, ch in enumerate(text):
            moved = []
            for index in current:
                state = self.states[index]
                if state.kind == "char" and state.out is not None and ((ch in state.chars) != state.negate):  # type: ignore[operator]
                    moved.append(state.out)
            if not moved:
                return False
            current = self._closure(moved, position + 1, len(text))
        return any(self.states[i].kind == "match" for i in current)


# ------------------------------------------------------------------------------------- parsing


class _Parser:
    """A recursive-descent parser of Python's regex syntax (the supported part) into NFA fragments."""

    def __init__(self, text: str, machine: _Machine) -> None:
        self.text, self.machine, self.pos, self.depth = text, machine, 0, 0

    def fail(self, message: str) -> PatternError:
        return PatternError(f"{message} (at position {self.pos})")

    def parse(self) -> _Fragment:
        fragment = self.alternation()
        if self.pos != len(self.text):
            raise self.fail("unbalanced parenthesis")
        return fragment

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def alternation(self) -> _Fragment:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.sequence())
        result = branches[0]
        for branch in branches[1:]:
            split = self.machine.add(_State("split", out=result.start, out2=branch.start))
            result = _Fragment(split, result.outs + branch.outs)
        return result

    def sequence(self) -> _Fragment:
        parts: list[_Fragment] = []
        while self.peek() not in (None, "|", ")"):
            parts.append(self.quantified())
        return self.chain(parts)

    def chain(self, parts: list[_Fragment]) -> _Fragment:
        """``parts`` one after another (the empty fragment when there are none)."""
        if not parts:
            return self.empty()
        result = parts[0]
        for part in parts[1:]:
            self.machine.patch(result.outs, part.start)
            result = _Fragment(result.start, part.outs)
        return result

    def empty(self) -> _Fragment:
        index = self.machine.add(_State("split"))
        return _Fragment(index, [(index, 1)])

    def quantified(self) -> _Fragment:
        begin = self.pos
        fragment = self.atom()
        atom_text = self.text[begin:self.pos]
        bounds = self.quantifier()
        if bounds is None:
            return fragment
        if self.text[begin] in "^$" or atom_text in ("\\A", "\\Z"):
            raise self.fail("a quantifier after an anchor is not supported")
        low, high = bounds
        if self.peek() in ("?", "+"):
            self.pos += 1  # lazy or possessive: the same set of matching strings
        needed = low + 1 if high is None else high
        copies = [fragment] + [self.reparse(atom_text) for _ in range(max(needed, 1) - 1)]
        return self.repeat(copies, low, high)

    def reparse(self, atom_text: str) -> _Fragment:
        return _Parser(atom_text, self.machine).parse()

    def repeat(self, copies: list[_Fragment], low: int, high: int | None) -> _Fragment:
        """``copies`` (fresh copies of one atom) chained: ``low`` required, then optional ones or a loop."""
        tail: _Fragment | None = None
        if high is None:
            loop = copies[low]
            split = self.machine.add(_State("split", out=loop.start))
            self.machine.patch(loop.outs, split)
            tail = _Fragment(split, [(split, 2)])
        else:
            for optional in reversed(copies[low:high]):
                split = self.machine.add(_State("split", out=optional.start))
                if tail is not None:
                    self.machine.patch(optional.outs, tail.start)
                    tail = _Fragment(split, [(split, 2), *tail.outs])
                else:
                    tail = _Fragment(split, [(split, 2), *optional.outs])
        return self.chain([*copies[:low], *([tail] if tail is not None else [])])

    def quantifier(self) -> tuple[int, int | None] | None:
        ch = self.peek()
        if ch in ("*", "+", "?"):
            self.pos += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
        if ch == "{":
            end = self.text.find("}", self.pos)
            body = self.text[self.pos + 1:end] if end > 0 else ""
            low_text, comma, high_text = body.partition(",")
            if end > 0 and (low_text.isdigit() or (comma and not low_text)) and (high_text.isdigit() or not high_text) \
                    and (low_text or high_text or not comma) and all(c.isdigit() or c == "," for c in body):
                low = int(low_text) if low_text else 0
                high = int(high_text) if high_text else (None if comma else low)
                if high is not None and high < low:
                    raise self.fail("the quantifier's maximum is below its minimum")
                if max(low, high or 0) > 1000:
                    raise self.fail("repeat counts above 1000 are not supported")
                self.pos = end + 1
                return low, high
        return None

    def atom(self) -> _Fragment:
        ch = self.peek()
        if ch == "(":
            return self.group()
        if ch == "[":
            return self.char_class()
        if ch in ("*", "+", "?"):
            raise self.fail("nothing to repeat")
        if ch == ")":
            raise self.fail("unbalanced parenthesis")
        self.pos += 1
        if ch == ".":
            return self.chars(frozenset("\n"), negate=True)
        if ch == "^":
            return self.anchor("begin")
        if ch == "$":
            return self.anchor("end")
        if ch == "\\":
            return self.escape()
        return self.chars(frozenset(ch))  # type: ignore[arg-type]

    def anchor(self, kind: str) -> _Fragment:
        index = self.machine.add(_State(kind))
        return _Fragment(index, [(index, 1)])

    def chars(self, chars: frozenset[str], negate: bool = False) -> _Fragment:
        index = self.machine.add(_State("char", chars=chars, negate=negate))
        return _Fragment(index, [(index, 1)])

    def group(self) -> _Fragment:
        self.pos += 1
        if self.text.startswith("?", self.pos):
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif self.text.startswith("?P<", self.pos):
                end = self.text.find(">", self.pos)
                name = self.text[self.pos + 3:end] if end > 0 else ""
                if not name.isidentifier():
                    raise self.fail("bad group name")
                self.pos = end + 1
            elif self.text.startswith(("?=", "?!", "?<=", "?<!"), self.pos):
                raise self.fail("lookahead and lookbehind are not supported")
            elif self.text.startswith("?P=", self.pos):
                raise self.fail("backreferences are not supported")
            else:
                raise self.fail("inline flags and other (?…) groups are not supported")
        self.depth += 1
        if self.depth > 100:
            raise self.fail("groups nested more than 100 deep are not supported")
        inner = self.alternation()
        self.depth -= 1
        if self.peek() != ")":
            raise self.fail("missing ), unterminated subpattern")
        self.pos += 1
        return inner

    def escape(self) -> _Fragment:
        ch = self.peek()
        if ch is None:
            raise self.fail("bad escape (end of pattern)")
        self.pos += 1
        if ch == "A":
            return self.anchor("begin")
        if ch == "Z":
            return self.anchor("end")
        if ch in "123456789":
            raise self.fail("backreferences are not supported")
        if ch in "bB":
            raise self.fail("word boundaries (\\b, \\B) are not supported")
        sets = self.class_escape(ch)
        return self.chars(sets[0], negate=sets[1])

    def class_escape(self, ch: str) -> tuple[frozenset[str], bool]:
        named = {"d": (_DIGITS, False), "D": (_DIGITS, True), "w": (_WORD, False), "W": (_WORD, True),
                 "s": (_SPACE, False), "S": (_SPACE, True)}
        if ch in named:
            return named[ch]
        controls = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}
        if ch in controls:
            return frozenset(controls[ch]), False
        if ch in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[ch]
            digits = self.text[self.pos:self.pos + width]
            if len(digits) != width or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self.fail(f"bad escape \\{ch}")
            self.pos += width
            return frozenset(chr(int(digits, 16))), False
        if ch.isalnum():
            raise self.fail(f"bad escape \\{ch}")
        return frozenset(ch), False

    def char_class(self) -> _Fragment:
        self.pos += 1
        negate = self.peek() == "^"
        if negate:
            self.pos += 1
        members: set[str] = set()
        excluded_sets: list[frozenset[str]] = []
        first = True
        while True:
            ch = self.peek()
            if ch is None:
                raise self.fail("unterminated character set")
            if ch == "]" and not first:
                self.pos += 1
                break
            first = False
            low = self.class_item(members, excluded_sets)
            if low is None:
                continue
            if self.peek() == "-" and self.pos + 1 < len(self.text) and self.text[self.pos + 1] != "]":
                self.pos += 1
                high = self.class_item(members, excluded_sets)
                if high is None or ord(high) < ord(low):
                    raise self.fail("bad character range")
                if ord(high) - ord(low) > 0x10000:
                    raise self.fail("character ranges wider than 65,536 are not supported")
                members.update(chr(c) for c in range(ord(low), ord(high) + 1))
            else:
                members.add(low)
        if excluded_sets:
            raise self.fail("negated classes (\\D, \\W, \\S) inside [] are not supported")
        return self.chars(frozenset(members), negate=negate)

    def class_item(self, members: set[str], excluded: list[frozenset[str]]) -> str | None:
        """One class member: a single character (returned) or a named set (added, None returned)."""
        ch = self.text[self.pos]
        self.pos += 1
        if ch != "\\":
            return ch
        esc = self.peek()
        if esc is None:
            raise self.fail("bad escape (end of pattern)")
        self.pos += 1
        if esc == "b":
            return "\b"
        if esc in "123456789":
            raise self.fail("backreferences are not supported")
        chars, negate = self.class_escape(esc)
        if negate:
            excluded.append(chars)
            return None
        if len(chars) == 1:
            return next(iter(chars))
        members.update(chars)
        return None
