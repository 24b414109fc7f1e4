"""Fixtures: a real Postgres (started here, or Z4J_TEST_DATABASE_URL), brain configs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from z4j.config import Config
from z4j.testing.brain import make_config
from z4j.testing.postgres import PostgresCluster


class ExternalPostgres:
    """A server we were pointed at: usable, but not ours to stop."""

    def __init__(self, url: str) -> None:
        self.url = url

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        info["dbname"] = name
        return psycopg.conninfo.make_conninfo(**info)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
