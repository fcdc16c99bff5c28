"""Hypothesis profiles: "ci" (default: few derandomized examples) and "nightly" (many); the long tier.

Select with HYPOTHESIS_PROFILE, e.g. ``HYPOTHESIS_PROFILE=nightly python -m pytest tests/test_properties.py``.

Under pytest-xdist (``-n auto``, the README's test command) each worker runs torch on one thread:
the tests are small models whose time is per-op dispatch, so N single-threaded workers on N cores
beat one process on N threads, and N processes with N threads each would fight over the cores.

Tests marked ``long`` (minutes each: memory growth over tens of builds, a second AOTInductor package,
the GPU suite's CPU dry run) are skipped unless ``--long`` is given; where it can, the default run
checks the same property faster (the graph and meta after each kind of build once, the ViM's
AOTInductor package). The nightly-style run:
``HYPOTHESIS_PROFILE=nightly python -m pytest -n auto --dist loadfile --long``.
"""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=5, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="also run the tests marked long (minutes each)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long tier: run with --long (tests/conftest.py)")
    for item in items:
        if item.get_closest_marker("long"):
            item.add_marker(skip)
