"""load_config: sources, precedence, and a named error for every bad value.

Every test passes ``env`` explicitly, so the developer's own ``Z4J_*``
variables cannot leak in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs
import pytest

from z4j.config import FIELDS, HELP, Config, ConfigError, env_name, load_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

NUMERIC_FIELDS = [name for name, f in FIELDS.items() if f.type in (int, float)]
POSITIVE_FIELDS = [
    "session_max_seconds",
    "session_idle_seconds",
    "ingest_max_frame_bytes",
    "ingest_max_inflated_bytes",
    "ingest_idle_timeout_seconds",
    "ingest_frame_timeout_seconds",
    "ingest_max_connections",
    "ingest_max_records_per_payload",
    "ingest_max_buffered_bytes",
    "http_max_connections",
    "http_read_timeout_seconds",
    "buffer_max_rows",
    "drain_workers",
    "drain_batch_rows",
    "drain_batch_bytes",
    "drain_lease_seconds",
    "instances",
    "db_pool_size",
    "read_max_lag_ms",
    "event_retention_days",
    "heartbeat_seconds",
    "ws_max_frame_bytes",
    "ws_per_agent_concurrency_cap",
    "ws_heartbeat_interval_seconds",
    "ws_rate_limit_frames_per_second",
    "ws_rate_limit_events_per_second",
    "ownership_ttl_seconds",
    "leader_lease_seconds",
    "task_retention_days",
    "task_stuck_seconds",
    "task_reconcile_seconds",
    "opamp_max_message_bytes",
    "opamp_heartbeat_window_seconds",
    # federation
    "federation_timeout_ms",
    "federation_max_response_bytes",
]
NON_NEGATIVE_FIELDS = [
    "db_statement_timeout_ms",
    "shutdown_grace_seconds",
    "drain_linger_ms",
    "rotation_grace_seconds",
    "gil_switch_interval_us",
    # federation
    "federation_cache_ms",
]
OPTIONAL_FIELDS = [
    "database_url",
    "ingest_token",
    "buffer_path",
    "instance_name",
    "secret",
    "tls_cert_file",
    "tls_key_file",
    # federation (federation_peers too, but a test value must be NAME=URL: test_federation_units)
    "federation_peers_file",
]


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "z4j.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return str(info.value)


# -- sources and precedence ----------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(env={})
    assert config == Config()
    assert config.data_dir == Path(".z4j")
    assert config.database_url is None
    assert not config.uses_postgres
    assert config.http_bind == "127.0.0.1:7700"
    assert config.ingest_bind == "127.0.0.1:2407"
    assert config.ingest_token is None
    assert config.ingest_max_frame_bytes == 10 * 1024 * 1024
    assert config.ingest_max_inflated_bytes == 16 * 1024 * 1024
    assert config.ingest_idle_timeout_seconds == 10.0
    assert config.buffer_max_rows == 100_000
    assert config.so_reuseport is False
    assert config.log_level == "INFO"
    assert config.log_format == "text"
    assert config.resolved_buffer_path == Path(".z4j/buffer.sqlite3")
    assert config.sqlite_store_path == Path(".z4j/store.sqlite3")


@pytest.mark.parametrize(
    ("var", "value", "field", "expected"),
    [
        ("Z4J_DATA_DIR", "/var/lib/z4j", "data_dir", Path("/var/lib/z4j")),
        ("Z4J_DATABASE_URL", "postgresql://u:p@db/z4j", "database_url", "postgresql://u:p@db/z4j"),
        ("Z4J_HTTP_BIND", "0.0.0.0:80", "http_bind", "0.0.0.0:80"),
        ("Z4J_INGEST_BIND", "[::1]:2407", "ingest_bind", "[::1]:2407"),
        ("Z4J_INGEST_BIND", "127.0.0.1:0", "ingest_bind", "127.0.0.1:0"),
        ("Z4J_INGEST_TOKEN", "s3cret", "ingest_token", "s3cret"),
        ("Z4J_INGEST_MAX_FRAME_BYTES", "1024", "ingest_max_frame_bytes", 1024),
        ("Z4J_INGEST_IDLE_TIMEOUT_SECONDS", "2.5", "ingest_idle_timeout_seconds", 2.5),
        ("Z4J_INGEST_IDLE_TIMEOUT_SECONDS", "3", "ingest_idle_timeout_seconds", 3.0),
        ("Z4J_BUFFER_PATH", "/tmp/b.sqlite3", "buffer_path", Path("/tmp/b.sqlite3")),
        ("Z4J_BUFFER_MAX_ROWS", "50000", "buffer_max_rows", 50_000),
        ("Z4J_BUFFER_MAX_ROWS", " 1_000 ", "buffer_max_rows", 1000),
        ("Z4J_DRAIN_WORKERS", "4", "drain_workers", 4),
        ("Z4J_DB_STATEMENT_TIMEOUT_MS", "0", "db_statement_timeout_ms", 0),
        ("Z4J_SHUTDOWN_GRACE_SECONDS", "0", "shutdown_grace_seconds", 0.0),
        ("Z4J_INSTANCE_NAME", "brain-1", "instance_name", "brain-1"),
        ("Z4J_LOG_LEVEL", "DEBUG", "log_level", "DEBUG"),
        ("Z4J_LOG_LEVEL", "warning", "log_level", "WARNING"),
        ("Z4J_LOG_FORMAT", "json", "log_format", "json"),
    ],
)
def test_env_overrides_default(var: str, value: str, field: str, expected: object) -> None:
    config = load_config(env={var: value})
    assert getattr(config, field) == expected
    assert type(getattr(config, field)) is type(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(v, True) for v in ("1", "true", "TRUE", "yes", "on", " On ")]
    + [(v, False) for v in ("0", "false", "False", "no", "off")],
)
def test_bool_spellings(value: str, expected: bool) -> None:
    assert load_config(env={"Z4J_SO_REUSEPORT": value}).so_reuseport is expected


def test_buffer_path_defaults_into_data_dir() -> None:
    config = load_config(env={"Z4J_DATA_DIR": "/srv/z"})
    assert config.resolved_buffer_path == Path("/srv/z/buffer.sqlite3")
    config = load_config(env={"Z4J_DATA_DIR": "/srv/z", "Z4J_BUFFER_PATH": "/fast/b"})
    assert config.resolved_buffer_path == Path("/fast/b")


def test_toml_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        data_dir = "/srv/z4j"
        database_url = "postgresql://db/z4j"
        buffer_max_rows = 50_000
        ingest_idle_timeout_seconds = 2.5
        heartbeat_seconds = 1
        so_reuseport = true
        log_format = "json"
        instance_name = "café"
        """,
    )
    config = load_config(env={}, file=path)
    assert config.data_dir == Path("/srv/z4j")
    assert config.uses_postgres
    assert config.buffer_max_rows == 50_000
    assert config.ingest_idle_timeout_seconds == 2.5
    assert config.heartbeat_seconds == 1.0
    assert config.so_reuseport is True
    assert config.log_format == "json"
    assert config.instance_name == "café"
    assert config.drain_workers == Config().drain_workers  # untouched fields keep defaults


