"""PEFT's pattern matching without backtracking agrees with Python's ``re`` (the oracle), and never hangs."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loramerge.io.patterns import PatternError, check_pattern, suffix_match
from tests.fuzz_cases import Hang, time_limit

ATOMS = ["a", "b", ".", "\\.", "[ab]", "[^a]", "\\d", "\\w", "(a|b)", "(?:ab)", "q_proj", "layers", "0", "[0-3]",
         "\\D", "(a|)", "^", "$"]
QUANTS = ["", "", "*", "+", "?", "{2}", "{1,2}", "{0,}", "*?", "{,2}", "+?"]


@st.composite
def patterns(draw, depth=0):
    out = ""
    for _ in range(draw(st.integers(1, 4))):
        if depth < 2 and draw(st.booleans()) and draw(st.booleans()):
            inner = draw(patterns(depth + 1))
            alt = draw(patterns(depth + 1)) if draw(st.booleans()) else None
            out += f"({inner}|{alt})" if alt is not None else f"({inner})"
        else:
            out += draw(st.sampled_from(ATOMS))
        quant = draw(st.sampled_from(QUANTS))
        out += "" if out[-1] in "^$" else quant
    return out


@settings(max_examples=300, deadline=None, database=None)
@given(pattern=patterns(), module=st.text("ab.01q_projlayers3", max_size=12))
def test_suffix_match_agrees_with_re(pattern, module):
    try:
        re.compile(pattern)
        with time_limit(0.5):
            expected = re.match(rf"(.*\.)?({pattern})$", module) is not None
    except (re.error, Hang):
        return
    assert suffix_match(pattern, module) == expected, (pattern, module)


def test_catastrophic_patterns_take_linear_time():
    start = time.monotonic()
    module = "model." + "a" * 5000
    for pattern, matches in (("(a+)+b", False), ("(a|aa)+$", True), ("(.*)*x", False), ("((a*)*)*c", False)):
        assert suffix_match(pattern, module) is matches, pattern
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("pattern,fragment", [("(q)\\1", "backreferences"), ("(?=q)", "lookahead"),
                                               ("\\bq", "word boundaries"), ("(?i)q", "inline flags"),
                                               ("(q", "missing )"), ("a{5,2}", "below its minimum")])
def test_unsupported_or_malformed_patterns_are_refused(pattern, fragment):
    with pytest.raises(PatternError, match=re.escape(fragment)):
        check_pattern(pattern)
