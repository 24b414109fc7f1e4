"""Native TLS without a proxy: the ingest port, and a real z4j-bare agent over wss://.

With Z4J_TLS_CERT_FILE/Z4J_TLS_KEY_FILE the HTTP port serves HTTPS/WSS
(tests/test_tls.py) and the ingest port speaks TLS. Certificates come from
trustme (a throwaway CA per test); every client verifies them.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import z4j.ingest
from z4j.testing.agents import provision
from z4j.testing.brain import make_config, read_events, run_z4j, running_brain, wait_until

BARE_AGENT = Path(__file__).parent / "agents" / "bare_agent.py"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, Any]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return {"tls_cert_file": cert_file, "tls_key_file": key_file}


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def tcp_events(config: Any) -> list[dict[str, Any]]:
    return [e for e in read_events(config) if e["source"] == "tcp"]


async def test_ingest_over_tls_is_acknowledged_and_stored(
    tmp_path: Path, ca: trustme.CA, tls_files: dict[str, Any]
) -> None:
    config = make_config(tmp_path / "data", drain_linger_ms=0, **tls_files)
    context = client_context(ca)

    def blocking(port: int) -> None:
        with z4j.ingest.connect("127.0.0.1", port, ssl_context=context) as client:
            client.send([{"t": "log", "message": "blocking"}])
            assert (
                client.send_many([[{"t": "log", "message": f"many-{n}"}] for n in range(3)])
                == [True] * 3
            )

    with trio.fail_after(60):
        async with running_brain(config) as brain:
            host, port = brain.ingest
            await trio.to_thread.run_sync(blocking, port)
            async with await z4j.ingest.open_trio(host, port, ssl_context=context) as client:
                await client.send([{"t": "log", "message": "trio"}])
                await client.ping()
            await wait_until(lambda: len(tcp_events(config)) == 5)
            assert brain.stats.ingest_rejected == {}
    messages = sorted(e["body"]["message"] for e in tcp_events(config))
    assert messages == ["blocking", "many-0", "many-1", "many-2", "trio"]


async def test_a_plain_client_is_refused_cleanly_and_others_go_on(
    tmp_path: Path, ca: trustme.CA, tls_files: dict[str, Any]
) -> None:
    config = make_config(
        tmp_path / "data", drain_linger_ms=0, ingest_idle_timeout_seconds=1.0, **tls_files
    )
    context = client_context(ca)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            host, port = brain.ingest
            async with await z4j.ingest.open_trio(host, port, ssl_context=context) as held:
                await held.send([{"t": "log", "message": "before"}])
                # One peer says nothing at all: it holds only its own slot.
                silent = await trio.open_tcp_stream(host, port)
                # Another speaks plain NightOwl framing to the TLS port.

                def plain() -> type[BaseException]:
                    try:
                        # No retry: each attempt would be one more refusal.
                        with z4j.ingest.connect(host, port, timeout=30, retry_seconds=0) as client:
                            client.send([{"t": "log", "message": "in clear"}])
                    except (z4j.ingest.IngestConnectionError, ConnectionResetError) as exc:
                        return type(exc)
                    raise AssertionError("a plain frame was answered on the TLS port")

                assert await trio.to_thread.run_sync(plain) in (
                    z4j.ingest.IngestConnectionError,
                    ConnectionResetError,
                )
                await wait_until(lambda: brain.stats.ingest_rejected["tls_handshake"] == 1)
                # The open TLS connection, and a new one, are served meanwhile.
                await held.send([{"t": "log", "message": "during"}])
                async with await z4j.ingest.open_trio(host, port, ssl_context=context) as fresh:
                    await fresh.send([{"t": "log", "message": "fresh"}])
                async with silent:
                    # The silent peer is closed at the idle timeout, counted.
                    assert await silent.receive_some(100) == b""
                await wait_until(lambda: brain.stats.ingest_rejected["tls_handshake"] == 2)
                await held.send([{"t": "log", "message": "after"}])
            await wait_until(lambda: len(tcp_events(config)) == 4)
    assert sorted(e["body"]["message"] for e in tcp_events(config)) == [
        "after",
        "before",
        "during",
        "fresh",
    ]


async def test_ingest_tls_false_keeps_the_ingest_port_plain(
    tmp_path: Path, tls_files: dict[str, Any]
) -> None:
    config = make_config(tmp_path / "data", ingest_tls=False, **tls_files)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            async with await z4j.ingest.open_trio(*brain.ingest) as client:
                await client.send([{"t": "log", "message": "plain"}])


def start_bare_agent(
    url: str, token: str, secret: str, events: int, seconds: float, home: Path, ca_file: Path
) -> subprocess.Popen[bytes]:
    """The real z4j-bare agent in its own process, trusting the test CA
    through OpenSSL's SSL_CERT_FILE (it has no CA option of its own)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    env.update(
        {"Z4J_HOME": str(home), "NO_PROXY": "127.0.0.1,localhost", "SSL_CERT_FILE": str(ca_file)}
    )
    with open(home / "agent.log", "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, str(BARE_AGENT), url, token, secret, str(events), str(seconds)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


async def test_real_z4j_bare_agent_over_wss_lands_its_events(
    tmp_path: Path, ca: trustme.CA, tls_files: dict[str, Any]
) -> None:
    config = make_config(tmp_path / "data", **tls_files)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    token, secret, _ = await provision(config)
    with trio.fail_after(120):
        async with running_brain(config) as brain:
            host, port = brain.addresses.http
            # https://: z4j-bare turns it into wss://HOST/ws/agent.
            agent = start_bare_agent(
                f"https://{host}:{port}", token, secret, 5, 20, tmp_path / "agent", ca_file
            )
            try:

                def agent_events() -> list[dict[str, Any]]:
                    return [e for e in read_events(config) if e["source"] == "agent"]

                await wait_until(lambda: len(agent_events()) >= 5, timeout=90)
                await wait_until(lambda: brain.stats.agent_sessions_open == 1)
            finally:
                agent.terminate()
                await trio.to_thread.run_sync(agent.wait, 20)
    events = agent_events()
    assert sorted(e["body"]["data"]["n"] for e in events) == [0, 1, 2, 3, 4]
    assert brain.stats.agent_rejected == {}


async def test_z4j_send_over_tls_with_a_ca_file(
    tmp_path: Path, ca: trustme.CA, tls_files: dict[str, Any]
) -> None:
    config = make_config(tmp_path / "data", drain_linger_ms=0, **tls_files)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    records = '{"t": "log", "message": "over tls"}\n'
    with trio.fail_after(90):
        async with running_brain(config) as brain:
            ingest = "{}:{}".format(*brain.ingest)
            sent = await trio.to_thread.run_sync(
                lambda: run_z4j(
                    "send", "--ingest", ingest, "--ca-file", str(ca_file), env={}, stdin=records
                )
            )
            # The TLS port closes on a plain client: with retries it would say
            # so only after its 30 s budget.
            plain = await trio.to_thread.run_sync(
                lambda: run_z4j(
                    "send", "--ingest", ingest, "--retry-seconds", "0", env={}, stdin=records
                )
            )
            await wait_until(lambda: len(tcp_events(config)) == 1)
    assert sent.returncode == 0, sent.stderr
    assert "1 accepted (durable in the brain's buffer), 0 refused" in sent.stderr
    assert plain.returncode == 2  # the TLS port closed on a plain client
    assert plain.stderr.startswith(f"z4j send: {ingest}: ")
