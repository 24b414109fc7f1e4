"""The public surface of the package, pinned (as trio's test_exports does)."""

import z4j
import z4j.ingest

PUBLIC = {
    "__version__",
    "Brain",
    "BrainStats",
    "Config",
    "ConfigError",
    "load_config",
    "serve_brain",
}


def test_top_level_exports() -> None:
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
    }
    for name in z4j.ingest.__all__:
        assert hasattr(z4j.ingest, name)