def test_toml_file_accepts_string_spellings(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'so_reuseport = "yes"\nbuffer_max_rows = "1_000"\n')
    config = load_config(env={}, file=path)
    assert config.so_reuseport is True
    assert config.buffer_max_rows == 1000


def test_z4j_config_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "drain_workers = 7\n")
    assert load_config(env={"Z4J_CONFIG": str(path)}).drain_workers == 7
    other = tmp_path / "other.toml"
    other.write_text("drain_workers = 9\n")
    # An explicit file (--config) beats Z4J_CONFIG.
    assert load_config(env={"Z4J_CONFIG": str(path)}, file=other).drain_workers == 9


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        "buffer_max_rows = 1\ndrain_workers = 1\ndb_pool_size = 1\nlog_level = 'ERROR'\n",
    )
    env = {"Z4J_BUFFER_MAX_ROWS": "2", "Z4J_DRAIN_WORKERS": "2"}
    overrides: dict[str, object] = {
        "buffer_max_rows": 3,
        "drain_workers": None,  # flag not given
        "log_level": "DEBUG",
    }
    config = load_config(env=env, file=path, overrides=overrides)
    assert config.buffer_max_rows == 3  # flag
    assert config.drain_workers == 2  # env
    assert config.db_pool_size == 1  # file
    assert config.log_level == "DEBUG"  # flag over file
    assert config.drain_batch_rows == Config().drain_batch_rows  # default


