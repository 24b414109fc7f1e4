"""Federation benchmark: federated event search against the same search on one region.

Run ``python benchmarks/federation.py`` (``--help`` for the knobs;
``--events 100000`` for a quick run). Issue 19's target, per filter shape:
the federated search's p99 <= 1.5 x the single-region search's p99 plus
the slowest peer's round trip, all measured in the same run.

Setup. Three throwaway Postgres clusters (z4j/testing/postgres.py, fsync
off, wal_level=minimal: the load only; the timed parts only read), one per
brain, so each region's Postgres sees only its own queries: east and west
get the brain's schema and ``--events`` events each (1,000,000) over the
last ``--span-days`` days, loaded as benchmarks/search.py loads them
(INSERT ... SELECT over generate_series, so no row crosses the client;
the indexes dropped and rebuilt from their own definitions, checked equal;
VACUUM ANALYZE), each region with its own random draws and west's rows
half a row apart from east's in time, so a merged page interleaves them.
The hub's cluster holds no events. Each region runs ``python -m z4j
brain`` and gives the hub a read-only federation token; the hub, a third
``python -m z4j brain``, knows them through Z4J_FEDERATION_PEERS and its
peers file, as tests/test_federation.py starts them. The hub's response
cache is off (Z4J_FEDERATION_CACHE_MS=0): every federated search is
asked of both regions. The filters are random too (as in search.py), so
no two consecutive queries are the same question either.

Timed, ``--queries`` times per shape (no filter, kind by its frequency,
project, a one-hour window, a text match, page 2 of a random filter
through its cursor), a page of 50 each, over HTTP on loopback with a kept-
alive connection, from the request to the last byte of the answer:

(1) single region: GET /api/v1/events on east, directly;
(2) federated: the hub's GET /api/v1/federation/events?region=east,west
    with the same filter (the hub's own, empty, region left out: the
    search is over the two regions). Every answer is checked: 200, not
    partial, labelled by region. Page 2: page 1 is asked first (untimed)
    and page 2 timed through the cursor that page gave, on each side.
    (1) and (2) alternate in order, query by query, so the load of a
    shared machine falls on both alike.
(3) each peer's round trip, after each shape: a bare GET /health/live of
    each peer on a kept-alive connection from this process (loopback and
    one HTTP exchange with a brain: what the hub's call adds to a region's
    search at least). The slowest peer's p50 is the round trip in the
    target. Beside it, and in a second verdict in brackets: the hub's own
    GET /api/v1/federation/regions?region=east,west as the hub measures it
    (``round_trip_ms``, its Regions page's figure), which also holds the
    peer's summary reads and readiness checks.

Beside each shape: the hub's CPU per federated search; where a search's
time went (means from the brains' own /metrics: the hub's handling, its
call to each peer, the peer's handling of it); and, in a second pass, the
hub's hop alone: its federated search over east only against east
directly (no second region searching on the same cores), alternating.

On a machine of few cores the three brains, this client and the clusters share
them, so a federated search's two region searches compete for the cores
a single search has to itself; in earnest each region is its own
machines. Everything runs on loopback; the clusters, brains and temporary
files are removed at the end, on Ctrl-C and on SIGTERM too.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import random
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import attrs
import orjson
import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import AGENT_KINDS, DAY, PROJECTS, TCP_KINDS, load_events, prepare

from z4j.testing.agents import admin_token
from z4j.testing.brain import BrainProcess, make_config
from z4j.testing.federation import federation_token, write_peers_file
from z4j.testing.postgres import PostgresCluster

REGIONS = ("east", "west")
SEEDS = {"east": 0.42, "west": -0.17}  # each region's own random draws
SHAPES = ("no filter", "kind", "project", "one hour", "text", "page 2")
PAGE = 50  # the API's default limit
SLACK = 1.5  # the target: federated p99 <= SLACK * single p99 + the slowest peer's RTT
WARMUP = 10  # untimed queries per shape and side first


def say(line: str) -> None:
    print(line, flush=True)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Http:
    """One kept-alive connection to a brain, with its bearer token."""

    def __init__(self, address: tuple[str, int], token: str) -> None:
        self.address = address
        self.token = token
        self._conn = http.client.HTTPConnection(*address, timeout=120)

    def exchange(self, path: str, *, auth: bool = True) -> tuple[int, bytes, float]:
        """GET ``path``: (status, body, milliseconds to its last byte). A connection
        the brain closed while idle is opened again, and the clock started again."""
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                self._conn.request("GET", path, headers=headers)
                response = self._conn.getresponse()
                raw = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._conn.close()
                if attempt == 2:
                    raise
                continue
            return response.status, raw, (time.perf_counter() - started) * 1000
        raise AssertionError("unreachable")

    def get(self, path: str) -> tuple[Any, float]:
        """GET ``path``: (its JSON, milliseconds to its last byte); an error if not 200."""
        status, raw, ms = self.exchange(path)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {raw[:500]!r}")
        return orjson.loads(raw), ms

    def bare_ms(self, path: str) -> float:
        """GET ``path`` without a token (a health probe): milliseconds to its last byte."""
        return self.exchange(path, auth=False)[2]

    def text(self, path: str) -> str:
        return self.exchange(path, auth=False)[1].decode()

    def close(self) -> None:
        self._conn.close()


class Sampler:
    """Random filters of one shape, as query parameters."""

    def __init__(self, rng: random.Random, now: float, span: float) -> None:
        self.rng = rng
        self.now = now
        self.span = span

    def kind(self) -> str:
        """A kind as often as it is stored (80% agent events, 20% TCP records)."""
        pairs = AGENT_KINDS if self.rng.random() < 0.8 else TCP_KINDS
        draw, total = self.rng.random(), 0.0
        for name, share in pairs:
            total += share
            if draw < total:
                return name
        return pairs[-1][0]

    def params(self, shape: str) -> dict[str, str]:
        rng = self.rng
        if shape == "kind":
            return {"kind": self.kind()}
        if shape == "project":
            return {"project_id": str(rng.choice(PROJECTS))}
        if shape == "one hour":
            # Not in the last hour: a full page of each region lies inside the window.
            start = self.now - 3600 - rng.random() * (self.span - 3600)
            return {"since": f"{start:.3f}", "until": f"{start + 3600:.3f}"}
        if shape == "text":  # "retrying after a timeout, attempt N": one row in 50
            return {"q": f"timeout, attempt {rng.randrange(5)}"}
        return {}


def query_string(params: dict[str, str]) -> str:
    return urllib.parse.urlencode(params)


# -- the deployment -------------------------------------------------------------------------


def brain_env(name: str, data_dir: Path, url: str, **more: str) -> dict[str, str]:
    return {
        "Z4J_DATA_DIR": str(data_dir),
        "Z4J_DATABASE_URL": url,
        "Z4J_HTTP_BIND": "127.0.0.1:0",
        "Z4J_INGEST_BIND": "127.0.0.1:0",
        "Z4J_REGION_NAME": name,
        "Z4J_LOG_LEVEL": "INFO",  # BrainProcess waits for the INFO ready line
        **more,
    }


@contextmanager
def interrupts_unwind() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the clusters and brains are removed either way."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_cluster(stack: ExitStack, name: str) -> tuple[PostgresCluster, str]:
    settings = {"wal_level": "minimal", "max_wal_senders": "0"}
    cluster = stack.enter_context(PostgresCluster(fsync=False, settings=settings))
    return cluster, cluster.create_database(f"z4j_{name}")


def start_brain(stack: ExitStack, root: Path, env: dict[str, str]) -> BrainProcess:
    brain = BrainProcess(env, log_path=root / f"{env['Z4J_REGION_NAME']}.log")
    stack.callback(brain.stop, 15)
    return brain


# -- the timed part -------------------------------------------------------------------------


@attrs.define
class ShapeResult:
    single: list[float]  # ms, at this client
    federated: list[float]
    hub_cpu_ms: float  # the hub's CPU per federated search
    means: dict[str, float]  # ms: where a search's time went, from the brains' /metrics
    alone: tuple[list[float], list[float]]  # ms: (east directly, east through the hub)


def scrape(brain: Http) -> dict[str, float]:
    """A brain's /metrics as {series: value}."""
    out = {}
    for line in brain.text("/metrics").splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def mean_ms(before: dict[str, float], after: dict[str, float], histogram: str) -> float:
    """The mean of ``histogram`` (``name{labels}``) between two scrapes, in ms."""
    name, _, labels = histogram.partition("{")
    total = after.get(f"{name}_sum{{{labels}", 0.0) - before.get(f"{name}_sum{{{labels}", 0.0)
    n = after.get(f"{name}_count{{{labels}", 0.0) - before.get(f"{name}_count{{{labels}", 0.0)
    return total / n * 1000 if n else math.nan


