"""Settings shared by tests/ and property_tests/.

Hypothesis profiles: ``fast`` (default, every run), ``ci`` (more examples),
``deep`` (long runs). Pick one with ``--hypothesis-profile NAME`` or
``Z4J_HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from z4j.testing.postgres import ExternalPostgres, PostgresCluster

_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("fast", max_examples=50, **_common)
settings.register_profile("ci", max_examples=300, **_common)
settings.register_profile("deep", max_examples=3000, **_common)
settings.load_profile(os.environ.get("Z4J_HYPOTHESIS_PROFILE", "fast"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster | ExternalPostgres]:
    """The session's Postgres server. Tests must not stop it: see `own_postgres`."""
    url = os.environ.get("Z4J_TEST_DATABASE_URL")
    if url:
        yield ExternalPostgres(url)
        return
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A cluster for this test alone, which it may stop and restart."""
    with PostgresCluster() as cluster:
        yield cluster