def test_flag_values_may_be_strings() -> None:
    config = load_config(env={}, overrides={"buffer_max_rows": "42", "so_reuseport": "on"})
    assert config.buffer_max_rows == 42
    assert config.so_reuseport is True


@pytest.mark.parametrize("field", OPTIONAL_FIELDS)
def test_empty_string_for_an_optional_field_means_unset(field: str, tmp_path: Path) -> None:
    assert FIELDS[field].default is None
    assert getattr(load_config(env={env_name(field): ""}), field) is None
    # ... even when a lower-precedence source set it.
    path = write_toml(tmp_path, f'{field} = "{"something-long-enough-for-any-field" * 2}"\n')
    assert getattr(load_config(env={}, file=path), field) is not None
    assert getattr(load_config(env={env_name(field): ""}, file=path), field) is None


def test_empty_database_url_means_sqlite() -> None:
    config = load_config(env={"Z4J_DATABASE_URL": ""})
    assert config.database_url is None
    assert not config.uses_postgres


def test_config_is_frozen() -> None:
    config = load_config(env={})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.buffer_max_rows = 1  # type: ignore[misc]
    assert config.buffer_max_rows == 100_000


# -- bad values: ConfigError naming the variable ------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        # ints
        ("Z4J_BUFFER_MAX_ROWS", "lots", "must be a whole number"),
        ("Z4J_BUFFER_MAX_ROWS", "1.5", "must be a whole number"),
        ("Z4J_BUFFER_MAX_ROWS", "1e3", "must be a whole number"),
        ("Z4J_BUFFER_MAX_ROWS", "", "must be a whole number"),
        ("Z4J_DRAIN_WORKERS", "2x", "must be a whole number"),
        ("Z4J_INGEST_MAX_FRAME_BYTES", "10MiB", "must be a whole number"),
        # floats
        ("Z4J_HEARTBEAT_SECONDS", "fast", "must be a number"),
        ("Z4J_HEARTBEAT_SECONDS", "", "must be a number"),
        ("Z4J_DRAIN_LEASE_SECONDS", "30s", "must be a number"),
        ("Z4J_INGEST_IDLE_TIMEOUT_SECONDS", "nan", "must be a number"),
        ("Z4J_SHUTDOWN_GRACE_SECONDS", "NaN", "must be a number"),
        # bools
        ("Z4J_SO_REUSEPORT", "maybe", "must be true or false"),
        ("Z4J_SO_REUSEPORT", "2", "must be true or false"),
        ("Z4J_SO_REUSEPORT", "", "must be true or false"),
        # Literal fields
        ("Z4J_LOG_LEVEL", "TRACE", "must be one of 'DEBUG', 'INFO', 'WARNING', 'ERROR'"),
        ("Z4J_LOG_LEVEL", "verbose", "must be one of 'DEBUG', 'INFO', 'WARNING', 'ERROR'"),
        ("Z4J_LOG_LEVEL", "", "must be one of"),
        ("Z4J_LOG_FORMAT", "xml", "must be one of 'text', 'json'"),
        # bind addresses
        ("Z4J_HTTP_BIND", "localhost", "must look like HOST:PORT"),
        ("Z4J_HTTP_BIND", ":7700", "must look like HOST:PORT"),
        ("Z4J_HTTP_BIND", "127.0.0.1:", "must look like HOST:PORT"),
        ("Z4J_HTTP_BIND", "127.0.0.1:http", "must look like HOST:PORT"),
        ("Z4J_HTTP_BIND", "127.0.0.1:65536", "must look like HOST:PORT"),
        ("Z4J_INGEST_BIND", "127.0.0.1:-1", "must look like HOST:PORT"),
        ("Z4J_INGEST_BIND", "", "must look like HOST:PORT"),
        # paths
        ("Z4J_DATA_DIR", "", "must be a path"),
        # ranges
        ("Z4J_BUFFER_MAX_ROWS", "0", "must be greater than 0"),
        ("Z4J_BUFFER_MAX_ROWS", "-5", "must be greater than 0"),
        ("Z4J_INGEST_IDLE_TIMEOUT_SECONDS", "-0.5", "must be greater than 0"),
        ("Z4J_DB_STATEMENT_TIMEOUT_MS", "-1", "must be 0 or more"),
        ("Z4J_SHUTDOWN_GRACE_SECONDS", "-0.1", "must be 0 or more"),
    ],
)
def test_bad_env_value_names_the_variable(var: str, value: str, message: str) -> None:
    text = config_error(env={var: value})
    assert text.startswith(f"{var}: {message}"), text
    assert "got " in text, text  # and says what it got
    assert value in text.rsplit("got ", 1)[1], text


