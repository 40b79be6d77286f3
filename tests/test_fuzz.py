"""Property tests: every reader and the output layer keep the promise on hostile inputs.

The promise: a correct result (see the checks in :mod:`tests.fuzz_cases`) or a ``LoramergeError``
with one line; never another exception, never a hang, never a partial output. CI runs a bounded
number of examples per target (about ten seconds in all); ``pytest --fuzz`` runs fifty times as
many (at least 1,000 per target).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from tests import fuzz_cases as fc

FUZZ = os.environ.get("LORAMERGE_FUZZ") == "1"
CI_EXAMPLES = {"peft": 25, "kohya/lycoris": 25, "diffusers": 20, "recipes": 30, "checkpoints": 25, "fold": 10,
               "output": 40}


@pytest.mark.parametrize("target", list(fc.TARGETS))
def test_promise_is_kept(target):
    strategy, run = fc.TARGETS[target]
    count = max(1000, 50 * CI_EXAMPLES[target]) if FUZZ else CI_EXAMPLES[target]

    @settings(max_examples=count, deadline=None, database=None, derandomize=not FUZZ,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def check(drawn):
        outcome = run(drawn)
        assert outcome.kept, f"{target}: {outcome.kind}: {outcome.detail}"

    check()
