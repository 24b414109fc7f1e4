"""Shared by the benchmark scripts: the NightOwl-shaped payloads, CPU readings.

Not a benchmark itself. A payload is a JSON array of 5 records of ~590 bytes
each (~3 KB), shaped like request/query/job/log/exception telemetry, each with
a nested object so that it exercises jsonb for real.
"""

from __future__ import annotations

import os
import random
import time

import orjson

KINDS = ("request", "query", "job", "log", "exception")
RECORDS_PER_PAYLOAD = 5
RECORD_BYTES = 590


def make_record(rng: random.Random, kind: str) -> dict[str, object]:
    record: dict[str, object] = {
        "t": kind,
        "ts": 1_760_000_000 + rng.random() * 86_400,
        "host": f"web-{rng.randrange(40):02d}.prod.internal",
        "service": rng.choice(("checkout", "search", "accounts", "billing")),
        "trace_id": f"{rng.getrandbits(128):032x}",
        "span_id": f"{rng.getrandbits(64):016x}",
        "duration_ms": round(rng.random() * 250, 3),
        "status": rng.choice((200, 200, 200, 201, 204, 301, 404, 500)),
        "attrs": {
            "method": rng.choice(("GET", "POST", "PUT", "DELETE")),
            "route": f"/api/v1/{rng.choice(('orders', 'users', 'carts'))}/{{id}}",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
            "db_calls": rng.randrange(20),
            "cache_hit": rng.random() < 0.7,
        },
    }
    # Pad the message so the record serialises to ~RECORD_BYTES bytes.
    size = len(orjson.dumps(record)) + len(',"message":""')
    words = []
    while size < RECORD_BYTES:
        word = rng.choice(("lorem", "ipsum", "dolor", "sit", "amet", "elit", "sed", "do"))
        words.append(word)
        size += len(word) + 1
    record["message"] = " ".join(words)[: max(0, RECORD_BYTES - size + len(" ".join(words)))]
    return record


def make_payloads(count: int, *, seed: int = 7) -> list[bytes]:
    """``count`` distinct ~3 KB JSON arrays of 5 records."""
    rng = random.Random(seed)
    return [
        orjson.dumps([make_record(rng, KINDS[i % len(KINDS)]) for i in range(RECORDS_PER_PAYLOAD)])
        for _ in range(count)
    ]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def cluster_cpu_seconds(postmaster_pid: int) -> float:
    """User + system CPU time of a Postgres server so far: the postmaster, the
    backends it has reaped (its children's times), and those still running."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(entry) == postmaster_pid:
            total += sum(int(n) for n in fields[11:15])  # its own and its reaped children's
        elif int(fields[1]) == postmaster_pid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


class CpuMeter:
    """CPU share of one process over an interval (1.0 = one core busy)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._cpu = process_cpu_seconds(pid)
        self._wall = time.monotonic()

    def read(self) -> float:
        cpu, wall = process_cpu_seconds(self.pid), time.monotonic()
        share = (cpu - self._cpu) / (wall - self._wall) if wall > self._wall else 0.0
        self._cpu, self._wall = cpu, wall
        return share