@pytest.mark.parametrize("field", POSITIVE_FIELDS)
def test_zero_is_refused_where_positive_is_required(field: str) -> None:
    var = env_name(field)
    assert config_error(env={var: "0"}).startswith(f"{var}: must be greater than 0")


@pytest.mark.parametrize("field", NON_NEGATIVE_FIELDS)
def test_zero_is_accepted_where_non_negative_is_required(field: str) -> None:
    assert getattr(load_config(env={env_name(field): "0"}), field) == 0


def test_the_range_lists_cover_every_numeric_field() -> None:
    assert sorted(POSITIVE_FIELDS + NON_NEGATIVE_FIELDS) == sorted(NUMERIC_FIELDS)


@pytest.mark.parametrize("field", NUMERIC_FIELDS)
def test_negative_is_refused_for_every_numeric_field(field: str) -> None:
    var = env_name(field)
    text = config_error(env={var: "-1"})
    assert text.startswith(f"{var}: must be "), text


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('buffer_max_rows = "lots"', "buffer_max_rows in {file}: must be a whole number"),
        ("buffer_max_rows = 2.0", "buffer_max_rows in {file}: must be a whole number"),
        ("buffer_max_rows = true", "buffer_max_rows in {file}: must be a whole number"),
        ("buffer_max_rows = 0", "buffer_max_rows in {file}: must be greater than 0"),
        ("heartbeat_seconds = true", "heartbeat_seconds in {file}: must be a number"),
        ("heartbeat_seconds = nan", "heartbeat_seconds in {file}: must be a number"),
        ('so_reuseport = "maybe"', "so_reuseport in {file}: must be true or false"),
        ("instance_name = 5", "instance_name in {file}: must be a string"),
        ('log_level = "loud"', "log_level in {file}: must be one of"),
        ("log_level = 5", "log_level in {file}: must be one of"),
        ('http_bind = "nowhere"', "http_bind in {file}: must look like HOST:PORT"),
        ("data_dir = 5", "data_dir in {file}: must be a path"),
    ],
)
def test_bad_file_value_names_the_key_and_file(tmp_path: Path, toml: str, message: str) -> None:
    path = write_toml(tmp_path, toml + "\n")
    assert config_error(env={}, file=path).startswith(message.format(file=path))


