import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stack import Stack, stop_fast  # noqa: E402


@pytest.fixture
def short_dir():
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="rinha-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stack(short_dir):
    s = Stack(short_dir)
    yield s
    s.stop()


@pytest.fixture
def make_stack(short_dir):
    """A stack with options: make_stack(sim_options={...}, FALLBACK_POLICY="eager", ...); torn down
    without the simulators' slow graceful exit (nothing in a simulator needs one)."""
    made = []

    def factory(**kwargs):
        s = Stack(short_dir, **kwargs)
        made.append(s)
        return s
    yield factory
    for s in made:
        stop_fast(s)
