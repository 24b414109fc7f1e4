"""``python -m property_tests``: run the conformance suite against a running brain.

    python -m property_tests --agent-url ws://127.0.0.1:7700/ws/agent \\
        --token z4j_… --secret=… --ingest 127.0.0.1:2407 [--profile ci]
    python -m property_tests --opamp-url http://127.0.0.1:7700/v1/opamp --opamp-token z4j_opamp_…

Exit status: 0 when every rule that could be checked held, 1 when one
failed, 2 for a usage error. See docs/conformance.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypothesis import settings

from .portal import TrioPortal
from .profiles import PROFILES, register_profiles
from .runner import Outcome, Suite, find_violation, rule_results, run_suite
from .target import AgentTarget, Hooks, IngestTarget, OpampTarget, shell_hooks

__all__ = ["main"]


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m property_tests",
        description="Check a running brain against agent protocol v2 and ingest protocol v1, "
        "and any OpAMP server against the OpAMP specification.",
        epilog="Rules that need something the target does not give are skipped, and said so.",
    )
    target = parser.add_argument_group("the target")
    target.add_argument("--agent-url", help="ws://HOST:PORT/ws/agent")
    target.add_argument("--token", help="an agent's token (use an agent of its own)")
    target.add_argument("--secret", help="that agent's project signing secret")
    target.add_argument("--ingest", type=_address, help="the ingest port, HOST:PORT")
    target.add_argument("--ingest-token", help="the ingest token, if the brain has one")
    opamp = parser.add_argument_group("OpAMP: any server's plain HTTP transport")
    opamp.add_argument(
        "--opamp-url", help="the OpAMP endpoint, http[s]://HOST:PORT/v1/opamp (any OpAMP server)"
    )
    opamp.add_argument(
        "--opamp-token",
        help="a bearer token it accepts (a project of its own: the suite makes agents there); "
        "without one, no Authorization is sent and the 401 rule is skipped",
    )
    opamp.add_argument(
        "--opamp-max-message-bytes",
        type=int,
        default=10 * 1024 * 1024,
        help="the server's message limit, for the 413 rule (default 10 MiB)",
    )
    opamp.add_argument(
        "--z4j-opamp",
        action="store_true",
        help="the OpAMP server is a z4j brain: also check z4j's own policy (its exact "
        "ReportFullState cycle, BAD_REQUEST with HTTP 200)",
    )
    limits = parser.add_argument_group("what the target's limits are (to check them)")
    limits.add_argument("--worker-cap", type=int, default=64, help="workers per agent (0: unknown)")
    limits.add_argument(
        "--frames-per-second",
        type=int,
        help="agent frame rate limit (of the --rate-agent-url brain, if given); at most 10",
    )
    limits.add_argument("--events-per-second", type=int, help="agent event rate limit")
    limits.add_argument("--max-frame-bytes", type=int, default=10 * 1024 * 1024, help="ingest")
    limits.add_argument("--max-inflated-bytes", type=int, help="ingest gzip inflate limit")
    limits.add_argument(
        "--max-idle-wait", type=float, default=40.0, help="longest wait for the 4408 check (s)"
    )
    rate = parser.add_argument_group(
        "frame rate: a brain whose limit is low (the suite's own traffic would exceed it)"
    )
    rate.add_argument("--rate-agent-url", help="its ws://HOST:PORT/ws/agent")
    rate.add_argument("--rate-token", help="an agent's token there")
    rate.add_argument("--rate-secret", help="that agent's project signing secret")
    full = parser.add_argument_group("backpressure: a second brain whose drains do not run")
    full.add_argument("--backpressure-ingest", type=_address, help="its ingest port, HOST:PORT")
    full.add_argument("--backpressure-capacity", type=int, help="its Z4J_BUFFER_MAX_ROWS")
    hooks = parser.add_argument_group("hooks: what the sockets cannot show")
    hooks.add_argument(
        "--z4j-store",
        action="store_true",
        help="the target is a z4j brain whose store this machine reaches with the same "
        "Z4J_* settings (or --data-dir, --database-url): read events, mint and revoke there",
    )
    hooks.add_argument("--data-dir", type=Path, help="with --z4j-store: the brain's data dir")
    hooks.add_argument("--database-url", help="with --z4j-store: the brain's Postgres URL")
    hooks.add_argument("--events-command", help="prints stored events (JSON array or lines)")
    hooks.add_argument("--mint-command", help="mints a command: {agent_id} {action} {parameters}")
    hooks.add_argument("--state-command", help="prints a command as JSON with 'state': {id}")
    hooks.add_argument("--revoke-command", help="revokes an agent: {agent_id}")
    hooks.add_argument(
        "--opamp-config-command",
        help="makes the OpAMP server want an agent to run a new configuration: "
        "{instance_uid} (hex); may print its hash (hex)",
    )
    hooks.add_argument(
        "--check-revocation",
        action="store_true",
        help="revoke the agent at the end and check 4003 (the token is dead afterwards)",
    )
    run = parser.add_argument_group("the run")
    run.add_argument("--profile", choices=sorted(PROFILES), default="fast")
    run.add_argument(
        "--max-examples", type=int, help="examples per state machine (default: from the profile)"
    )
    return parser


def _hooks(args: argparse.Namespace) -> Hooks:
    shell = shell_hooks(
        events=args.events_command,
        mint=args.mint_command,
        state=args.state_command,
        revoke=args.revoke_command,
        opamp_config=args.opamp_config_command,
    )
    if not args.z4j_store:
        return shell
    from z4j.config import load_config

    from .z4j_hooks import opamp_config_hook, store_hooks

    overrides: dict[str, Any] = {}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.database_url is not None:
        overrides["database_url"] = args.database_url
    config = load_config(env=os.environ, overrides=overrides)
    z4j = store_hooks(config)
    opamp_config = shell.opamp_config
    if opamp_config is None and args.opamp_url and args.opamp_token:
        # Pushed through the brain's API on the port the OpAMP URL names.
        base = args.opamp_url.split("/v1/opamp", 1)[0]
        opamp_config = opamp_config_hook(config, args.opamp_token, api=base)
    # Command lines given explicitly win over the store.
    return Hooks(
        stored_events=shell.stored_events or z4j.stored_events,
        drained=z4j.drained if shell.stored_events is None else None,
        mint_command=shell.mint_command or z4j.mint_command,
        command_state=shell.command_state or z4j.command_state,
        cancel_command=z4j.cancel_command,
        revoke_agent=shell.revoke_agent or z4j.revoke_agent,
        opamp_config=opamp_config,
    )


def _suite(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Suite:
    agent = rate_agent = ingest = backpressure = opamp = None
    if args.opamp_url:
        try:
            opamp = OpampTarget.from_url(
                args.opamp_url,
                token=args.opamp_token,
                max_message_bytes=args.opamp_max_message_bytes,
                z4j_policy=args.z4j_opamp,
            )
        except ValueError as exc:
            parser.error(str(exc))
    if args.rate_agent_url:
        if not (args.rate_token and args.rate_secret):
            parser.error("--rate-agent-url needs --rate-token and --rate-secret")
        try:
            rate_agent = AgentTarget.from_url(
                args.rate_agent_url,
                token=args.rate_token,
                secret=args.rate_secret,
                frames_per_second=args.frames_per_second,
            )
        except ValueError as exc:
            parser.error(str(exc))
    if args.agent_url:
        if not (args.token and args.secret):
            parser.error("--agent-url needs --token and --secret")
        try:
            agent = AgentTarget.from_url(
                args.agent_url,
                token=args.token,
                secret=args.secret,
                worker_cap=args.worker_cap or None,
                frames_per_second=None if rate_agent else args.frames_per_second,
                events_per_second=args.events_per_second,
                max_idle_wait=args.max_idle_wait,
            )
        except ValueError as exc:
            parser.error(str(exc))
    if args.ingest:
        host, port = args.ingest
        ingest = IngestTarget(
            host=host,
            port=port,
            token=args.ingest_token,
            max_frame_bytes=args.max_frame_bytes,
            max_inflated_bytes=args.max_inflated_bytes,
        )
    if args.backpressure_ingest:
        if not args.backpressure_capacity:
            parser.error("--backpressure-ingest needs --backpressure-capacity")
        host, port = args.backpressure_ingest
        backpressure = IngestTarget(
            host=host,
            port=port,
            token=args.ingest_token,
            max_frame_bytes=args.max_frame_bytes,
            capacity=args.backpressure_capacity,
        )
    if agent is None and ingest is None and backpressure is None and opamp is None:
        parser.error(
            "give at least one target: --agent-url, --ingest, --backpressure-ingest, --opamp-url"
        )
    checks: tuple[str, ...] = ("idle-4408", "worker-cap-4429", "rate-limit-4429")
    if args.check_revocation:
        checks += ("revoked-4003",)
    return Suite(
        agent=agent,
        rate_agent=rate_agent,
        ingest=ingest,
        backpressure=backpressure,
        opamp=opamp,
        hooks=_hooks(args),
        checks=checks,
    )


def _report(outcome: Outcome) -> None:
    if outcome.skipped:
        print(f"{outcome.part}: skipped ({outcome.skipped})", flush=True)
        return
    result = "passed" if outcome.failure is None else "FAILED"
    print(f"{outcome.part}: {result} in {outcome.seconds:.1f}s", flush=True)
    if outcome.failure is None:
        return
    violation = find_violation(outcome.failure)
    print()
    if violation is None:  # not the target breaking a rule: a crash of the suite or harness
        traceback.print_exception(outcome.failure)
    else:
        print(violation)
        steps = [n for n in getattr(outcome.failure, "__notes__", []) if n]
        if steps:
            print("\nthe steps Hypothesis shrank it to:\n  " + "\n  ".join(steps))
    print(flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    suite = _suite(args, parser)
    register_profiles()
    settings.load_profile(args.profile)
    print(f"conformance suite, profile {args.profile}", flush=True)
    portal = TrioPortal()
    try:
        outcomes = run_suite(suite, portal, max_examples=args.max_examples, report=_report)
    finally:
        portal.close()
    results = rule_results(suite, outcomes)
    width = max(len(name) for name, _, _ in results)
    print("\nrule by rule:")
    for name, result, detail in results:
        print(f"  {name:<{width}}  {result:<11}  {detail}")
    failed = [name for name, result, _ in results if result == "FAILED"]
    crashed = [o for o in outcomes if o.failure is not None and find_violation(o.failure) is None]
    if failed or crashed:
        rules = "rule" if len(failed) == 1 else "rules"
        print(f"\n{len(failed)} {rules} failed" + (", and the suite crashed" if crashed else ""))
        return 1
    print("\nno rule failed")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
