"""The shipped nginx configuration, run: TLS in front of two replicas, a real z4j-bare agent.

nginx is Debian's package (``.ci/setup-nginx`` installs it; run here too
when it is missing). It runs ``deploy/nginx/z4j.conf`` itself: the test
replaces only what a site edits (the replicas' addresses, the ports, the
certificate and log paths) and includes it from a minimal top-level file
that keeps nginx's pid, logs and temporary files in the test's directory.
Certificates come from trustme. Two ``z4j brain`` processes share one
Postgres; a z4j-bare agent in its own process connects to
``https://127.0.0.1:PORT`` (wss:// through nginx), its events land once,
and a command minted on the replica that does *not* hold its socket is
forwarded (LISTEN/NOTIFY) and completed. The agent comes back twice and
lands on the same replica (the hash on its token); a dashboard socket with
a browser's Origin is accepted (nginx passes Host with its port);
/health/ready answers through the proxy and /metrics does not. With
Z4J_TRUSTED_PROXIES naming nginx, each browser is its own source (sign-in
throttle, audit) and its session cookie is Secure.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import trio
import trio_websocket
import trustme

from z4j.store.base import FINAL_COMMAND_STATES
from z4j.testing.agents import admin_token, provision
from z4j.testing.brain import BrainProcess, make_config, read_events, running_brain, wait_until
from z4j.testing.http import http_request

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "deploy" / "nginx" / "z4j.conf"
SETUP_SCRIPT = ROOT / ".ci" / "setup-nginx"
BARE_AGENT = Path(__file__).parent / "agents" / "bare_agent.py"
SECRET = "nginx-replicas-share-this-master-secret-0123"

pytestmark = pytest.mark.slow


def _nginx() -> str | None:
    for path in (os.environ.get("Z4J_NGINX"), "/usr/sbin/nginx", shutil.which("nginx")):
        if path and os.access(path, os.X_OK):
            probe = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
            if probe.returncode == 0 and "nginx/" in probe.stderr:
                return path
    return None


@pytest.fixture(scope="session")
def nginx_bin() -> str:
    path = _nginx()
    if path is None:
        setup = subprocess.run(
            ["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
        )
        path = _nginx()
        if path is None:
            why = (setup.stderr or setup.stdout).strip().splitlines()[-3:]
            pytest.fail(
                f"nginx is not installed and .ci/setup-nginx could not install it "
                f"(exit {setup.returncode}): {' / '.join(why) or 'no output'}"
            )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render(
    shipped: str, *, upstreams: list[str], http: int, https: int, tls: Path, logs: Path
) -> str:
    """The shipped file with this machine's values; each replaced line must be there."""
    replacements = [
        (r"server brain-1:7700 ", f"server {upstreams[0]} "),
        (r"server brain-2:7700 ", f"server {upstreams[1]} "),
        (r"listen 80;", f"listen 127.0.0.1:{http};"),
        (r"listen 443 ssl;", f"listen 127.0.0.1:{https} ssl;"),
        (r"/etc/nginx/tls/z4j.crt;", f"{tls / 'cert.pem'};"),
        (r"/etc/nginx/tls/z4j.key;", f"{tls / 'key.pem'};"),
        (r"/var/log/nginx/z4j.access.log", str(logs / "access.log")),
    ]
    text = shipped
    for old, new in replacements:
        assert old in text, f"deploy/nginx/z4j.conf no longer has {old!r}"
        text = text.replace(old, new)
    # IPv6 may be off on a CI machine; the IPv4 listeners carry the test.
    return re.sub(r"^\s*listen \[::\]:.*$", "", text, flags=re.MULTILINE)


