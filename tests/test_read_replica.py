"""Z4J_DATABASE_READ_URL against a real streaming standby.

The standby is made once for the module with ``pg_basebackup -R`` from the
harness's cluster and started on a port of its own; each test's database,
created on the primary afterwards, reaches it by replication. Replay is
paused (``pg_wal_replay_pause``) to tell the two apart: a row written on the
primary then is on the primary only, so a list that lacks it was read on
the standby, and one that shows it was read on the primary.

The last test promotes the standby: it must stay last in this file.
"""

from __future__ import annotations

import inspect
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import psycopg
import pytest
import trio
from test_metrics import check_exposition, documented_metrics, exposed

import z4j.ingest
from z4j import keys
from z4j.brain.commands import Commands
from z4j.brain.http.api import Api as ApiApp
from z4j.brain.http.auth import Auth
from z4j.brain.http.provisioning_api import ProvisioningRoutes
from z4j.config import Config, ConfigError, load_config
from z4j.store.base import Store
from z4j.store.postgres import PostgresStore
from z4j.store.replica import (
    PROBE_TIMEOUT_SECONDS,
    Sample,
    judge,
    lag_of,
    replica_reads,
    replica_reads_allowed,
)
from z4j.testing.agents import admin_token, provision
from z4j.testing.brain import make_config, read_events, run_z4j, running_brain, wait_until
from z4j.testing.http import http_request
from z4j.testing.postgres import ExternalPostgres, PostgresCluster
from z4j.testing.store import open_store

REPLICA_METRICS = {
    "z4j_read_replica_serving": "gauge",
    "z4j_read_replica_lag_seconds": "gauge",
    "z4j_read_replica_reads_total": "counter",
    "z4j_read_replica_fallbacks_total": "counter",
}
LIMIT_MS = 5000  # Z4J_READ_MAX_LAG_MS's default


@pytest.fixture(scope="module")
def standby(postgres: PostgresCluster | ExternalPostgres) -> Iterator[PostgresCluster]:
    """A hot standby of the session's cluster, for this module."""
    if not isinstance(postgres, PostgresCluster):
        pytest.skip("needs the harness's own cluster to pg_basebackup from")
    cluster = postgres.standby()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def _database(url: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])


