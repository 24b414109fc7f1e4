"""The brain's configuration: one frozen object, built once at start.

Values come from, lowest precedence first: the defaults below, an optional
TOML file (``--config`` or ``Z4J_CONFIG``), ``Z4J_*`` environment variables,
and ``z4j brain`` flags. Everything is structured by one project-owned cattrs
converter, so a bad value fails at start with the name of the variable that
carried it and what it accepts, instead of surfacing later as a stack trace.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs

from ._decimal import parse_decimal
from ._federation_peers import check_region_name, parse_peer_list
from .logs import parse_log_levels

__all__ = ["ENV_PREFIX", "Config", "ConfigError", "check_bind_is_safe", "load_config"]

ENV_PREFIX = "Z4J_"
MiB = 1024 * 1024

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
RegistryBackend = Literal["postgres_notify", "local"]
LogFormat = Literal["text", "json"]


class ConfigError(ValueError):
    """A configuration value was missing or malformed; the message names it."""


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value!r}")


def _between(low: float, high: float) -> Callable[[object, attrs.Attribute[Any], float], None]:
    """A range check; the agent protocol's limits, so hello_ack can carry the value."""

    def check(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
        if value <= 0:
            raise ValueError(f"must be greater than 0, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low!r} and {high!r}, got {value!r}")

    return check


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value!r}")


