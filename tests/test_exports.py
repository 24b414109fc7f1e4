"""The public surface of the package, pinned (as trio's test_exports does)."""

import importlib

import z4j
import z4j.agent
import z4j.ingest
import z4j.testing
import z4j.testing.brain
import z4j.testing.http

PUBLIC = {
    "__version__",
    "Brain",
    "BrainStats",
    "CommandError",
    "Config",
    "ConfigError",
    "load_config",
    "serve_brain",
}


def test_top_level_exports() -> None:
    # Imported on first use (z4j/__init__.py): touch each, then look at what is there.
    assert set(z4j.__all__) == PUBLIC
    for name in z4j.__all__:
        getattr(z4j, name)
    exported = {name for name in vars(z4j) if not name.startswith("_")} | {"__version__"}
    # Submodules appear as attributes once imported; they are not re-exports.
    modules = {name for name in exported if type(getattr(z4j, name)).__name__ == "module"}
    assert exported - modules == PUBLIC


def test_ingest_client_exports() -> None:
    assert set(z4j.ingest.__all__) == {
        "IngestClient",
        "TrioIngestClient",
        "IngestRejected",
        "IngestConnectionError",
        "connect",
        "open_trio",
        "encode_payload",
        "RETRY_SECONDS",
    }
    for name in z4j.ingest.__all__:
        assert hasattr(z4j.ingest, name)


def test_agent_library_exports() -> None:
    assert set(z4j.agent.__all__) == {
        "Agent",
        "AgentStatistics",
        "Backoff",
        "CommandHandler",
        "SpoolFull",
    }
    for name in z4j.agent.__all__:
        assert hasattr(z4j.agent, name)
    # Documented in Agent.emit, importable though not in __all__.
    assert z4j.agent.MAX_EVENT_BYTES == 512 * 1024
    # The classes read as z4j.agent's, not as the internal module's.
    assert z4j.agent.SpoolFull.__module__ == "z4j.agent"


TESTING = {
    "SERVED_WITHIN",
    "BrainProcess",
    "CancelAtStep",
    "ExternalPostgres",
    "HttpReply",
    "OpampClosed",
    "OpampRejected",
    "OpampSocket",
    "PostgresCluster",
    "Probe",
    "RawAgent",
    "RunningBrain",
    "StoredEvent",
    "admin_token",
    "answer_activation",
    "assert_served",
    "body_contains",
    "buffer_rows",
    "control_event",
    "draining",
    "find_pg_bin",
    "health_live",
    "http_get",
    "http_request",
    "ingest_ping",
    "json_of",
    "make_config",
    "open_store",
    "opamp_socket",
    "opamp_token",
    "provision",
    "publish_events",
    "query",
    "raw_agent",
    "read_events",
    "read_until_closed",
    "run_z4j",
    "running_brain",
    "schedule_row",
    "seed_events",
    "snapshot_events",
    "stored_events",
    "wait_until",
    "watch",
    "watching",
}

TESTING_MODULES = (
    "abuse",
    "agents",
    "brain",
    "cancel",
    "drain",
    "event_search",
    "http",
    "opamp",
    "postgres",
    "schedules",
    "store",
)


def test_testing_exports() -> None:
    assert set(z4j.testing.__all__) == TESTING
    for name in TESTING:
        assert hasattr(z4j.testing, name), name


def test_testing_modules_export_only_what_the_package_does() -> None:
    """Each helper has one home module, re-exported by the package as the same object;
    the module paths tests and users already import from keep working."""
    homes: dict[str, str] = {}
    for module_name in TESTING_MODULES:
        module = importlib.import_module(f"z4j.testing.{module_name}")
        for name in module.__all__:
            assert name in TESTING, f"z4j.testing.{module_name}.{name} is not re-exported"
            assert getattr(module, name) is getattr(z4j.testing, name)
            homes.setdefault(name, module_name)
    assert set(homes) == TESTING
    # http_get moved to .http; its first home still offers it.
    assert z4j.testing.brain.http_get is z4j.testing.http.http_get