@pytest.fixture
def nginx(nginx_bin: str, tmp_path: Path) -> Iterator[Any]:
    """A function that starts nginx on the shipped file; stopped (by pid) at the end."""
    prefix = tmp_path / "nginx"
    for sub in ("logs", "tmp", "tls"):
        (prefix / sub).mkdir(parents=True)
    started: list[subprocess.Popen[bytes]] = []

    def start(upstreams: list[str], ca: trustme.CA) -> tuple[int, int]:
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(prefix / "tls" / "cert.pem"))
        cert.private_key_pem.write_to_path(str(prefix / "tls" / "key.pem"))
        http, https = free_port(), free_port()
        site = render(
            SHIPPED.read_text(),
            upstreams=upstreams,
            http=http,
            https=https,
            tls=prefix / "tls",
            logs=prefix / "logs",
        )
        (prefix / "z4j.conf").write_text(site)
        tmp = prefix / "tmp"
        # As root (CI), workers drop to `nobody`: they only read what the
        # master opened and write temporary files the master creates for them.
        main = f"""
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {prefix}/z4j.conf;
}}
"""
        (prefix / "nginx.conf").write_text(main)
        args = [nginx_bin, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e"]
        args.append(str(prefix / "logs" / "error.log"))
        check = subprocess.run([*args, "-t"], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr
        with open(prefix / "logs" / "stderr.log", "wb") as err:
            started.append(subprocess.Popen(args, stdout=err, stderr=err))
        return http, https

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: nginx's fast shutdown, workers included
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def replica_env(tmp_path: Path, name: str, url: str) -> dict[str, str]:
    return {
        "Z4J_DATA_DIR": str(tmp_path / name),
        "Z4J_DATABASE_URL": url,
        "Z4J_SECRET": SECRET,
        "Z4J_INGEST_BIND": "127.0.0.1:0",
        "Z4J_HTTP_BIND": "127.0.0.1:0",
        "Z4J_HEARTBEAT_SECONDS": "0.5",
        "Z4J_INSTANCE_NAME": name,
        "Z4J_DRAIN_LINGER_MS": "0",
    }


def start_bare_agent(
    url: str, token: str, secret: str, events: int, home: Path, ca_file: Path
) -> subprocess.Popen[bytes]:
    """The real z4j-bare agent, trusting the test CA through SSL_CERT_FILE."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    env.update(
        {"Z4J_HOME": str(home), "NO_PROXY": "127.0.0.1,localhost", "SSL_CERT_FILE": str(ca_file)}
    )
    with open(home / "agent.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(BARE_AGENT), url, token, secret, str(events), "600"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def session_holder(pg_url: str, agent_id: Any) -> str | None:
    """The name of the replica that holds the agent's socket, if one does."""
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT i.name FROM agent_sessions s JOIN instances i ON i.id = s.instance_id "
            "WHERE s.agent_id = %s",
            (agent_id,),
        ).fetchone()
    return None if row is None else str(row[0])


async def api(
    brain: BrainProcess, method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    reply = await http_request(
        brain.http,
        method,
        f"/api/v1{path}",
        body=b"" if body is None else orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}"},
    )
    return reply.status, reply.json()


async def test_a_bare_agent_through_nginx_reaches_both_replicas(
    tmp_path: Path, pg_url: str, nginx: Any
) -> None:
    config = make_config(tmp_path / "cli", pg_url, secret=SECRET)
    admin = await admin_token(config)
    token, project_secret, agent_id = await provision(config)
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    brains: dict[str, BrainProcess] = {}
    agent = None
    try:
        for name in ("A", "B"):
            brains[name] = BrainProcess(
                replica_env(tmp_path, name, pg_url), log_path=tmp_path / f"{name}.log"
            )
        upstreams = ["{}:{}".format(*brain.http) for brain in brains.values()]
        _, https = nginx(upstreams, ca)
        with trio.fail_after(180):
            url = f"https://127.0.0.1:{https}"
            agent = start_bare_agent(url, token, project_secret, 5, tmp_path / "agent", ca_file)
            await wait_until(lambda: session_holder(pg_url, agent_id) is not None, timeout=90)
            holder = session_holder(pg_url, agent_id)
            assert holder in brains
            other = brains["B" if holder == "A" else "A"]

            def agent_events() -> list[dict[str, Any]]:
                return [e for e in read_events(config) if e["source"] == "agent"]

            await wait_until(lambda: len(agent_events()) >= 5, timeout=60)

            # Minted on the replica without the socket: forwarded, answered.
            status, command = await api(
                other,
                "POST",
                "/commands",
                admin,
                {"agent": str(agent_id), "action": "schedule.resync"},
            )
            assert status == 201, command

            async def state() -> str:
                _, now = await api(other, "GET", f"/commands/{command['id']}", admin)
                return str(now["state"])

            await wait_until(lambda: _done(state), timeout=60)
            assert await state() == "completed"
            metrics = (await http_request(other.http, "GET", "/metrics")).body
            assert b'z4j_command_dispatch_total{route="forwarded"} 1.0' in metrics

            # And the health check answers through the proxy, over TLS.
            ready = await trio.to_thread.run_sync(_https_get, https, "/health/ready", ca_file)
            assert ready[0] == 200, ready
            hidden = await trio.to_thread.run_sync(_https_get, https, "/metrics", ca_file)
            assert hidden[0] == 404, hidden

            # A browser's dashboard socket: its Origin must match the Host the
            # brain sees, which nginx passes on with the port.
            context = ssl.create_default_context(cafile=str(ca_file))
            headers = [
                ("Authorization", f"Bearer {admin}"),
                ("Origin", f"https://127.0.0.1:{https}"),
            ]
            async with trio_websocket.open_websocket_url(
                f"wss://127.0.0.1:{https}/ws/dashboard", ssl_context=context, extra_headers=headers
            ) as dashboard:
                hello = orjson.loads(await dashboard.get_message())
                assert hello["type"] == "hello", hello

            # Sticky: the agent comes back twice (new processes, same token)
            # and nginx sends it to the same replica each time.
            for count in (2, 3):
                stop(agent)
                before = connects(brains)
                agent = start_bare_agent(
                    url, token, project_secret, 0, tmp_path / f"agent-{count}", ca_file
                )
                await wait_until(lambda n=before: connects(brains) > n, timeout=60)
            stop(agent)
    finally:
        if agent is not None:
            stop(agent)
        for brain in brains.values():
            brain.kill()
    events = agent_events()
    # Exactly once: five events, each stored one time, with distinct keys.
    assert sorted(e["body"]["data"]["n"] for e in events) == [0, 1, 2, 3, 4]
    assert len({e["key"] for e in events}) == 5
    access = (tmp_path / "nginx" / "logs" / "access.log").read_text()
    sessions = re.findall(r'"GET /ws/agent HTTP/1\.1" 101 .* upstream=(\S+) ', access)
    assert len(sessions) >= 3 and len(set(sessions)) == 1, access
    assert token not in access


def stop(agent: subprocess.Popen[bytes]) -> None:
    if agent.poll() is None:
        agent.terminate()
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)


