"""``z4j doctor``: what a ``z4j brain`` with these settings would meet, one line per check.

Checks, in order (a check that needs an earlier one skips when it failed):

- settings: they load (file, Z4J_* variables, flags) and pass the brain's
  start-up checks (binds beyond loopback, instances, TLS files);
- store: it answers a trivial query (an embedded store not made yet is fine:
  the first start makes it);
- schema: its migrations against this release's (pending ones only warn: the
  brain applies them as it starts; a store migrated by a newer z4j fails);
- clock: this host's clock against Postgres' (leases, heartbeats and "last
  seen" compare the two): warn from 1 s, fail from 5 s; skipped on SQLite;
- disk: free space where the buffer file lives (ingest is acknowledged once
  it is there): fail below --min-free-mib, warn below 4 times that.

Exit status 1 when any check failed, else 0 (warnings included).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from typing import Literal

import attrs

from ._cli_out import emit
from .config import Config, ConfigError

__all__ = ["SKEW_FAIL_SECONDS", "SKEW_WARN_SECONDS", "Check", "run_doctor"]

SKEW_WARN_SECONDS = 1.0
SKEW_FAIL_SECONDS = 5.0

Status = Literal["ok", "warn", "fail", "skip"]


@attrs.frozen(kw_only=True)
class Check:
    check: str
    status: Status
    detail: str


def run_doctor(
    args: argparse.Namespace, config_from: Callable[[argparse.Namespace], Config]
) -> int:
    settings = _settings(args, config_from)
    checks = [settings]
    if settings.status == "ok":
        config = config_from(args)
        import trio

        from .cli import _quiet_logging

        _quiet_logging(config)
        checks += trio.run(_store_checks, config)
        checks.append(_disk(config, args.min_free_mib * 1024 * 1024))
    else:
        checks += [
            Check(check=name, status="skip", detail="the settings failed")
            for name in ("store", "schema", "clock", "disk")
        ]
    failed = any(c.status == "fail" for c in checks)
    emit(
        args,
        {"ok": not failed, "checks": [attrs.asdict(c) for c in checks]},
        lambda: "\n".join(f"{c.status:<4}  {c.check:<8}  {c.detail}" for c in checks),
    )
    return 1 if failed else 0


def _settings(
    args: argparse.Namespace, config_from: Callable[[argparse.Namespace], Config]
) -> Check:
    from ._tls import server_tls_context
    from .supervisor import check_instances

    try:
        config = config_from(args)
        check_instances(config)
        server_tls_context(config)  # the files exist, parse and match
    except ConfigError as exc:
        return Check(check="settings", status="fail", detail=str(exc))
    if config.database_url is None:
        where = f"SQLite store in {config.data_dir}"
    else:
        from urllib.parse import urlsplit

        url = urlsplit(config.database_url)
        where = f"Postgres store at {url.hostname or 'localhost'}{url.path or ''}"
    return Check(check="settings", status="ok", detail=f"loaded; {where}")


async def _store_checks(config: Config) -> list[Check]:
    from ._store_ops_cli import SchemaState
    from .store import store_for

    if config.database_url is None and not config.sqlite_store_path.exists():
        return [
            Check(
                check="store",
                status="ok",
                detail=f"{config.sqlite_store_path} not made yet: the first start makes it",
            ),
            Check(check="schema", status="warn", detail=SchemaState([]).describe()),
            _no_clock(),
        ]
    store = store_for(config, application_name="z4j-doctor")
    try:
        try:
            await store.check()
        except Exception as exc:
            return [
                Check(check="store", status="fail", detail=_one_line(exc)),
                Check(check="schema", status="skip", detail="the store did not answer"),
                Check(check="clock", status="skip", detail="the store did not answer"),
            ]
        kind = "SQLite" if store.kind == "sqlite" else "Postgres"
        store_ok = Check(check="store", status="ok", detail=f"the {kind} store answers")
        state = SchemaState(await store.applied_migrations())
        status: Status = "fail" if state.unknown else "warn" if state.pending else "ok"
        schema = Check(check="schema", status=status, detail=state.describe())
        if config.database_url is None:
            return [store_ok, schema, _no_clock()]
        before = time.time()
        server = await store.database_time()
        after = time.time()
        assert server is not None
        checks = [store_ok, schema, _skew(server - (before + after) / 2, (after - before) / 2)]
        if config.database_read_url is not None:
            checks.append(await _replica(config.database_read_url, config.read_max_lag_ms))
        return checks
    finally:
        await store.aclose()


async def _replica(url: str, max_lag_ms: int) -> Check:
    """Z4J_DATABASE_READ_URL: a standby that answers, within the lag limit. The
    brain falls back to the primary either way; a URL that names no standby
    (the primary itself, say) or none at all is a mistake, a lag a warning."""
    import psycopg
    import trio

    from .store.replica import judge, probe_url

    try:
        sample = await trio.to_thread.run_sync(probe_url, url)
    except psycopg.Error as exc:
        return Check(check="replica", status="fail", detail=f"unreachable: {_one_line(exc)}")
    standing = judge(None, sample, age=0.0, max_lag_seconds=max_lag_ms / 1000)
    if standing.fallback is None:
        lag = "caught up" if sample.receiving and sample.caught_up else "streaming"
        return Check(check="replica", status="ok", detail=f"a standby, {lag}: reads go to it")
    status: Status = "fail" if standing.fallback == "promoted" else "warn"
    detail = standing.note or standing.fallback
    if standing.fallback == "promoted":
        detail = "not a standby (pg_is_in_recovery() is false): the primary, or promoted"
    return Check(check="replica", status=status, detail=detail)


def _no_clock() -> Check:
    return Check(
        check="clock", status="skip", detail="SQLite store: one host, no database clock to compare"
    )


def _skew(skew: float, within: float) -> Check:
    """``skew``: the database's clock minus ours, known to within ``within`` seconds."""
    least = max(abs(skew) - within, 0.0)
    detail = (
        f"{'ahead of' if skew < 0 else 'behind'} Postgres by {abs(skew):.3f} s (± {within:.3f} s)"
    )
    if least >= SKEW_FAIL_SECONDS:
        return Check(check="clock", status="fail", detail=f"{detail}: synchronise with NTP")
    if least >= SKEW_WARN_SECONDS:
        return Check(check="clock", status="warn", detail=f"{detail}: synchronise with NTP")
    return Check(check="clock", status="ok", detail=detail)


def _disk(config: Config, min_free: int) -> Check:
    buffer = config.resolved_buffer_path
    directory = buffer.parent
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    usage = shutil.disk_usage(existing)
    detail = f"{_mib(usage.free)} free of {_mib(usage.total)} at {existing} (buffer {buffer})"
    if not os.access(existing, os.W_OK):
        return Check(check="disk", status="fail", detail=f"{existing} is not writable: {detail}")
    if usage.free < min_free:
        return Check(check="disk", status="fail", detail=f"{detail}; below {_mib(min_free)}")
    if usage.free < 4 * min_free:
        return Check(check="disk", status="warn", detail=f"{detail}; below {_mib(4 * min_free)}")
    return Check(check="disk", status="ok", detail=detail)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):,.0f} MiB"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
