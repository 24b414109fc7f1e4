"""End to end over real sockets: TCP ingest → buffer → drain → store.

Every test here runs against both stores: the embedded SQLite default and a
real Postgres server.
"""

from __future__ import annotations

import gzip
import os
import sqlite3
from collections import Counter
from pathlib import Path

import attrs
import orjson
import pytest
import trio

import z4j.ingest
from z4j.brain import serve_brain
from z4j.brain.ingest import IngestServer, TokenThrottle, source_of
from z4j.buffer import Buffer
from z4j.config import Config, ConfigError, check_bind_is_safe
from z4j.protocol import ingest as proto
from z4j.protocol.ingest import ERROR, OK, encode_frame, token_hash
from z4j.stats import BrainStats
from z4j.testing.brain import http_get, make_config, read_events, running_brain, wait_until
from z4j.testing.store import query


def records(batch: int, count: int, kind: str = "log") -> list[dict[str, object]]:
    return [{"t": kind, "batch": batch, "i": i, "msg": f"record {batch}.{i}"} for i in range(count)]


async def exchange(
    address: tuple[str, int], data: bytes, replies: int = 1, *, closes: bool = False
) -> tuple[bytes, bool]:
    """Send raw bytes, read ``replies`` replies; also report whether the server closed.

    A close the caller expects is waited for (however slow the machine); one
    it does not expect is looked for briefly, which a right server passes.
    """
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(data)
        got = b""
        closed = False
        with trio.move_on_after(20):
            while got.count(b":") < replies:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    closed = True
                    break
                got += chunk
        if not closed:
            with trio.move_on_after(20 if closes else 0.3):
                closed = await stream.receive_some(4096) == b""
        return got, closed


async def drained(brain_config: Config, expected: int) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []

    async def enough() -> bool:
        nonlocal events
        events = await trio.to_thread.run_sync(read_events, brain_config)
        return len(events) >= expected

    await wait_until(enough, timeout=30)
    return events


async def test_payloads_land_as_one_event_per_record(config: Config) -> None:
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                for batch in range(10):
                    await client.send(records(batch, 5, kind=["log", "job", "request"][batch % 3]))
                results = await client.send_many([records(100 + b, 3) for b in range(20)])
                assert results == [True] * 20
                await client.ping()
            events = await drained(config, 10 * 5 + 20 * 3)

    assert len(events) == 110
    assert {e["source"] for e in events} == {"tcp"}
    assert len({e["key"] for e in events}) == 110
    bodies = Counter((e["body"]["batch"], e["body"]["i"]) for e in events)  # type: ignore[index]
    assert max(bodies.values()) == 1
    by_batch = {(e["body"]["batch"], e["body"]["i"]): e for e in events}  # type: ignore[index]
    sample = by_batch[(4, 2)]
    assert sample["kind"] == "job"
    assert sample["body"] == {"t": "job", "batch": 4, "i": 2, "msg": "record 4.2"}
    assert by_batch[(119, 0)]["kind"] == "log"


async def test_gzip_payload_and_token(tmp_path: Path, database_url: str | None) -> None:
    config = make_config(tmp_path / "data", database_url, ingest_token="s3cret")
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            client = await z4j.ingest.open_trio(*brain.ingest, token="s3cret", compress=True)
            async with client:
                await client.send(records(1, 5))
            # The same payload with a wrong token is refused, and the
            # connection closed: one guess per connection.
            bad = encode_frame(orjson.dumps(records(2, 1)), token="wrong")
            reply, closed = await exchange(brain.ingest, bad, closes=True)
            assert reply == ERROR and closed
            assert brain.stats.ingest_rejected["bad_token"] == 1
            events = await drained(config, 5)
    assert sorted(e["body"]["i"] for e in events) == [0, 1, 2, 3, 4]  # type: ignore[index]


def _frame(body: bytes) -> bytes:
    return b"%d:%s" % (len(body), body)


GOOD = orjson.dumps([{"t": "log", "ok": True}])
TH = token_hash("x")