def connects(brains: dict[str, BrainProcess]) -> int:
    """Agent sessions the replicas have logged as opened, together."""
    return sum(brain.log_text().count("' connected") for brain in brains.values())


async def _done(state: Any) -> bool:
    return await state() in FINAL_COMMAND_STATES


def _https_get(port: int, path: str, ca_file: Path) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{port}{path}", context=context, timeout=30
        ) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _sign_in(
    port: int, source: str, token: str, ca_file: Path, forwarded: str | None = None
) -> Any:
    """POST /api/v1/session through nginx from ``source`` (a loopback address of
    this machine's): (status, Set-Cookie headers)."""
    import http.client

    context = ssl.create_default_context(cafile=str(ca_file))
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, context=context, timeout=30, source_address=(source, 0)
    )
    headers = {"Content-Type": "application/json"}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    try:
        conn.request("POST", "/api/v1/session", orjson.dumps({"token": token}), headers)
        reply = conn.getresponse()
        reply.read()
        return reply.status, reply.headers.get_all("Set-Cookie") or []
    finally:
        conn.close()


@pytest.mark.parametrize("trusted", [True, False])
async def test_behind_nginx_each_client_is_its_own_source(
    tmp_path: Path, nginx: Any, trusted: bool
) -> None:
    """With Z4J_TRUSTED_PROXIES naming nginx, the sign-in throttle and the audit
    see each browser's address, and cookies are Secure (nginx speaks TLS to
    them); a client's own X-Forwarded-For is not believed. Without it, every
    client is nginx: one guesser locks the others out (the control case)."""
    # nginx reaches the brain from 127.0.0.1; the clients come from 127.0.0.7 and .8.
    overrides = {"trusted_proxies": "127.0.0.1"} if trusted else {}
    config = make_config(tmp_path / "data", **overrides)
    admin = await admin_token(config)
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with trio.fail_after(120):
        async with running_brain(config) as brain:
            upstream = "{}:{}".format(*brain.addresses.http)
            _, https = nginx([upstream, upstream], ca)
            await wait_until(lambda: _listening(https), timeout=30)

            async def sign_in(source: str, token: str, forwarded: str | None = None) -> Any:
                return await trio.to_thread.run_sync(
                    _sign_in, https, source, token, ca_file, forwarded
                )

            # The guesser claims another address; nginx appends its real one.
            statuses = [(await sign_in("127.0.0.7", "wrong", "192.0.2.66"))[0] for _ in range(11)]
            assert statuses == [401] * 10 + [429], statuses
            status, cookies = await sign_in("127.0.0.8", admin)
            if not trusted:
                assert status == 429  # everyone is 127.0.0.1: locked out with the guesser
                return
            assert status == 200, status
            session = next(c for c in cookies if c.startswith("z4j_session="))
            assert "Secure" in session and "HttpOnly" in session, session
            records = await _audit_sources(brain.addresses.http, admin)
    assert records.count(("refused", "127.0.0.7")) == 10, records
    assert ("ok", "127.0.0.8") in records, records
    assert all(source not in ("127.0.0.1", "192.0.2.66") for _, source in records), records


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def _audit_sources(http: tuple[str, int], token: str) -> list[tuple[str, str]]:
    """(outcome, source) of the sign-ins the audit API lists."""
    reply = await http_request(
        http,
        "GET",
        "/api/v1/audit?action=session.sign_in&limit=100",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert reply.status == 200, reply.body
    return [(r["details"]["outcome"], r["details"]["source"]) for r in reply.json()["items"]]
