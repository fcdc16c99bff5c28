"""Hypothesis profiles: "ci" (default: few derandomized examples) and "nightly" (many).

Select with HYPOTHESIS_PROFILE, e.g. ``HYPOTHESIS_PROFILE=nightly python -m pytest tests/test_properties.py``.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=5, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
