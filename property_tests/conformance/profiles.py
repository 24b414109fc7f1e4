"""Hypothesis settings for the suite: the profiles, and each machine's share of them.

The profiles are the ones conftest.py registers for every test run (same
names, same example counts), so ``Z4J_HYPOTHESIS_PROFILE=ci python -m
pytest`` and ``python -m property_tests --profile ci`` do the same amount of
work. The CLI registers them itself, since it does not load conftest.py.

One example of a state machine is a whole session of steps against a real
server, so each machine runs a fraction of the profile's ``max_examples``.
"""

from __future__ import annotations

from typing import Final

from hypothesis import HealthCheck, settings

__all__ = ["PROFILES", "machine_settings", "register_profiles"]

PROFILES: Final = {"fast": 50, "ci": 300, "deep": 3000}  # max_examples, as in conftest.py

# (share of max_examples, steps per example) per machine.
_SHARES: Final = {
    "agent": (4, 25),
    "ingest": (4, 15),
    "backpressure": (5, 12),
    "opamp": (2, 20),
}


def register_profiles() -> None:
    for name, examples in PROFILES.items():
        settings.register_profile(
            name,
            max_examples=examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )


def machine_settings(machine: str, base: settings | None = None, **overrides: object) -> settings:
    """``base`` (the loaded profile by default) scaled for one machine."""
    base = base if base is not None else settings()
    divide, steps = _SHARES[machine]
    chosen: dict[str, object] = {
        "max_examples": max(3, base.max_examples // divide),
        "stateful_step_count": steps,
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }
    chosen.update(overrides)
    return settings(base, **chosen)  # type: ignore[arg-type]