@pytest.fixture
def read_url(pg_url: str, standby: PostgresCluster) -> str:
    """The standby's copy of this test's database, once replication brought it."""
    url = standby.url_for(_database(pg_url))
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2):
                return url
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sql(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def _pause(url: str) -> None:
    _sql(url, "SELECT pg_wal_replay_pause()")
    deadline = time.monotonic() + 30
    while _sql(url, "SELECT pg_get_wal_replay_pause_state()")[0][0] != "paused":
        assert time.monotonic() < deadline
        time.sleep(0.02)


async def _metrics(http: tuple[str, int]) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    reply = await http_request(http, "GET", "/metrics")
    assert reply.status == 200
    text = reply.body.decode()
    check_exposition(text)
    return exposed(text).samples


def _one(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float | None:
    return samples.get(name, {}).get(())


def _fallbacks(samples: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> dict[str, float]:
    return {dict(k)["reason"]: v for k, v in samples["z4j_read_replica_fallbacks_total"].items()}


class Api:
    def __init__(self, http: tuple[str, int], token: str) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {token}"}

    async def get(self, path: str) -> Any:
        reply = await http_request(self.http, "GET", "/api/v1" + path, headers=self.headers)
        assert reply.status == 200, (path, reply.status, reply.body[:300])
        return reply.json()

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        reply = await http_request(
            self.http, "POST", "/api/v1" + path, body=orjson.dumps(body), headers=self.headers
        )
        assert reply.status in (200, 201), (path, reply.status, reply.body[:300])
        return reply.json()

    async def agent_names(self) -> set[str]:
        return {a["name"] for a in (await self.get("/agents"))["items"]}

    async def event_markers(self) -> set[str]:
        items = (await self.get("/events?limit=100"))["items"]
        return {e["body"].get("marker") for e in items if isinstance(e.get("body"), dict)} - {None}

    async def ready(self) -> dict[str, Any]:
        reply = await http_request(self.http, "GET", "/health/ready")
        assert reply.status == 200, reply.body
        body: dict[str, Any] = reply.json()
        return body


async def _serving(http: tuple[str, int]) -> bool:
    return _one(await _metrics(http), "z4j_read_replica_serving") == 1


async def _caught_up(http: tuple[str, int]) -> bool:
    s = await _metrics(http)
    return _one(s, "z4j_read_replica_serving") == 1 and _one(s, "z4j_read_replica_lag_seconds") == 0


def _config(tmp_path: Path, pg_url: str, read_url: str) -> Config:
    return make_config(tmp_path / "data", pg_url, database_read_url=read_url)


async def test_api_reads_come_from_the_standby_until_it_lags_past_the_limit(
    tmp_path: Path, pg_url: str, read_url: str, standby: PostgresCluster
) -> None:
    config = _config(tmp_path, pg_url, read_url)
    assert config.read_max_lag_ms == LIMIT_MS
    token = await admin_token(config)
    await provision(config, project="shop", agent="early")
    with trio.fail_after(120):
        async with running_brain(config) as brain:
            api = Api(brain.addresses.http, token)
            http = brain.addresses.http
            await wait_until(lambda: _caught_up(http))
            documented = documented_metrics()
            found = exposed((await http_request(http, "GET", "/metrics")).body.decode())
            for name, kind in REPLICA_METRICS.items():
                assert found.families[name].type == kind == documented[name].type, name
            assert "early" in await api.agent_names()
            assert (await _metrics(http))["z4j_read_replica_reads_total"][()] > 0
            assert "degraded" not in await api.ready()

            await trio.to_thread.run_sync(_pause, read_url)
            try:
                before = await _metrics(http)
                # Writes and the hot path work while the standby is paused:
                # the brain never writes to it (it would refuse: read-only).
                late = await api.post("/agents", {"project": "shop", "name": "late"})
                client = await z4j.ingest.open_trio(*brain.ingest)
                async with client:
                    assert await client.send_many([[{"t": "log", "marker": "late-event"}]]) == [
                        True
                    ]
                await wait_until(
                    lambda: any(
                        e["body"].get("marker") == "late-event" for e in read_events(config)
                    )
                )
                # A read that must see the caller's own write: the primary.
                assert (await api.get(f"/agents/{late['agent']['id']}"))["name"] == "late"
                # Lists and searches: the standby, which has not replayed them.
                assert "late" not in await api.agent_names()
                assert "late-event" not in await api.event_markers()
                after = await _metrics(http)
                assert _fallbacks(after) == _fallbacks(before), "a read went to the primary"
                served = after["z4j_read_replica_reads_total"][()]
                assert served > before["z4j_read_replica_reads_total"][()]

                # Past the limit, reads fall back to the primary, and say why.
                async def over_limit() -> bool:
                    s = await _metrics(http)
                    lag = _one(s, "z4j_read_replica_lag_seconds")
                    return lag is not None and lag * 1000 > LIMIT_MS

                await wait_until(over_limit, timeout=60)
                first_lag = _one(await _metrics(http), "z4j_read_replica_lag_seconds")
                assert "late" in await api.agent_names()
                assert "late-event" in await api.event_markers()
                ready = await api.ready()
                assert ready["status"] == "ready"
                note = ready["degraded"]["read_replica"]
                assert "behind" in note and "Z4J_READ_MAX_LAG_MS" in note, note
                s = await _metrics(http)
                assert _one(s, "z4j_read_replica_serving") == 0
                assert _fallbacks(s)["lag"] > _fallbacks(after)["lag"]
                assert s["z4j_read_replica_reads_total"][()] == served

                async def lag_grows() -> bool:
                    lag = _one(await _metrics(http), "z4j_read_replica_lag_seconds")
                    return lag is not None and first_lag is not None and lag > first_lag

                await wait_until(lag_grows)
            finally:
                await trio.to_thread.run_sync(_sql, read_url, "SELECT pg_wal_replay_resume()")

            # Replayed: the standby serves again, rows included.
            await wait_until(lambda: _caught_up(http), timeout=30)
            before = await _metrics(http)
            assert "late" in await api.agent_names()
            assert "late-event" in await api.event_markers()
            after = await _metrics(http)
            assert _fallbacks(after) == _fallbacks(before)
            assert (
                after["z4j_read_replica_reads_total"][()]
                > before["z4j_read_replica_reads_total"][()]
            )
            assert "degraded" not in await api.ready()

            # Only the read pool and the probe ever connected to the standby.
            names = await trio.to_thread.run_sync(
                _sql,
                read_url,
                "SELECT DISTINCT application_name FROM pg_stat_activity"
                " WHERE starts_with(application_name, 'z4j')",
            )
            prefix = f"z4j-{brain.addresses.instance_id.hex[:8]}"
            assert {n for (n,) in names} == {f"{prefix}-read", f"{prefix}-probe"}


async def test_only_marked_reads_in_a_reading_context_use_the_standby(
    pg_url: str, read_url: str
) -> None:
    """The two conditions, each needed: the store method allows a stale
    read (`_read`), and the caller allows it (`replica_reads`: the API's GETs)."""
    store = PostgresStore.from_url(
        pg_url, pool_size=2, statement_timeout_ms=10_000, read_url=read_url, read_max_lag_seconds=60
    )
    replica = store.read_replica
    assert replica is not None
    with trio.fail_after(60):
        try:
            await store.migrate()
            project = await store.create_project("p")

            async def replicated() -> bool:
                await replica.probe()
                served = replica.statistics().reads
                with replica_reads():
                    found = project in await store.list_projects()
                return found and replica.statistics().reads > served

            await wait_until(replicated)
            await trio.to_thread.run_sync(_pause, read_url)
            try:
                agent = await store.create_agent(project.id, "fresh", b"h" * 32)
                before = replica.statistics()
                with replica_reads():
                    assert "fresh" not in {a.name for a in await store.list_agents()}
                    assert await store.find_agent(str(agent.id)) == agent  # never stale
                assert "fresh" in {a.name for a in await store.list_agents()}
                with replica_reads(False):  # a write request
                    assert "fresh" in {a.name for a in await store.list_agents()}
                after = replica.statistics()
                assert (after.reads, after.fallbacks) == (before.reads + 1, before.fallbacks)
            finally:
                await trio.to_thread.run_sync(_sql, read_url, "SELECT pg_wal_replay_resume()")
        finally:
            await store.aclose()


class _Freeze:
    def __init__(self, cluster: PostgresCluster) -> None:
        self.cluster = cluster
        self.pids: list[int] = []

    def __call__(self, backends_of: str | None = None) -> None:
        self.pids += self.cluster.freeze(backends_of=backends_of)

    def thaw(self) -> None:
        self.cluster.thaw(self.pids)
        self.pids = []


def test_doctor_checks_the_read_replica(pg_url: str, read_url: str, tmp_path: Path) -> None:
    """`z4j doctor` says whether Z4J_DATABASE_READ_URL is a standby that answers:
    ok for the standby, fail for the primary named by mistake or a dead URL."""

    def replica_check(url: str) -> tuple[int, tuple[str, str]]:
        env = {
            "Z4J_DATA_DIR": str(tmp_path / "data"),
            "Z4J_DATABASE_URL": pg_url,
            "Z4J_DATABASE_READ_URL": url,
        }
        result = run_z4j("doctor", "--json", env=env)
        assert "Traceback" not in result.stderr, result.stderr
        checks = {
            c["check"]: (c["status"], c["detail"]) for c in orjson.loads(result.stdout)["checks"]
        }
        return result.returncode, checks["replica"]

    assert replica_check(read_url)[1][0] == "ok"
    status, (verdict, detail) = replica_check(pg_url)
    assert status == 1 and verdict == "fail" and "not a standby" in detail, detail
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    dead = f"postgresql://z4j@127.0.0.1:{port}/z4j"
    status, (verdict, detail) = replica_check(dead)
    assert status == 1 and verdict == "fail" and detail.startswith("unreachable"), detail


async def test_a_silent_stopped_or_promoted_standby_degrades_reads_to_the_primary(
    tmp_path: Path, pg_url: str, read_url: str, standby: PostgresCluster
) -> None:
    config = _config(tmp_path, pg_url, read_url)
    token = await admin_token(config)
    await provision(config, project="shop", agent="early")
    freeze = _Freeze(standby)
    with trio.fail_after(150):
        async with running_brain(config) as brain:
            api = Api(brain.addresses.http, token)
            http = brain.addresses.http
            prefix = f"z4j-{brain.addresses.instance_id.hex[:8]}"
            await wait_until(lambda: _serving(http))
            assert "early" in await api.agent_names()  # the read pool's connection

            # 1. The standby goes silent in mid-read: the read goes to the
            # primary once the probe gives up on it, not when TCP does.
            before = await _metrics(http)
            answered: list[set[str]] = []
            try:
                await trio.to_thread.run_sync(freeze, f"{prefix}-read")
                async with trio.open_nursery() as nursery:

                    async def read() -> None:
                        answered.append(await api.agent_names())

                    nursery.start_soon(read)
                    await trio.sleep(0.5)
                    assert not answered, "the read was not waiting on the standby"
                    await trio.to_thread.run_sync(freeze)  # the whole server now
            finally:
                await trio.to_thread.run_sync(freeze.thaw)
            assert answered == [{"early"}]
            after = await _metrics(http)
            assert _fallbacks(after)["unreachable"] > _fallbacks(before)["unreachable"]
            assert (
                after["z4j_read_replica_reads_total"][()]
                == before["z4j_read_replica_reads_total"][()]
            )
            await wait_until(lambda: _serving(http), timeout=30)

            # 2. Stopped: reads go on, on the primary, from the first one.
            before = await _metrics(http)
            await trio.to_thread.run_sync(standby.stop)
            for _ in range(3):
                assert "early" in await api.agent_names()

            async def unreachable() -> bool:
                return not await _serving(http)

            await wait_until(unreachable, timeout=30)
            assert "early" in await api.agent_names()
            await api.post("/agents", {"project": "shop", "name": "while-down"})
            assert "while-down" in await api.agent_names()
            ready = await api.ready()
            assert ready["status"] == "ready"
            assert "unreachable" in ready["degraded"]["read_replica"]
            s = await _metrics(http)
            assert _fallbacks(s)["unreachable"] > _fallbacks(before)["unreachable"]
            assert _one(s, "z4j_read_replica_lag_seconds") is None  # unknown, not 0

            # 3. Back: the standby serves again.
            await trio.to_thread.run_sync(standby.start)
            await wait_until(lambda: _serving(http), timeout=30)
            before = await _metrics(http)
            await wait_until(lambda: _has_agent(api, "while-down"), timeout=30)
            after = await _metrics(http)
            assert (
                after["z4j_read_replica_reads_total"][()]
                > before["z4j_read_replica_reads_total"][()]
            )
            assert "degraded" not in await api.ready()

            # 4. Promoted: it has left the primary's timeline; reads go back.
            await trio.to_thread.run_sync(standby.promote)
            await wait_until(unreachable, timeout=30)
            await api.post("/agents", {"project": "shop", "name": "after-promotion"})
            assert "after-promotion" in await api.agent_names()
            note = (await api.ready())["degraded"]["read_replica"]
            assert "not a standby" in note, note
            assert _fallbacks(await _metrics(http))["promoted"] > 0


async def _has_agent(api: Api, name: str) -> bool:
    return name in await api.agent_names()


# -- without a standby ---------------------------------------------------------------


def test_the_read_url_is_refused_without_the_postgres_store() -> None:
    with pytest.raises(ConfigError, match=r"Z4J_DATABASE_READ_URL is set without Z4J_DATABASE_URL"):
        load_config(env={"Z4J_DATABASE_READ_URL": "postgresql://standby/z4j"})
    config = load_config(
        env={
            "Z4J_DATABASE_URL": "postgresql://primary/z4j",
            "Z4J_DATABASE_READ_URL": "postgresql://standby/z4j",
        }
    )
    assert config.database_read_url == "postgresql://standby/z4j"
    # Empty means unset, as for every optional setting: no refusal then.
    assert load_config(env={"Z4J_DATABASE_READ_URL": ""}).database_read_url is None


async def test_a_standby_that_never_answers_costs_the_api_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    """A read URL whose server accepts connections and says nothing: the
    probe gives up within its deadline, and reads never wait on it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        config = make_config(
            tmp_path / "data",
            pg_url,
            database_read_url=f"postgresql://z4j@127.0.0.1:{port}/z4j",
        )
        token = await admin_token(config)
        await provision(config, project="shop", agent="early")
        with trio.fail_after(60):
            async with running_brain(config) as brain:
                api = Api(brain.addresses.http, token)
                assert "early" in await api.agent_names()

                async def noted() -> bool:
                    note = (await api.ready()).get("degraded", {}).get("read_replica", "")
                    return "unreachable" in note

                await wait_until(noted, timeout=PROBE_TIMEOUT_SECONDS + 20)
                s = await _metrics(brain.addresses.http)
                assert _one(s, "z4j_read_replica_serving") == 0
                assert _fallbacks(s)["unchecked"] + _fallbacks(s)["unreachable"] > 0
                assert s["z4j_read_replica_reads_total"][()] == 0


class _Recording:
    """The real store, recording each call with whether the caller allowed a
    replica read at that moment (`replica_reads_allowed`)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.calls: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, replica_reads_allowed()))
            return await attr(*args, **kwargs)

        return call


async def _call(api: Any, method: str, path: str, token: str, body: Any = None) -> int:
    payload = b"" if body is None else orjson.dumps(body)
    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "scheme": "http",
        "query_string": query.encode(),
        "client": ("192.0.2.1", 50000),
        "headers": [
            (b"host", b"x"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {token}".encode()),
        ],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "http.request", "body": payload, "more_body": False}
        await trio.sleep_forever()
        raise AssertionError  # unreachable

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await api(scope, receive, send)
    return int(sent[0]["status"])


async def test_get_requests_allow_replica_reads_and_write_requests_do_not(
    tmp_path: Path,
) -> None:
    """Per request, in the API: a GET's store calls (an export's read-ahead
    task included) may read the replica; a write request's never do, even
    through a list method (the new agent's workers, read inside POST /agents),
    nor those of the GET that operates (it sends the agent a command once its
    workers are seen to offer what it asks)."""
    config = make_config(tmp_path / "data")
    token = await admin_token(config)
    agent_id = (await provision(config, project="shop", agent="early"))[2]
    master = keys.master_secret(config)
    async with open_store(config) as store:
        recording = _Recording(store)
        wrapped = cast(Store, recording)
        api = ApiApp(
            wrapped,
            cast(Commands, None),
            Auth(wrapped, master),
            provisioning=ProvisioningRoutes(wrapped, master),
        )
        with trio.fail_after(30):
            assert await _call(api, "GET", "/api/v1/agents", token) == 200
            got, recording.calls = recording.calls, []
            body = {"project": "shop", "name": "n"}
            assert await _call(api, "POST", "/api/v1/agents", token, body) == 201
            posted, recording.calls = recording.calls, []
            assert await _call(api, "GET", "/api/v1/events/export", token) == 200
            exported, recording.calls = recording.calls, []
            path = f"/api/v1/queues/celery/q/dead-letters?agent_id={agent_id}"
            assert await _call(api, "GET", path, token) == 409  # no worker offers it
            operated = recording.calls
    assert ("list_agents", True) in got and all(allowed for _, allowed in got)
    assert ("list_workers", False) in posted and not any(allowed for _, allowed in posted)
    assert ("export_events", True) in exported and all(allowed for _, allowed in exported)
    assert ("list_workers", False) in operated and not any(allowed for _, allowed in operated)
    assert not replica_reads_allowed()  # and nothing leaked out of the requests


# -- the rule ------------------------------------------------------------------------


def _sample(**kw: Any) -> Sample:
    values: dict[str, Any] = {
        "in_recovery": True,
        "receiving": True,
        "caught_up": True,
        "since_replay": 0.2,
    }
    values.update(kw)
    return Sample(**values)


def test_an_idle_primary_is_no_lag() -> None:
    # Nothing left to replay while streaming: 0, however old the last commit.
    assert lag_of(_sample(since_replay=3600.0)) == 0.0
    assert lag_of(_sample(since_replay=None)) == 0.0
    # WAL received and not replayed: the age of the last replayed commit.
    assert lag_of(_sample(caught_up=False, since_replay=7.5)) == 7.5
    # No WAL receiver: it cannot know what it misses.
    assert lag_of(_sample(receiving=False, since_replay=7.5)) == 7.5
    assert lag_of(_sample(receiving=False, since_replay=None)) is None
    assert lag_of(_sample(caught_up=False, since_replay=-0.3)) == 0.0  # clock skew


def test_the_rule_sends_reads_to_the_primary_and_says_why() -> None:
    ok = judge(None, _sample(), age=0.5, max_lag_seconds=5.0)
    assert ok.fallback is None and ok.note is None
    # The measure ages: a lag of 4 s measured 1.5 s ago may be 5.5 s now.
    late = judge(None, _sample(caught_up=False, since_replay=4.0), age=1.5, max_lag_seconds=5.0)
    assert late.fallback == "lag" and "5.5 s behind" in (late.note or "")
    assert judge(None, _sample(), age=6.0, max_lag_seconds=5.0).fallback == "lag"
    unknown = judge(None, _sample(receiving=False, since_replay=None), age=0, max_lag_seconds=5)
    assert unknown.fallback == "lag" and "unknown" in (unknown.note or "")
    promoted = judge(None, _sample(in_recovery=False), age=0, max_lag_seconds=5)
    assert promoted.fallback == "promoted"
    assert judge("unreachable", None, age=0, max_lag_seconds=5).fallback == "unreachable"
    assert judge("unchecked", None, age=0, max_lag_seconds=5).fallback == "unchecked"