# (name, bytes sent, reason counted, server closes the connection)
MALFORMED = [
    ("length not a number", b"abc:v1:0000000:[]", "bad_framing", True),
    ("length with leading zero", b"07:v1:x:[]", "bad_framing", True),
    ("length longer than any allowed frame", b"123456789012345678", "too_large", True),
    ("over the size limit", b"99999999:v1:0000000:", "too_large", True),
    ("wrong version", _frame(b"v2:0000000:" + GOOD), "bad_version", False),
    ("no token hash field", _frame(b"v1:" + b"0" * 80), "bad_framing", False),
    ("bad JSON", _frame(b"v1:0000000:[{"), "bad_json", False),
    ("not an array", _frame(b'v1:0000000:{"t": "log"}'), "not_array", False),
    ("record without t", _frame(b'v1:0000000:[{"x": 1}]'), "bad_record", False),
    ("t not a string", _frame(b'v1:0000000:[{"t": 5}]'), "bad_record", False),
    ("record not an object", _frame(b"v1:0000000:[1, 2]"), "bad_record", False),
    ("NUL in a string", _frame(b'v1:0000000:[{"t": "log", "m": "a\\u0000b"}]'), "bad_json", False),
    (
        "nested deeper than can be stored",
        _frame(b'v1:0000000:[{"t": "log", "a": ' + b"[" * 300 + b"]" * 300 + b"}]"),
        "bad_json",
        False,
    ),
    ("corrupt gzip", _frame(b"v1:0000000:\x1f\x8b\x08\x00garbage"), "bad_gzip", False),
    (
        "gzip inflating past the cap",
        _frame(b"v1:0000000:" + gzip.compress(b"[" + b" " * 200_000 + b"]")),
        "inflate_too_large",
        False,
    ),
]


