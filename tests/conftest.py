"""Fixtures: a real Postgres (started here, or Z4J_TEST_DATABASE_URL), brain configs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from z4j.config import Config
from z4j.testing.brain import make_config
from z4j.testing.postgres import ExternalPostgres, PostgresCluster


@pytest.fixture
def pg_url(postgres: PostgresCluster | ExternalPostgres) -> Iterator[str]:
    """A fresh, empty database for one test."""
    name = f"z4j_test_{uuid.uuid4().hex[:12]}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    """None for the SQLite store, a fresh Postgres database otherwise."""
    if store_kind == "sqlite":
        return None
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def config(tmp_path: Path, database_url: str | None) -> Config:
    return make_config(tmp_path / "data", database_url)
