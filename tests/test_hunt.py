"""The exactly-once hunt (tests/hunt.py) at CI length: fixed seeds, each a schedule of faults
against the real stack, then every invariant against the simulators' own books. `make chaos`
runs it with new seeds and more faults per run, and prints any failing seed to replay."""
import json

import pytest

from hunt import Hunt
from stack import record_metrics, scaled

SEEDS = (20261203, 7, 11)


@pytest.mark.parametrize("seed", SEEDS)
def test_no_fault_schedule_breaks_the_books(seed):
    figures = Hunt(seed, steps=scaled(10, 30)).run()
    record_metrics("hunt", **figures)
    assert figures["accepted_checked"] > 100, "the run must have paid something to check"
    assert figures["violations"] == {}, json.dumps(figures, indent=1)[:6000]
