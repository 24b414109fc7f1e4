"""Settings shared by tests/ and property_tests/.

Hypothesis profiles: ``fast`` (default, every run), ``ci`` (more examples),
``deep`` (long runs). Pick one with ``--hypothesis-profile NAME`` or
``Z4J_HYPOTHESIS_PROFILE``.
"""

import os

from hypothesis import HealthCheck, settings

_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("fast", max_examples=50, **_common)
settings.register_profile("ci", max_examples=300, **_common)
settings.register_profile("deep", max_examples=3000, **_common)
settings.load_profile(os.environ.get("Z4J_HYPOTHESIS_PROFILE", "fast"))
