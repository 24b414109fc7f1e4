"""The release artefacts: build the sdist and wheel as a release would, install
the wheel into a fresh virtual environment, and run ``z4j brain`` from it.

What this guards: the wheel carries everything the brain reads at run time
(the dashboard's static files, OpAMP's .proto, py.typed), the metadata says
what docs/install.md says (the distribution name, the licence, the extras),
and the runtime dependencies are enough to start a brain and no more (the
conformance suite's Hypothesis is an extra). The build runs on a copy of the
checkout so the test leaves no egg-info behind.
"""

from __future__ import annotations

import email
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Files the brain opens at run time, by their path inside the wheel.
RUNTIME_FILES = (
    "z4j/py.typed",
    "z4j/static/index.html",
    "z4j/static/app.js",
    "z4j/static/app.css",
    "z4j/static/login.html",
    "z4j/protocol/opamp/opamp.proto",
    "z4j/store/migrations.py",
)


def _source_copy(dest: Path) -> Path:
    """The checkout's files (as a clean clone has them), without build leftovers."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if listed.returncode == 0:
        for name in listed.stdout.splitlines():
            source = ROOT / name
            if source.is_file() and "node_modules" not in source.parts:
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    else:  # not a git checkout (an unpacked sdist): copy what is there
        shutil.copytree(
            ROOT,
            dest,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(
                ".git", "*.egg-info", "__pycache__", ".z4j", "node_modules", "dist", "build"
            ),
        )
    return dest


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build``: the sdist, then the wheel built from that sdist."""
    work = tmp_path_factory.mktemp("build")
    source = _source_copy(work / "src")
    out = work / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def _wheel(dist: Path) -> Path:
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_carries_runtime_files_and_says_what_it_is(dist: Path) -> None:
    wheel = _wheel(dist)
    assert wheel.name.startswith("z4j_trio-"), wheel.name
    assert len(list(dist.glob("z4j_trio-*.tar.gz"))) == 1
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [name for name in RUNTIME_FILES if name not in names]
        assert not missing, f"the wheel lacks {missing}"
        assert not [n for n in names if n.startswith(("tests/", "property_tests/"))]
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
        metadata = email.message_from_bytes(zf.read(metadata_name))
        entry_points = zf.read(metadata_name.replace("METADATA", "entry_points.txt")).decode()
    assert metadata["Name"] == "z4j-trio"
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "z4j = z4j.cli:main" in entry_points
    requires = metadata.get_all("Requires-Dist") or []
    runtime = [r for r in requires if "extra ==" not in r]
    assert not [r for r in runtime if r.lower().startswith("hypothesis")], runtime
    assert any(r.startswith("hypothesis") and 'extra == "conformance"' in r for r in requires)
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert {"conformance", "test", "dev"} <= extras
    for extra in extras:  # no empty extras
        assert any(f'extra == "{extra}"' in r for r in requires), extra
    assert metadata["Requires-Python"] == ">=3.11"
    assert any(u.startswith("Changelog,") for u in metadata.get_all("Project-URL") or [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_a_brain(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            str(_wheel(dist)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    # Runtime dependencies only: the conformance suite's Hypothesis stays out.
    probe = subprocess.run([str(python), "-c", "import hypothesis"], capture_output=True)
    assert probe.returncode != 0

    http = f"127.0.0.1:{_free_port()}"
    env = {
        "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "Z4J_DATA_DIR": str(tmp_path / "data"),
        "Z4J_HTTP_BIND": http,
        "Z4J_INGEST_BIND": f"127.0.0.1:{_free_port()}",
    }
    log = (tmp_path / "brain.log").open("wb")
    # From another directory, so the checkout's z4j/ cannot stand in for the wheel's.
    brain = subprocess.Popen(
        [str(venv / "bin" / "z4j"), "brain"], cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 120  # a hang bound, not a speed claim
        while _status(f"http://{http}/health/ready") != 200:
            assert brain.poll() is None, (tmp_path / "brain.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "brain.log").read_text()[-3000:]
            time.sleep(0.2)
        # The dashboard is served from the installed package's files.
        assert _status(f"http://{http}/") == 200
        origin = subprocess.run(
            [str(python), "-c", "import z4j, sys; sys.stdout.write(z4j.__file__)"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        assert str(venv) in origin.stdout, origin.stdout
    finally:
        brain.send_signal(signal.SIGTERM)
        try:
            code = brain.wait(timeout=60)
        except subprocess.TimeoutExpired:
            brain.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "brain.log").read_text()[-3000:]


def test_brain_warns_when_the_original_distribution_shares_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from z4j import cli

    cli._warn_if_original_installed()
    assert "original z4j brain" not in caplog.text  # not installed here
    # What pip leaves for an installed 'z4j' distribution: its metadata directory.
    info = tmp_path / "z4j-1.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: z4j\nVersion: 1.13.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cli._warn_if_original_installed()
    assert "the original z4j brain" in caplog.text
    assert "docs/install.md" in caplog.text