def _long_secret(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if len(value.encode()) < 32:
        raise ValueError(
            "must be at least 32 characters (try: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )


def _log_levels(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    parse_log_levels(value)


def _region_name(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    check_region_name(value)


def _peer_list(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    parse_peer_list(value)


def _networks(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    parse_networks(value)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> list[Network]:
    """``"10.0.0.0/8, 127.0.0.1, ::1"`` as networks; ValueError naming a bad entry."""
    networks = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"{item!r} is not an IP address or network (e.g. 10.0.0.0/8 or 127.0.0.1)"
            ) from None
    return networks


def _bind(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    parse_bind(value)


def parse_bind(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into its parts."""
    host, sep, port_text = value.rpartition(":")
    port = parse_decimal(port_text)
    if not sep or not host or port is None or port > 65535:
        raise ValueError(f"must look like HOST:PORT (for example 127.0.0.1:7700), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def is_loopback_bind(bind: str) -> bool:
    """Whether ``HOST:PORT`` listens on this machine only (a host name may resolve anywhere)."""
    host = parse_bind(bind)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen(kw_only=True)
class Config:
    """Every setting of a brain. Field ``x`` is read from ``Z4J_X``.

    docs/configuration.md is the reference for each field; keep both in step.
    """

    data_dir: Path = Path(".z4j")
    database_url: str | None = None
    http_bind: str = attrs.field(default="127.0.0.1:7700", validator=_bind)
    ingest_bind: str = attrs.field(default="127.0.0.1:2407", validator=_bind)
    http_max_connections: int = attrs.field(default=10_000, validator=_positive)
    http_read_timeout_seconds: float = attrs.field(default=30.0, validator=_positive)
    session_max_seconds: float = attrs.field(default=12 * 3600.0, validator=_positive)
    session_idle_seconds: float = attrs.field(default=3600.0, validator=_positive)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    ingest_tls: bool = True
    ingest_token: str | None = None
    ingest_max_frame_bytes: int = attrs.field(default=10 * MiB, validator=_positive)
    ingest_max_inflated_bytes: int = attrs.field(default=16 * MiB, validator=_positive)
    ingest_idle_timeout_seconds: float = attrs.field(default=10.0, validator=_positive)
    ingest_frame_timeout_seconds: float = attrs.field(default=30.0, validator=_positive)
    ingest_max_connections: int = attrs.field(default=10_000, validator=_positive)
    ingest_max_records_per_payload: int = attrs.field(default=100_000, validator=_positive)
    ingest_max_buffered_bytes: int = attrs.field(default=256 * MiB, validator=_positive)
    ingest_allow_no_token: bool = False
    ingest_strict_token: bool = False
    buffer_path: Path | None = None
    buffer_max_rows: int = attrs.field(default=100_000, validator=_positive)
    drain_workers: int = attrs.field(default=2, validator=_positive)
    drain_batch_rows: int = attrs.field(default=10_000, validator=_positive)
    drain_batch_bytes: int = attrs.field(default=4 * MiB, validator=_positive)
    drain_lease_seconds: float = attrs.field(default=30.0, validator=_positive)
    drain_linger_ms: int = attrs.field(default=500, validator=_non_negative)
    so_reuseport: bool = False
    instances: int = attrs.field(default=1, validator=_positive)
    gil_switch_interval_us: int = attrs.field(default=500, validator=_non_negative)
    db_pool_size: int = attrs.field(default=8, validator=_positive)
    db_statement_timeout_ms: int = attrs.field(default=30_000, validator=_non_negative)
    # -- read replica (docs/scaling.md, "Read replica")
    database_read_url: str | None = None
    read_max_lag_ms: int = attrs.field(default=5_000, validator=_positive)
    event_retention_days: int = attrs.field(default=30, validator=_positive)
    task_retention_days: int = attrs.field(default=30, validator=_positive)
    task_projection: bool = True
    task_stuck_seconds: float = attrs.field(default=3600.0, validator=_positive)
    task_reconcile_seconds: float = attrs.field(default=60.0, validator=_positive)
    shutdown_grace_seconds: float = attrs.field(default=10.0, validator=_non_negative)
    heartbeat_seconds: float = attrs.field(default=5.0, validator=_positive)
    instance_name: str | None = None
    ws_max_frame_bytes: int = attrs.field(default=1024 * 1024, validator=_between(1024, 64 * MiB))
    ws_per_agent_concurrency_cap: int = attrs.field(default=64, validator=_positive)
    ws_heartbeat_interval_seconds: int = attrs.field(default=10, validator=_between(1, 3600))
    ws_rate_limit_frames_per_second: int = attrs.field(default=20_000, validator=_positive)
    ws_rate_limit_events_per_second: int = attrs.field(default=200_000, validator=_positive)
    rotation_grace_seconds: int = attrs.field(
        default=86_400, validator=[_non_negative, attrs.validators.le(30 * 86_400)]
    )
    registry_backend: RegistryBackend | None = None
    ownership_ttl_seconds: float = attrs.field(default=60.0, validator=_positive)
    leader_lease_seconds: float = attrs.field(default=30.0, validator=_positive)
    opamp_max_message_bytes: int = attrs.field(default=10 * MiB, validator=_positive)
    opamp_heartbeat_window_seconds: float = attrs.field(default=90.0, validator=_positive)
    opamp_bind: str | None = attrs.field(default=None, validator=attrs.validators.optional(_bind))
    secret: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_long_secret)
    )
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "text"
    log_levels: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_log_levels)
    )
    http_access_log: bool = False
    metrics_token: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_long_secret)
    )
    trusted_proxies: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_networks)
    )
    # -- federation (docs/scaling.md "Federation"; z4j/_federation_peers.py) --
    region_name: str = attrs.field(default="local", validator=_region_name)
    federation_peers: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_peer_list)
    )
    federation_peers_file: Path | None = None
    federation_timeout_ms: int = attrs.field(default=3000, validator=_positive)
    federation_cache_ms: int = attrs.field(default=2000, validator=_non_negative)
    federation_max_response_bytes: int = attrs.field(default=16 * MiB, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.database_read_url is not None and self.database_url is None:
            raise ConfigError(
                "Z4J_DATABASE_READ_URL is set without Z4J_DATABASE_URL: a read replica is a "
                "Postgres standby of the Postgres store, and the embedded SQLite store has "
                "none; set Z4J_DATABASE_URL to the primary, or unset Z4J_DATABASE_READ_URL"
            )

    @property
    def resolved_buffer_path(self) -> Path:
        return (
            self.buffer_path if self.buffer_path is not None else self.data_dir / "buffer.sqlite3"
        )

    @property
    def sqlite_store_path(self) -> Path:
        return self.data_dir / "store.sqlite3"

    @property
    def uses_postgres(self) -> bool:
        return self.database_url is not None

    @property
    def resolved_registry_backend(self) -> RegistryBackend:
        """postgres_notify on Postgres unless set to local; always local on SQLite."""
        if not self.uses_postgres:
            return "local"
        return self.registry_backend or "postgres_notify"


HELP: dict[str, str] = {
    "data_dir": "Directory for the buffer file and the embedded SQLite store.",
    "database_url": "Postgres URL (postgresql://...). Unset: SQLite store in the data dir.",
    "http_bind": "HOST:PORT for the dashboard, API, health and metrics.",
    "ingest_bind": "HOST:PORT for the TCP ingest server (NightOwl v1 framing).",
    "http_max_connections": "Open HTTP connections (agents' WebSockets included); more are refused with 503. Lowered at start if the descriptor limit cannot hold it (see operations.md).",
    "session_max_seconds": "A dashboard session ends this long after sign-in, however active.",
    "session_idle_seconds": "A dashboard session ends after this long without a request (checked to within a minute, or a tenth of this if less).",
    "http_read_timeout_seconds": "A request head (and a TLS handshake) must arrive whole within this, and each read of a body within it again; else the connection closes.",
    "tls_cert_file": "PEM certificate chain: with Z4J_TLS_KEY_FILE the HTTP port serves HTTPS and WSS, and the ingest port TLS (see Z4J_INGEST_TLS).",
    "tls_key_file": "PEM private key for Z4J_TLS_CERT_FILE.",
    "ingest_tls": "With Z4J_TLS_CERT_FILE set, the ingest port speaks only TLS (handshake within Z4J_INGEST_IDLE_TIMEOUT_SECONDS). false: it stays plain TCP, for clients that cannot do TLS (NightOwl's) on a trusted network.",
    "ingest_token": "When set, ingest frames must carry xxh128(token) in hex (all 32 characters, or NightOwl's first 7); a wrong one closes the connection.",
    "ingest_max_frame_bytes": "Largest accepted ingest frame, in bytes.",
    "ingest_max_inflated_bytes": "Largest size a gzip payload may inflate to, in bytes; more get 5:ERROR.",
    "ingest_idle_timeout_seconds": "Close an ingest connection idle this long.",
    "ingest_frame_timeout_seconds": "A frame must arrive whole within this time of its first byte.",
    "ingest_max_connections": "Open ingest connections; more get 5:ERROR and are closed.",
    "ingest_max_records_per_payload": "Most records one ingest payload may hold; more get 5:ERROR. Also bounds its objects and arrays (this many) and its ',' and ':' bytes (8 times this), counted before parsing.",
    "ingest_max_buffered_bytes": "Bytes of partly received ingest frames all connections together may hold (reserved at their announced size); past it, a frame waits up to 1 s for room, then gets 5:ERROR and its connection is closed.",
    "ingest_allow_no_token": "Allow ingest on a non-loopback address without Z4J_INGEST_TOKEN (refused otherwise).",
    "ingest_strict_token": "Accept only the full 32-hex-character xxh128 token hash on ingest frames, not NightOwl's 7-character form.",
    "buffer_path": "The local buffer file; one per instance (it is locked while in use).",
    "buffer_max_rows": "Buffer capacity in payloads; when full, ingest answers 5:ERROR.",
    "drain_workers": "Concurrent drain tasks moving the buffer into the store.",
    "drain_batch_rows": "Buffer rows (payloads) a drain claims per batch, at most; Z4J_DRAIN_BATCH_BYTES bounds it too.",
    "drain_batch_bytes": "Payload bytes a drain claims per batch, at most (at least one row is taken): bounds a claim's memory and its store transaction whatever the payloads' size (an agent batch of 100 events is about 33 KiB).",
    "drain_lease_seconds": "How long a drain's claim holds before others may take it.",
    "drain_linger_ms": "After a batch that reached neither Z4J_DRAIN_BATCH_ROWS nor Z4J_DRAIN_BATCH_BYTES, how long a drain waits "
    "before its next claim: the store lags ingest by up to this much, in fewer, larger "
    "transactions that leave the disk and the GIL to ingest. 0: claim at once.",
    "so_reuseport": "Set SO_REUSEPORT so several processes share the ingest and HTTP ports.",
    "instances": "Brain processes `z4j brain` runs on these settings, sharing the ports (needs Postgres and fixed ports); more than 1 starts a supervisor.",
    "gil_switch_interval_us": "`z4j brain` sets Python's GIL switch interval "
    "(sys.setswitchinterval) to this many microseconds: at Python's 5,000 the store's "
    "threads waited up to that long for the busy event loop after each SQLite step or "
    "Postgres round trip. 0: keep Python's. A program embedding the brain keeps its own.",
    "db_pool_size": "Most Postgres connections this process opens (pooled; with Z4J_DATABASE_READ_URL, as many again to the standby).",
    "db_statement_timeout_ms": "statement_timeout on every Postgres connection (0: none).",
    "database_read_url": "Postgres URL of a hot standby of Z4J_DATABASE_URL (streaming replication) that serves the API's and the dashboard's lists, searches and statistics; writes and everything else stay on the primary. Needs Z4J_DATABASE_URL. Unset: every read on the primary. See scaling.md.",
    "read_max_lag_ms": "With Z4J_DATABASE_READ_URL: while the standby may be further behind than this (or is unreachable, or was promoted), its reads go to the primary and /health/ready says why.",
    "event_retention_days": "Days of events kept before partitions are dropped.",
    "task_retention_days": "Days a task is kept after its last event (the `tasks` table; its counts go with it).",
    "task_projection": "Keep the `tasks` table (one row per task, from agents' task events) "
    "in the drain's transaction. false: store raw events only (the tasks API and page stay empty).",
    "task_stuck_seconds": "A task received or started this long ago with no later event counts as "
    "stuck (z4j_tasks_stuck); the reconciler asks its agent about it (reconcile_task).",
    "task_reconcile_seconds": "How often the leader counts stuck tasks and asks about them.",
    "shutdown_grace_seconds": "Time a graceful stop (SIGTERM/SIGINT) may take.",
    "heartbeat_seconds": "Interval of this instance's row update in `instances`.",
    "instance_name": "Name shown for this instance. Default: HOST:PID.",
    "ws_max_frame_bytes": "Largest agent WebSocket message, 1 KiB to 64 MiB; larger ones close the connection (1009).",
    "ws_per_agent_concurrency_cap": "Live workers (connections) one agent may hold; more are closed 4429.",
    "ws_heartbeat_interval_seconds": "Heartbeat interval told to agents, 1 to 3600; 3 missed intervals close (4408).",
    "ws_rate_limit_frames_per_second": "Frames one agent connection may send per second, in bursts of up to a second's worth; more close it (4429).",
    "ws_rate_limit_events_per_second": "Events one agent connection may send per second, in bursts of up to a second's worth; more close it (4429).",
    "rotation_grace_seconds": "Default grace, 0 to 2592000 (30 days), of an agent-token or signing-secret rotation (the API's grace_seconds): until it ends the old credential keeps working; then agent sessions still on it close (4401 token, 4403 secret).",
    "secret": "Master secret (32+ characters) that agent signing keys derive from. Unset: generated once into DATA_DIR/secret; replicas must share one. On the command line write `--secret=VALUE`: a value may begin with `-`.",
    "log_level": "DEBUG, INFO, WARNING or ERROR.",
    "log_format": "text or json (one object per line; lines carry peer, request_id, project, agent, worker and command_id where they apply).",
    "log_levels": "Levels of single loggers over Z4J_LOG_LEVEL, as LOGGER=LEVEL pairs separated by commas, e.g. `z4j.drain=DEBUG,hypercorn=WARNING` (a logger's level covers its children).",
    "http_access_log": "Log one line per HTTP request on logger z4j.http.access (method, path, route, status, duration, bytes, peer, request id) at INFO.",
    "registry_backend": "postgres_notify (default on Postgres: replicas share sessions, commands and the dashboard through LISTEN/NOTIFY) or local (one process; forced on SQLite).",
    "ownership_ttl_seconds": "How long a replica's claim on an agent session lasts unless renewed (renewed every third of it while the socket lives).",
    "leader_lease_seconds": "How long the maintenance leader's lease lasts unless renewed; another replica takes over within it after the leader dies.",
    "opamp_max_message_bytes": "Largest OpAMP message, both ways, after gzip is inflated; a larger request body gets 413.",
    "opamp_heartbeat_window_seconds": "An OpAMP agent not heard from for this long shows as offline (the API's `online`).",
    "opamp_bind": "HOST:PORT of a listener serving only OpAMP (`/v1/opamp`, HTTP and WebSocket) and health, e.g. `0.0.0.0:4320`, OpAMP's default port; unset: OpAMP on the HTTP port only.",
    "region_name": "This brain's region in a federation: how hubs and its own federated views label its rows, and the name a cross-region command's `confirm_region` must give.",
    "federation_peers": "Peer regions this brain federates as a hub: `NAME=URL` pairs separated by commas, e.g. `east=https://east.example:7700`. Their tokens go in Z4J_FEDERATION_PEERS_FILE, never here.",
    "federation_peers_file": "TOML file (keep it 0600) with a `[NAME]` table per peer: `token` (from `z4j federation token create` on that peer), optional `ca` (a PEM file to trust instead of the system's CAs) and `url`.",
    "federation_timeout_ms": "Deadline of each call to a peer region; one that has not answered by then shows as unreachable and the answer is marked partial.",
    "federation_cache_ms": "How long a peer's answer is reused for the same request (0: never).",
    "metrics_token": "When set (32+ characters), GET /metrics answers only `Authorization: Bearer TOKEN` (Prometheus: `authorization: {credentials: TOKEN}`), 401 otherwise. Unset: /metrics is open to whoever reaches the HTTP port, as health is; its labels name task names and queues.",
    "trusted_proxies": "Comma-separated addresses or networks of reverse proxies (e.g. `10.0.0.0/8, ::1`) whose `X-Forwarded-For` and `X-Forwarded-Proto` are believed: a request from one of them counts as from the first untrusted address in `X-Forwarded-For` (read from the right) and as https when the proxy says so (Secure cookies). Unset: every request is from its peer; see operations.md.",
    "federation_max_response_bytes": "Largest answer read from a peer (after decompression); a larger one counts as that peer failing.",
}

# Never printed in full: `z4j config` masks them (a URL keeps all but its password).
SECRET_FIELDS = frozenset(
    {"ingest_token", "database_url", "database_read_url", "secret", "metrics_token"}
)

attrs.resolve_types(Config)
FIELDS: dict[str, attrs.Attribute[Any]] = {a.name: a for a in attrs.fields(Config)}


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


# -- the converter -------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _make_converter() -> cattrs.Converter:
    """Strings from the environment and flags become typed values here.

    TOML already gives ints, floats and bools, so each hook accepts both the
    typed value and its string spelling.
    """
    conv = cattrs.Converter(forbid_extra_keys=True)

    def to_bool(value: object, _: type) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"must be true or false, got {value!r}")

    def to_int(value: object, _: type) -> int:
        if isinstance(value, bool):
            raise ValueError(f"must be a whole number, got {value!r}")
        if isinstance(value, int):
            return value
        text = str(value).strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"must be a whole number, got {value!r}") from None

    def to_float(value: object, _: type) -> float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"must be a number, got {value!r}") from None
        if math.isnan(number):
            # NaN compares false with everything, so it would pass every
            # range check and fail later, far from its variable.
            raise ValueError(f"must be a number, got {value!r}")
        return number

    def to_path(value: object, _: type) -> Path:
        if not isinstance(value, str | Path) or not str(value):
            raise ValueError(f"must be a path, got {value!r}")
        return Path(value)

    def to_str(value: object, _: type) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        return value

    conv.register_structure_hook(bool, to_bool)
    conv.register_structure_hook(int, to_int)
    conv.register_structure_hook(float, to_float)
    conv.register_structure_hook(Path, to_path)
    conv.register_structure_hook(str, to_str)
    return conv


converter = _make_converter()


def _describe(exc: BaseException) -> str:
    """Flatten a cattrs error tree into its leaf messages."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return str(exc)


def _structure_field(name: str, value: object, source: str) -> object:
    field = FIELDS[name]
    given = value.upper() if name == "log_level" and isinstance(value, str) else value
    if value == "" and _is_optional(field):
        return None
    try:
        # log_level: info, Info and INFO all mean INFO.
        typed = converter.structure(given, field.type)  # type: ignore[arg-type]
    except Exception as exc:
        hint = _describe(exc)
        if "Literal" in str(field.type) or not hint:
            hint = f"must be one of {_literal_choices(field)}, got {value!r}"
        raise ConfigError(f"{source}: {hint}") from None
    if field.validator is not None and typed is not None:
        try:
            field.validator(None, field, typed)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return typed


def _is_optional(field: attrs.Attribute[Any]) -> bool:
    return type(None) in getattr(field.type, "__args__", ())


def _literal_choices(field: attrs.Attribute[Any]) -> str:
    return ", ".join(repr(a) for a in getattr(field.type, "__args__", ()))


def load_config(
    *,
    env: Mapping[str, str] | None = None,
    file: Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build a `Config` from a TOML file, the environment and flag overrides.

    ``overrides`` holds values from command-line flags, keyed by field name;
    ``None`` values mean "flag not given". Unknown keys in the file are an
    error; unknown ``Z4J_*`` variables are logged, since agents use the
    prefix too.
    """
    env = os.environ if env is None else env
    values: dict[str, tuple[object, str]] = {}

    file = file or (Path(env["Z4J_CONFIG"]) if env.get("Z4J_CONFIG") else None)
    if file is not None:
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"config file {file}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {file}: not valid TOML: {exc}") from None
        for key, value in data.items():
            if key not in FIELDS:
                raise ConfigError(f"config file {file}: unknown setting {key!r}")
            values[key] = (value, f"{key} in {file}")

    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key in _NOT_SETTINGS:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in FIELDS:
            # Agents read Z4J_* variables of their own, and may share an
            # environment with an embedded brain: warn, do not refuse.
            logging.getLogger("z4j.config").warning(
                "ignoring %s: not a brain setting (see docs/configuration.md)", key
            )
            continue
        values[name] = (value, key)

    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = (value, "--" + name.replace("_", "-"))

    typed = {name: _structure_field(name, v, src) for name, (v, src) in values.items()}
    return Config(**typed)  # type: ignore[arg-type]


# Variables that share the prefix but are not brain settings.
_NOT_SETTINGS = frozenset(
    {
        "Z4J_CONFIG",
        "Z4J_TEST_DATABASE_URL",
        "Z4J_PG_BIN",
        "Z4J_HYPOTHESIS_PROFILE",
        "Z4J_WRITE_SCREENSHOT",
        "Z4J_ALLOW_NO_BROWSER",
        "Z4J_CHROMIUM",
        "Z4J_NGINX",
    }
)


def config_env(config: Config) -> dict[str, str]:
    """Every setting of ``config`` as a ``Z4J_*`` variable; `load_config` reads it back equal.

    How ``z4j brain --instances N`` hands its children the configuration it
    checked, whatever mix of file, environment and flags it came from.
    """
    env: dict[str, str] = {}
    for name in FIELDS:
        value = getattr(config, name)
        if value is None:
            text = ""  # "unset" for an optional setting
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[env_name(name)] = text
    return env


def _default_text(field: attrs.Attribute[Any]) -> str:
    if field.name == "buffer_path":
        return "`DATA_DIR/buffer.sqlite3`"
    if field.default is None:
        return "unset"
    if isinstance(field.default, bool):
        return f"`{str(field.default).lower()}`"
    return f"`{field.default}`"


def reference_markdown() -> str:
    """The settings table of docs/configuration.md, generated from `Config`.

    ``z4j config --reference`` prints it; a test keeps the doc in step.
    """
    lines = [
        "| Variable | Flag | Default | Meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        lines.append(f"| `{env_name(name)}` | `{flag}` | {_default_text(field)} | {HELP[name]} |")
    return "\n".join(lines) + "\n"


def check_bind_is_safe(config: Config) -> None:
    """Refuse to serve beyond loopback with a master secret nobody chose, or
    ingest there without a token (anyone could write events)."""
    if not is_loopback_bind(config.http_bind) and config.secret is None:
        raise ConfigError(
            f"Z4J_HTTP_BIND={config.http_bind} is reachable beyond this machine: set Z4J_SECRET "
            "(the master secret that admin tokens, sessions and agent tokens are keyed with) "
            "before serving on it"
        )
    if (
        not is_loopback_bind(config.ingest_bind)
        and config.ingest_token is None
        and not config.ingest_allow_no_token
    ):
        raise ConfigError(
            f"Z4J_INGEST_BIND={config.ingest_bind} is reachable beyond this machine: set "
            "Z4J_INGEST_TOKEN (clients send its hash on every frame) before serving on it, "
            "or Z4J_INGEST_ALLOW_NO_TOKEN=true to accept events from anyone who can connect"
        )