@pytest.mark.parametrize(
    ("name", "data", "reason", "closes"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
async def test_malformed_frames_get_error_and_a_counted_reason(
    tmp_path: Path, name: str, data: bytes, reason: str, closes: bool
) -> None:
    config = make_config(
        tmp_path / "data", ingest_max_frame_bytes=1_000_000, ingest_max_inflated_bytes=100_000
    )
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            # A well-behaved client holds a connection open throughout.
            good = await z4j.ingest.open_trio(*brain.ingest)
            async with good:
                await good.send(records(1, 1))
                reply, closed = await exchange(brain.ingest, data, closes=closes)
                assert reply == ERROR
                assert closed is closes
                assert brain.stats.ingest_rejected == Counter({reason: 1})
                if not closes:
                    # The same connection goes on after a content error.
                    reply, _ = await exchange(brain.ingest, data + _frame(b"v1:0000000:" + GOOD), 2)
                    assert reply == ERROR + OK
                await good.send(records(2, 1))
            await drained(config, 2 if closes else 3)


async def test_truncated_frame_is_counted(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            stream = await trio.open_tcp_stream(*brain.ingest)
            await stream.send_all(b"100:v1:0000000:[")
            await stream.send_eof()
            assert await stream.receive_some(100) == ERROR
            await stream.aclose()
            await wait_until(lambda: brain.stats.ingest_rejected["truncated"] == 1)


async def test_full_buffer_answers_error_and_keeps_what_it_has(
    tmp_path: Path, store_kind: str, request: pytest.FixtureRequest
) -> None:
    """The store is unavailable at first, so nothing drains and the buffer fills."""
    data = tmp_path / "data"
    if store_kind == "postgres":
        # Nothing listens on port 1: every connection attempt is refused.
        unreachable = "postgresql://postgres@127.0.0.1:1/none?connect_timeout=1"
        config = make_config(data, unreachable, buffer_max_rows=5)
        lock = None
    else:
        # Another process-like holder keeps the store file write-locked.
        config = make_config(data, None, buffer_max_rows=5)
        config.sqlite_store_path.parent.mkdir(parents=True)
        lock = sqlite3.connect(config.sqlite_store_path, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                assert await client.send_many([records(b, 2) for b in range(5)]) == [True] * 5
                assert await client.send_many([records(9, 1)]) == [False]
                await client.ping()  # a full buffer still answers pings
            assert brain.stats.ingest_rejected["buffer_full"] == 1
            assert brain.buffer_depth() == 5
            reply = await http_get(brain.addresses.http, "/health/ready")
            assert reply[0] == 503 and "buffer full" in reply[1]
        # Same buffer file, now with a store that answers: all 10 records land.
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
        else:
            config = attrs.evolve(config, database_url=request.getfixturevalue("pg_url"))
        async with running_brain(config):
            events = await drained(config, 10)
    assert sorted((e["body"]["batch"], e["body"]["i"]) for e in events) == [  # type: ignore[index]
        (b, i) for b in range(5) for i in range(2)
    ]


async def test_health_endpoints(config: Config) -> None:
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            assert await http_get(brain.addresses.http, "/health/live") == (
                200,
                '{"status":"live"}',
            )
            await wait_until(lambda: brain.stats is not None)

            async def ready() -> bool:
                return (await http_get(brain.addresses.http, "/health/ready"))[0] == 200

            await wait_until(ready)
            status, body = await http_get(brain.addresses.http, "/health/ready")
            checks = {"buffer": "ok", "store": "ok"}
            if config.database_url:
                checks["pool"] = checks["listener"] = "ok"
            assert orjson.loads(body) == {"status": "ready", "checks": checks}
            status, body = await http_get(brain.addresses.http, "/nope")
            assert status == 404 and orjson.loads(body)["error"] == "not_found"


async def test_instance_heartbeat_row(config: Config) -> None:
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                await client.send(records(1, 5))
            await drained(config, 5)

            def row() -> tuple[object, ...] | None:
                return _instance_row(config, brain.addresses.instance_id)

            async def beat_with_drain() -> bool:
                r = await trio.to_thread.run_sync(row)
                return r is not None and r[2] == 0  # buffer drained and reported

            await wait_until(beat_with_drain)
            found = await trio.to_thread.run_sync(row)
    assert found is not None
    pid, name, depth = found
    assert pid == os.getpid()
    assert name
    assert depth == 0


def _instance_row(config: Config, instance_id: object) -> tuple[object, ...] | None:
    rows = query(
        config, "SELECT pid, name, buffer_depth FROM instances WHERE id = ?", str(instance_id)
    )
    return rows[0] if rows else None


async def test_pipelining_any_number_of_frames_does_not_deadlock(tmp_path: Path) -> None:
    """Replies nobody reads would block the server; the clients read per window."""
    config = make_config(tmp_path / "data")
    with trio.fail_after(60):
        async with running_brain(config) as brain:

            def blocking() -> list[bool]:
                with z4j.ingest.connect(*brain.ingest, timeout=30) as client:
                    return client.send_many([b"PING"] * 100_000)

            assert await trio.to_thread.run_sync(blocking) == [True] * 100_000
            async with await z4j.ingest.open_trio(*brain.ingest) as client:
                assert await client.send_many([b"PING"] * 100_000) == [True] * 100_000


async def test_a_frame_trickling_in_too_slowly_is_refused(tmp_path: Path) -> None:
    config = make_config(
        tmp_path / "data", ingest_frame_timeout_seconds=0.5, ingest_idle_timeout_seconds=5
    )
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            stream = await trio.open_tcp_stream(*brain.ingest)
            async with stream:
                # One byte every 0.2 s: never idle for long, never done.
                reply = b""
                for byte in b"50:v1:0000000:[":
                    try:
                        await stream.send_all(bytes([byte]))
                    except trio.BrokenResourceError:
                        break
                    with trio.move_on_after(0.2):
                        reply += await stream.receive_some(100)
                    if reply:
                        break
                assert reply == ERROR
                assert await stream.receive_some(100) == b""  # and closed
            assert brain.stats.ingest_rejected["too_slow"] == 1


async def test_connections_over_the_cap_are_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", ingest_max_connections=2)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            held = [await trio.open_tcp_stream(*brain.ingest) for _ in range(2)]
            await wait_until(lambda: brain.stats.ingest_connections_open == 2)
            extra = await trio.open_tcp_stream(*brain.ingest)
            assert await extra.receive_some(100) == ERROR
            assert await extra.receive_some(100) == b""
            await extra.aclose()
            assert brain.stats.ingest_rejected["too_many_connections"] == 1
            for stream in held:  # the held ones still work
                await stream.send_all(encode_frame(b"PING"))
                assert await stream.receive_some(100) == OK
                await stream.aclose()


# -- guard-rails: token, throttle, budget, heavy frames -----------------------------------


def test_ingest_beyond_loopback_needs_a_token_or_the_override(tmp_path: Path) -> None:
    for bind in ("0.0.0.0:2407", "[::]:2407", "10.1.2.3:2407", "ingest.example.com:2407"):
        with pytest.raises(ConfigError) as info:
            check_bind_is_safe(make_config(tmp_path, ingest_bind=bind))
        assert "Z4J_INGEST_TOKEN" in str(info.value)
        assert "Z4J_INGEST_ALLOW_NO_TOKEN=true" in str(info.value)
        check_bind_is_safe(make_config(tmp_path, ingest_bind=bind, ingest_token="t"))
        check_bind_is_safe(make_config(tmp_path, ingest_bind=bind, ingest_allow_no_token=True))
    for bind in ("127.0.0.1:0", "[::1]:0", "localhost:0"):
        check_bind_is_safe(make_config(tmp_path, ingest_bind=bind))


async def test_a_brain_will_not_start_ingest_beyond_loopback_without_a_token(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path / "data", ingest_bind="0.0.0.0:0")
    with trio.fail_after(30), pytest.raises(ConfigError, match="Z4J_INGEST_TOKEN"):
        await serve_brain(config)  # refuses before it binds or opens anything


async def one_reply(address: tuple[str, int], data: bytes) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection: the first reply, and whether it then closed."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        with trio.move_on_after(5):
            await stream.send_all(data)
        reply = await stream.receive_some(100)
        try:
            closed = await stream.receive_some(100) == b"" if reply.endswith(ERROR) else False
        except trio.BrokenResourceError:
            closed = True  # closed with our bytes unread: a reset
        return reply, closed


async def test_wrong_tokens_from_one_source_get_its_connections_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", ingest_token="s3cret")
    right = encode_frame(b"PING", token="s3cret")
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            for _ in range(TokenThrottle.STRIKES - 1):
                assert await one_reply(brain.ingest, encode_frame(b"PING", token="x")) == (
                    ERROR,
                    True,
                )
            assert await one_reply(brain.ingest, right) == (OK, False)  # not blocked yet
            assert await one_reply(brain.ingest, encode_frame(b"PING", token="x")) == (ERROR, True)
            # Now even the right token is refused from this source, at once.
            assert await one_reply(brain.ingest, right) == (ERROR, True)
            assert brain.stats.ingest_rejected["bad_token"] == TokenThrottle.STRIKES
            assert brain.stats.ingest_rejected["throttled"] == 1


def test_token_throttle_forgets_after_its_window_and_block_and_stays_bounded() -> None:
    throttle = TokenThrottle()
    for i in range(TokenThrottle.STRIKES - 1):
        throttle.strike("a", float(i))
    # Strikes spread wider than the window never add up to a block.
    throttle.strike("a", TokenThrottle.WINDOW_SECONDS + 10)
    assert not throttle.blocked("a", TokenThrottle.WINDOW_SECONDS + 10)
    now = 1000.0
    for _ in range(TokenThrottle.STRIKES):
        throttle.strike("b", now)
    assert throttle.blocked("b", now + TokenThrottle.BLOCK_SECONDS - 1)
    assert not throttle.blocked("b", now + TokenThrottle.BLOCK_SECONDS)
    for i in range(TokenThrottle.MAX_SOURCES * 2):
        throttle.strike(f"10.0.{i // 256}.{i % 256}", now)
    assert len(throttle) == TokenThrottle.MAX_SOURCES


def test_throttle_sources_group_ipv6_by_64() -> None:
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff:1") == "2001:db8::/64"
    assert source_of("2001:db8:0:1::1") != source_of("2001:db8::1")
    assert source_of("::ffff:10.0.0.1") == "10.0.0.1" == source_of("10.0.0.1")


async def test_strict_token_takes_our_clients_full_hash_only(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", ingest_token="s3cret", ingest_strict_token=True)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            client = await z4j.ingest.open_trio(*brain.ingest, token="s3cret")
            async with client:
                await client.send(records(1, 2))
                await client.ping()
            short = encode_frame(b"PING", token="s3cret", short_hash=True)
            assert await one_reply(brain.ingest, short) == (ERROR, True)
            assert brain.stats.ingest_rejected["bad_token"] == 1


async def test_too_many_records_get_5_error_and_the_connection_goes_on(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", ingest_max_records_per_payload=10)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                assert await client.send_many([records(1, 11), records(2, 10)]) == [False, True]
            assert brain.stats.ingest_rejected["too_many_records"] == 1


async def test_heavy_frames_are_checked_off_the_loop_and_small_ones_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    seen: list[tuple[bool, bool]] = []  # (heavy, on the loop's thread)
    original = proto.IngestConnection.next_event

    def spy(self: proto.IngestConnection) -> object:
        seen.append((self.next_is_heavy(), threading.current_thread() is loop_thread))
        return original(self)

    loop_thread = threading.current_thread()
    monkeypatch.setattr(proto.IngestConnection, "next_event", spy)
    config = make_config(tmp_path / "data")
    big = orjson.dumps([{"t": "x", "pad": "a" * proto.HEAVY_FRAME_BYTES}])
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            client = await z4j.ingest.open_trio(*brain.ingest)
            async with client:
                await client.send(records(1, 3))
                await client.send(big)
                await client.send(gzip.compress(orjson.dumps(records(2, 3))))
    heavy_calls = [on_loop for heavy, on_loop in seen if heavy]
    light_calls = [on_loop for heavy, on_loop in seen if not heavy]
    assert len(heavy_calls) == 2 and not any(heavy_calls)
    assert light_calls and all(light_calls)


async def test_partial_frames_are_held_within_the_budget(tmp_path: Path) -> None:
    # 4 MiB budget, 1/8 kept for small frames: 3 partial 1 MiB frames fit, the
    # 4th waits BUDGET_PATIENCE_SECONDS, then is refused; a small frame still fits.
    mib = 1024 * 1024
    config = make_config(tmp_path / "data", ingest_max_buffered_bytes=4 * mib)
    head = b"%d:v1:0000000:[" % mib
    stats = BrainStats()
    buffer = await Buffer.open(tmp_path / "buffer.sqlite", max_rows=10)
    server = IngestServer(config, buffer, stats)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve)
            held = []
            for _ in range(3):
                stream = await trio.open_tcp_stream(*address)
                await stream.send_all(head + b" " * 1000)
                held.append(stream)
            await wait_until(lambda: server.statistics().buffered_bytes >= 3 * mib)
            assert await one_reply(address, head + b" " * 1000) == (ERROR, True)
            assert stats.ingest_rejected["over_budget"] == 1
            assert await one_reply(address, encode_frame(b"PING")) == (OK, False)
            stat = server.statistics()
            assert stat.buffered_peak <= stat.buffered_limit == 4 * mib
            # A frame that completes gives its room back.
            await held[0].send_all(b" " * (mib - len(b"v1:0000000:[") - 1000 - 1) + b"]")
            assert await held[0].receive_some(100) == OK
            await wait_until(lambda: server.statistics().buffered_bytes < 3 * mib)
            for stream in held:
                await stream.aclose()
            await wait_until(lambda: server.statistics().buffered_bytes == 0)
            nursery.cancel_scope.cancel()
    await buffer.aclose()
