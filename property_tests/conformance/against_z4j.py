"""Start our brain as a process and run ``python -m property_tests`` against it.

This is what ``nox -s conformance`` runs, and what a person would do by
hand (docs/conformance.md): three ``z4j brain`` processes, one normal, one
whose store is down (its buffer only fills, for the backpressure rule) and
one whose frame rate limit is low (for the frame rate check), an agent
provisioned in the first and the third one's stores, an OpAMP token in the
first one's, and the suite's command line with every hook pointed at the
first one's store.

    python -m property_tests.conformance.against_z4j [--profile ci] [--database-url URL]
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import trio

from z4j.config import load_config
from z4j.testing.agents import provision
from z4j.testing.brain import BrainProcess

from .profiles import PROFILES
from .z4j_brain import BACKPRESSURE_CAPACITY, DOWN_STORE_URL, LIMITS, RATE_LIMITS, opamp_token

__all__ = ["main", "suite_command"]

REPO = Path(__file__).resolve().parents[2]
# The test brains' limits (the CLI is told the same), on ports of their own.
BRAIN_SETTINGS = {
    "Z4J_INGEST_BIND": "127.0.0.1:0",
    "Z4J_HTTP_BIND": "127.0.0.1:0",
    **{f"Z4J_{name.upper()}": str(value) for name, value in LIMITS.items()},
}
RATE_SETTINGS = {
    **BRAIN_SETTINGS,
    **{f"Z4J_{name.upper()}": str(value) for name, value in RATE_LIMITS.items()},
}


def suite_command(
    *,
    agent_url: str,
    token: str,
    secret: str,
    ingest: str,
    backpressure_ingest: str,
    rate: tuple[str, str, str],
    env: dict[str, str],
    profile: str,
    max_examples: int | None,
    opamp: tuple[str, str] | None = None,
) -> list[str]:
    """The ``python -m property_tests`` command line for brains started with ``env``.

    ``rate`` is the frame rate brain's agent URL, token and secret; it runs
    with `RATE_SETTINGS`. ``opamp`` is the first brain's OpAMP URL and a token.
    """
    rate_url, rate_token, rate_secret = rate
    command = [
        *(sys.executable, "-m", "property_tests"),
        f"--agent-url={agent_url}",
        # "=" keeps a value that starts with "-" (base64url can) from reading as an option.
        f"--token={token}",
        f"--secret={secret}",
        f"--ingest={ingest}",
        f"--worker-cap={env['Z4J_WS_PER_AGENT_CONCURRENCY_CAP']}",
        f"--rate-agent-url={rate_url}",
        f"--rate-token={rate_token}",
        f"--rate-secret={rate_secret}",
        f"--frames-per-second={RATE_SETTINGS['Z4J_WS_RATE_LIMIT_FRAMES_PER_SECOND']}",
        f"--events-per-second={env['Z4J_WS_RATE_LIMIT_EVENTS_PER_SECOND']}",
        f"--max-inflated-bytes={env['Z4J_INGEST_MAX_INFLATED_BYTES']}",
        f"--backpressure-ingest={backpressure_ingest}",
        f"--backpressure-capacity={BACKPRESSURE_CAPACITY}",
        *("--z4j-store", "--check-revocation", f"--profile={profile}"),
    ]
    if opamp is not None:
        url, token = opamp
        limit = env.get("Z4J_OPAMP_MAX_MESSAGE_BYTES")
        command += [f"--opamp-url={url}", f"--opamp-token={token}", "--z4j-opamp"]
        if limit is not None:
            command.append(f"--opamp-max-message-bytes={limit}")
    if max_examples is not None:
        command.append(f"--max-examples={max_examples}")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m property_tests.conformance.against_z4j")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="fast")
    parser.add_argument("--max-examples", type=int, help="examples per state machine")
    parser.add_argument("--database-url", help="a Postgres database for the brain's store")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="z4j-conformance-") as tmp, ExitStack() as stack:
        env = {
            **BRAIN_SETTINGS,
            "Z4J_DATA_DIR": f"{tmp}/data",
            "Z4J_SECRET": secrets.token_urlsafe(48),
        }
        if args.database_url:
            env["Z4J_DATABASE_URL"] = args.database_url
        full_env = {
            **BRAIN_SETTINGS,
            "Z4J_DATA_DIR": f"{tmp}/full",
            "Z4J_DATABASE_URL": DOWN_STORE_URL,
            "Z4J_BUFFER_MAX_ROWS": str(BACKPRESSURE_CAPACITY),
        }
        brain = BrainProcess(env, log_path=Path(tmp) / "brain.log")
        stack.callback(brain.stop, 15)
        full = BrainProcess(full_env, log_path=Path(tmp) / "full.log")
        stack.callback(full.stop, 15)
        rate_env = {
            **RATE_SETTINGS,
            "Z4J_DATA_DIR": f"{tmp}/rate",
            "Z4J_SECRET": secrets.token_urlsafe(48),
        }
        rate_brain = BrainProcess(rate_env, log_path=Path(tmp) / "rate.log")
        stack.callback(rate_brain.stop, 15)
        token, secret, _ = trio.run(
            functools.partial(provision, load_config(env=env), project="conformance")
        )
        token_opamp = trio.run(opamp_token, load_config(env=env), "conformance-opamp")
        rate_token, rate_secret, _ = trio.run(
            functools.partial(provision, load_config(env=rate_env), project="conformance")
        )
        command = suite_command(
            agent_url="ws://{}:{}/ws/agent".format(*brain.http),
            token=token,
            secret=secret,
            ingest="{}:{}".format(*brain.ingest),
            backpressure_ingest="{}:{}".format(*full.ingest),
            rate=("ws://{}:{}/ws/agent".format(*rate_brain.http), rate_token, rate_secret),
            env=env,
            profile=args.profile,
            max_examples=args.max_examples,
            opamp=("http://{}:{}/v1/opamp".format(*brain.http), token_opamp),
        )
        print("$", " ".join(command), flush=True)
        suite_env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
        suite_env.update(env)  # --z4j-store reads the brain's own settings
        return subprocess.run(command, cwd=REPO, env=suite_env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
