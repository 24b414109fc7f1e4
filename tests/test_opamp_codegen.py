"""The committed opamp_pb2.py and .pyi are what protoc makes of opamp.proto today.

The generated module is committed so that z4j runs without a protobuf
compiler; this test recompiles the .proto in a temporary directory with the
pinned grpcio-tools (the ``test`` extra) and compares byte for byte, so an
edit of the .proto without regenerating, or a hand edit of the output,
fails here. The command to regenerate is in the .proto's header.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import z4j

REPO = Path(z4j.__file__).resolve().parent.parent
PROTO = Path("z4j/protocol/opamp/opamp.proto")  # relative: protoc records this path
GENERATED = [PROTO.with_name("opamp_pb2.py"), PROTO.with_name("opamp_pb2.pyi")]


def test_the_generated_module_matches_the_proto(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed (pip install -e '.[test]'): cannot recompile")
    (tmp_path / PROTO).parent.mkdir(parents=True)
    shutil.copy(REPO / PROTO, tmp_path / PROTO)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--pyi_out=.",
            str(PROTO),
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    version = importlib.metadata.version("grpcio-tools")
    for path in GENERATED:
        assert (tmp_path / path).read_bytes() == (REPO / path).read_bytes(), (
            f"{path} differs from what grpcio-tools {version} makes of {PROTO}: regenerate it "
            "(the command is in the .proto's header) with the grpcio-tools pyproject.toml pins"
        )