def test_bad_flag_value_names_the_flag() -> None:
    text = config_error(env={}, overrides={"buffer_max_rows": "lots"})
    assert text == "--buffer-max-rows: must be a whole number, got 'lots'"
    text = config_error(env={}, overrides={"ingest_bind": "nope"})
    assert text.startswith("--ingest-bind: must look like HOST:PORT")


def test_error_names_only_the_bad_variable() -> None:
    text = config_error(env={"Z4J_DRAIN_WORKERS": "3", "Z4J_BUFFER_MAX_ROWS": "lots"})
    assert text.startswith("Z4J_BUFFER_MAX_ROWS: ")
    assert "DRAIN_WORKERS" not in text


def test_unknown_key_in_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "buffer_max_rows = 5\nbuffer_max_rowz = 5\n")
    text = config_error(env={}, file=path)
    assert "'buffer_max_rowz'" in text
    assert str(path) in text
    path = write_toml(tmp_path, "[ingest]\nbind = '0.0.0.0:1'\n")
    assert "'ingest'" in config_error(env={}, file=path)
    # The file takes setting names, not variable names.
    path = write_toml(tmp_path, "Z4J_BUFFER_MAX_ROWS = 5\n")
    assert "'Z4J_BUFFER_MAX_ROWS'" in config_error(env={}, file=path)


def test_unreadable_or_invalid_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert str(missing) in config_error(env={}, file=missing)
    assert str(missing) in config_error(env={"Z4J_CONFIG": str(missing)})
    assert str(tmp_path) in config_error(env={}, file=tmp_path)  # a directory
    bad = write_toml(tmp_path, "buffer_max_rows = = 5\n")
    assert config_error(env={}, file=bad).startswith(f"config file {bad}: not valid TOML")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'instance_name = "caf\xe9"\n')  # TOML must be UTF-8
    assert config_error(env={}, file=latin1).startswith(f"config file {latin1}: not valid TOML")


def test_unknown_z4j_variable_is_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    env = {
        "Z4J_BUFFER_MAX_ROWZ": "5",
        "Z4J_AGENT_NAME": "web-1",
        "Z4J_CONFIG": "",
        "Z4J_TEST_DATABASE_URL": "postgresql://x/y",
        "PATH": "/usr/bin",
        "NIGHTOWL_TOKEN": "x",
    }
    with caplog.at_level(logging.WARNING, logger="z4j.config"):
        config = load_config(env=env)
    assert config == Config()
    warned = " ".join(r.getMessage() for r in caplog.records if r.name == "z4j.config")
    assert "Z4J_BUFFER_MAX_ROWZ" in warned
    assert "Z4J_AGENT_NAME" in warned
    # Names that are not settings but are known, and other prefixes: no noise.
    for quiet in ("Z4J_CONFIG", "Z4J_TEST_DATABASE_URL", "PATH", "NIGHTOWL_TOKEN"):
        assert quiet not in warned
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "z4j.config")


def test_known_variables_are_not_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="z4j.config"):
        load_config(env={"Z4J_DRAIN_WORKERS": "3", "Z4J_LOG_LEVEL": "DEBUG"})
    assert [r for r in caplog.records if r.name == "z4j.config"] == []


# -- help and docs ---------------------------------------------------------------------------


def test_every_field_has_help() -> None:
    assert set(HELP) == set(FIELDS)
    for name, text in HELP.items():
        assert text.strip(), name


def test_every_variable_is_in_the_configuration_page() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [env_name(name) for name in FIELDS if f"`{env_name(name)}`" not in text]
    assert missing == [], f"docs/configuration.md does not mention {missing}"


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("Z4J_WS_HEARTBEAT_INTERVAL_SECONDS", "4000", "must be between 1 and 3600"),
        ("Z4J_WS_MAX_FRAME_BYTES", "100", "must be between 1024 and 67108864"),
    ],
)
def test_agent_settings_stay_within_what_hello_ack_can_carry(
    var: str, value: str, message: str
) -> None:
    assert config_error(env={var: value}).startswith(f"{var}: {message}")