def http_series(route: str) -> str:
    return f'z4j_http_request_duration_seconds{{method="GET",route="{route}"}}'


class Run:
    """The timed searches and round trips, with what each answer is checked for."""

    def __init__(self, found: Deployment) -> None:
        self.single = found.single
        self.hub = found.hub
        self.peers = found.peers
        self.hub_pid = found.pids["hub"]
        self.rtt: dict[str, list[float]] = {name: [] for name in REGIONS}
        self.live: dict[str, list[float]] = {name: [] for name in REGIONS}
        self.items: dict[str, list[int]] = {}
        self.federated_calls = 0

    def single_page(self, params: dict[str, str]) -> tuple[Any, float]:
        return self.single.get(f"/api/v1/events?{query_string(params)}")

    def federated_page(
        self, params: dict[str, str], regions: tuple[str, ...] = REGIONS
    ) -> tuple[Any, float]:
        qs = query_string({"region": ",".join(regions), **params})
        body, ms = self.hub.get(f"/api/v1/federation/events?{qs}")
        self.federated_calls += 1
        if body["partial"] or body["unreachable"]:
            raise RuntimeError(f"a partial federated answer: {body['errors']}")
        if not {item["region"] for item in body["items"]} <= set(regions):
            raise RuntimeError(f"a federated row labelled with no region of {regions}")
        return body, ms

    def east_via_hub(self, params: dict[str, str]) -> tuple[Any, float]:
        """The hub's federated search over east alone: its own hop, without a second
        region's search on the same cores."""
        return self.federated_page(params, ("east",))

    def pair(
        self, shape: str, sampler: Sampler, flip: bool, *, other: str = "federated"
    ) -> tuple[float, float]:
        """One search of ``shape`` on each side, in the order ``flip`` says:
        (single ms, ``other`` ms), ``other`` "federated" or "east via the hub"."""
        params = sampler.params(shape)
        if shape == "page 2":  # of a random filter, through the cursor its page 1 gave
            params = sampler.params(sampler.rng.choice(SHAPES[:4]))
        out: dict[str, float] = {}
        for side in (other, "single") if flip else ("single", other):
            read = {
                "single": self.single_page,
                "federated": self.federated_page,
                "east via the hub": self.east_via_hub,
            }[side]
            if shape == "page 2":
                first, _ = read(params)
                if first["next_cursor"] is None:
                    raise RuntimeError(f"{side}: page 1 of {params} has no page 2")
                body, ms = read({**params, "cursor": first["next_cursor"]})
            else:
                body, ms = read(params)
            out[side] = ms
            self.items.setdefault(side, []).append(len(body["items"]))
        return out["single"], out[other]

    def round_trips(self, samples: int) -> None:
        """Each peer's round trip: a bare GET /health/live from here, and the hub's
        summary call as the hub measures it."""
        for peer in self.peers.values():
            peer.bare_ms("/health/live")  # its connection open again if it was idle
        for _ in range(samples):
            for name, peer in self.peers.items():
                self.live[name].append(peer.bare_ms("/health/live"))
            body, _ = self.hub.get(f"/api/v1/federation/regions?region={','.join(REGIONS)}")
            for region in body["items"]:
                if not region["reachable"] or region["round_trip_ms"] is None or region["cached"]:
                    raise RuntimeError(f"no fresh round trip to {region['name']}: {region}")
                self.rtt[region["name"]].append(float(region["round_trip_ms"]))

    def shape(self, shape: str, sampler: Sampler, queries: int) -> ShapeResult:
        for n in range(WARMUP):
            self.pair(shape, sampler, bool(n % 2))
        brains = {"hub": self.hub, **self.peers}
        before = {name: scrape(brain) for name, brain in brains.items()}
        single: list[float] = []
        federated: list[float] = []
        calls, cpu = self.federated_calls, cpu_seconds(self.hub_pid)
        for n in range(queries):
            s, f = self.pair(shape, sampler, flip=bool(n % 2))
            single.append(s)
            federated.append(f)
        # The single searches cost the hub nothing; page 2's page 1 is counted as a call.
        cpu = (cpu_seconds(self.hub_pid) - cpu) / (self.federated_calls - calls) * 1000
        after = {name: scrape(brain) for name, brain in brains.items()}
        means = {
            "single at east": mean_ms(before["east"], after["east"], http_series("/api/v1/events")),
            "federated at hub": mean_ms(
                before["hub"], after["hub"], http_series("/api/v1/federation/events")
            ),
        }
        for name in REGIONS:
            means[f"call to {name}"] = mean_ms(
                before["hub"],
                after["hub"],
                f'z4j_federation_request_duration_seconds{{peer="{name}"}}',
            )
            means[f"peer read at {name}"] = mean_ms(
                before[name], after[name], http_series("/api/v1/federation/peer/events")
            )
        # The hub's own hop: through it to east alone, against east directly.
        alone: tuple[list[float], list[float]] = ([], [])
        for n in range(max(10, queries // 2)):
            s, f = self.pair(shape, sampler, flip=bool(n % 2), other="east via the hub")
            alone[0].append(s)
            alone[1].append(f)
        self.round_trips(max(10, queries // 4))
        return ShapeResult(single, federated, cpu, means, alone)


# -- the run --------------------------------------------------------------------------------


@attrs.frozen
class Deployment:
    single: Http  # east, directly
    hub: Http
    peers: dict[str, Http]  # each region, directly
    pids: dict[str, int]  # every brain's, by region name ("hub" too)


@contextmanager
def deployment(events: int, span_days: int, chunk: int, now: float) -> Iterator[Deployment]:
    """Two regions of ``events`` each and a hub, each brain on its own cluster; all
    removed on the way out."""
    span = span_days * DAY
    with ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="z4j-bench-federation-"))
        stack.callback(shutil.rmtree, root, True)
        tokens: dict[str, str] = {}
        admins: dict[str, str] = {}
        brains: dict[str, BrainProcess] = {}
        for n, name in enumerate(REGIONS):
            cluster, url = start_cluster(stack, name)
            if n == 0:
                with psycopg.connect(url) as conn:
                    version = conn.execute("SHOW server_version").fetchone()
                    buffers = conn.execute("SHOW shared_buffers").fetchone()
                assert version is not None and buffers is not None
                say(
                    f"    Postgres {version[0]}, a cluster per brain, shared_buffers "
                    f"{buffers[0]}, fsync=off and wal_level=minimal (for the load)"
                )
            say(f"    {name}: {events:,} events into its cluster (port {cluster.port})")
            trio.run(prepare, url, now, span_days)
            # West's rows half a row apart from east's: a merged page interleaves them.
            offset = 0.0 if n == 0 else span / max(events, 1) / 2
            load_events(url, events, chunk, now - offset, span, seed=SEEDS[name])
            secret = secrets.token_urlsafe(48)
            config = make_config(root / name, url, secret=secret)
            admins[name] = trio.run(admin_token, config)
            tokens[name] = trio.run(federation_token, config, "hub")
            env = brain_env(name, root / name, url, Z4J_SECRET=secret)
            brains[name] = start_brain(stack, root, env)
        _, hub_url = start_cluster(stack, "hub")
        secret = secrets.token_urlsafe(48)
        hub_config = make_config(root / "hub", hub_url, secret=secret)
        hub_admin = trio.run(admin_token, hub_config)
        peers_file = write_peers_file(
            root / "peers.toml", {name: {"token": tokens[name]} for name in REGIONS}
        )
        hub_env = brain_env(
            "hub",
            root / "hub",
            hub_url,
            Z4J_SECRET=secret,
            Z4J_FEDERATION_PEERS=",".join(
                f"{name}=http://{brains[name].http[0]}:{brains[name].http[1]}" for name in REGIONS
            ),
            Z4J_FEDERATION_PEERS_FILE=str(peers_file),
            Z4J_FEDERATION_CACHE_MS="0",
        )
        hub = start_brain(stack, root, hub_env)
        found = Deployment(
            single=Http(brains["east"].http, admins["east"]),
            hub=Http(hub.http, hub_admin),
            peers={name: Http(brains[name].http, admins[name]) for name in REGIONS},
            pids={"hub": hub.proc.pid, **{name: b.proc.pid for name, b in brains.items()}},
        )
        for client in (found.single, found.hub, *found.peers.values()):
            stack.callback(client.close)
        yield found


def report(run: Run, results: dict[str, ShapeResult]) -> list[str]:
    """Print the figures and verdicts; the shapes that missed the target."""
    failures: list[str] = []
    bare = {name: percentile(run.live[name], 50) for name in REGIONS}
    summary = {name: percentile(run.rtt[name], 50) for name in REGIONS}
    for name in REGIONS:
        say(
            f"    round trip to {name} (p50 / p99, n={len(run.live[name])}): a bare GET "
            f"/health/live from here {bare[name]:.2f} / {percentile(run.live[name], 99):.2f} ms;"
            f" the hub's summary call as it measures it (its Regions page's round trip: the "
            f"call and the summary's reads) {summary[name]:.2f} / "
            f"{percentile(run.rtt[name], 99):.2f} ms"
        )
    slowest = max(REGIONS, key=lambda name: bare[name])
    rtt = bare[slowest]
    worst_summary = max(summary.values())
    say(
        f"    the slowest peer's round trip in the target: {slowest}'s bare call, p50 "
        f"{rtt:.2f} ms (with the summary call's {worst_summary:.2f} ms instead: the second "
        "verdict)"
    )
    say(
        f"    {'shape':<10} {'single p50':>10} {'p99':>8}  {'federated p50':>13} {'p99':>8}  "
        f"{'p99 ratio':>9}  {'limit':>8}  {'to limit':>8}  {'hub CPU':>8}  verdict"
    )
    for shape in SHAPES:
        found = results[shape]
        s99, f99 = percentile(found.single, 99), percentile(found.federated, 99)
        limit = SLACK * s99 + rtt
        ok = f99 <= limit
        lenient = f99 <= SLACK * s99 + worst_summary
        say(
            f"    {shape:<10} {percentile(found.single, 50):8.2f}ms {s99:6.2f}ms  "
            f"{percentile(found.federated, 50):11.2f}ms {f99:6.2f}ms  {f99 / s99:9.2f}  "
            f"{limit:6.2f}ms  {f99 / limit:8.2f}  {found.hub_cpu_ms:6.2f}ms  "
            f"{'PASS' if ok else 'FAIL'} ({'PASS' if lenient else 'FAIL'})"
        )
        if not ok:
            failures.append(
                f"{shape}: federated p99 {f99:.2f} ms > {SLACK:g} x {s99:.2f} + {rtt:.2f} = "
                f"{limit:.2f} ms"
            )
    say(
        f"    (limit: {SLACK:g} x single p99 + the slowest peer's round trip; 'to limit': "
        "federated p99 / limit; hub CPU: per federated search; the verdict in brackets with "
        "the summary call's round trip)"
    )
    say("    where the time went, means in ms (the brains' /metrics; page 2: pages 1 and 2):")
    for shape in SHAPES:
        found = results[shape]
        m = found.means
        calls = ", ".join(
            f"to {name} {m[f'call to {name}']:.2f} (its read {m[f'peer read at {name}']:.2f})"
            for name in REGIONS
        )
        say(
            f"    {shape:<10} single {statistics.fmean(found.single):.2f} (east's handling "
            f"{m['single at east']:.2f}); federated {statistics.fmean(found.federated):.2f} "
            f"(the hub's handling {m['federated at hub']:.2f}; its calls {calls})"
        )
    say(
        "    the hub's own hop: its federated search over east alone against east directly, "
        "the two alternating (a second pass, no second region searching on the same cores):"
    )
    for shape in SHAPES:
        direct, via = results[shape].alone
        say(
            f"    {shape:<10} east {percentile(direct, 50):6.2f} / {percentile(direct, 99):6.2f} ms"
            f", through the hub {percentile(via, 50):6.2f} / {percentile(via, 99):6.2f} ms "
            f"(p50 / p99; p99 ratio {percentile(via, 99) / percentile(direct, 99):.2f}, "
            f"n={len(via)})"
        )
    for side, counts in run.items.items():
        say(
            f"    rows a page, {side}: mean {sum(counts) / len(counts):.1f}, "
            f"fewest {min(counts)} (text pages may be short: at most 10,000 rows read)"
        )
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Federated event search over two regions (a hub and two region brains, "
        "each on its own Postgres) against the same search on one region: p50/p99 per shape.",
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="events in each region")
    parser.add_argument("--span-days", type=int, default=7, help="days the events span")
    parser.add_argument("--chunk", type=int, default=1_000_000, help="rows per load statement")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per shape")
    args = parser.parse_args()

    started = time.perf_counter()
    say(
        f"z4j federation benchmark: {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start"
    )
    now = time.time()
    try:
        with (
            interrupts_unwind(),
            deployment(args.events, args.span_days, args.chunk, now) as found,
        ):
            say(
                f"(1) single region: GET /api/v1/events on east; (2) federated: the hub's GET "
                f"/api/v1/federation/events?region=east,west (cache off); a page of {PAGE}, "
                f"{args.queries} random queries per shape (after {WARMUP} untimed), the two "
                "alternating; (3) the peers' round trips, after each shape"
            )
            run = Run(found)
            sampler = Sampler(random.Random(19), now, args.span_days * DAY)
            results = {shape: run.shape(shape, sampler, args.queries) for shape in SHAPES}
            failures = report(run, results)
    except KeyboardInterrupt:
        say("interrupted: the clusters, brains and files are removed")
        return 130
    for failure in failures:
        say(f"MISSED: {failure}")
    say(
        f"total run time {time.perf_counter() - started:.0f} s, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
