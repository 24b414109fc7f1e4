"""Developer sessions: ``nox -s tests lint types property conformance bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "types"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (what CI runs), with the fast Hypothesis profile."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def property(session: nox.Session) -> None:
    """Property tests with more examples (profile ``ci``; ``-- deep`` for long runs)."""
    session.install("-e", ".[test]")
    profile = session.posargs[0] if session.posargs else "ci"
    session.run("pytest", "property_tests", env={"Z4J_HYPOTHESIS_PROFILE": profile})


@nox.session
def conformance(session: nox.Session) -> None:
    """The protocol conformance suite against ``z4j brain`` processes (``ci``; ``-- deep``).

    Starts a brain, a brain whose store is down and one with a low frame rate
    limit, provisions agents and an OpAMP token, and runs ``python -m
    property_tests`` against them (OpAMP included); see docs/conformance.md.
    """
    session.install("-e", ".[test]")
    profile = session.posargs[0] if session.posargs else "ci"
    session.run("python", "-m", "property_tests.conformance.against_z4j", "--profile", profile)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def types(session: nox.Session) -> None:
    session.install("-e", ".[test]", "mypy", "types-protobuf", "types-PyYAML")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks: figures and ratios to ceilings measured in the same run."""
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/ingest.py", *session.posargs)
    session.run("python", "benchmarks/drain.py", *session.posargs)
    session.run("python", "benchmarks/agents.py", *session.posargs)
    session.run("python", "benchmarks/tasks.py", *session.posargs)
