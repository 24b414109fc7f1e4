"""Run the whole suite against one target and say, rule by rule, how it went.

`run_suite` runs the agent machine, the ingest machine, the backpressure
machine, the OpAMP machine and the one-off checks that the target makes possible, each to its
first failure. `rule_results` turns that into one line per rule: passed
(and how many checks), failed, skipped (and what it would need), or not
reached.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager

import attrs
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from .agent_machine import agent_machine
from .checks import CHECKS
from .ingest_machine import ingest_machine
from .opamp_machine import opamp_machine
from .portal import TrioPortal
from .profiles import machine_settings
from .rules import RULES
from .target import AgentTarget, Hooks, IngestTarget, OpampTarget, Timeouts
from .transcript import Transcript, Violation

__all__ = [
    "Outcome",
    "Suite",
    "all_violations",
    "find_violation",
    "rule_results",
    "run_machine",
    "run_suite",
]


@attrs.frozen(kw_only=True)
class Suite:
    """What to run: the targets there are, the hooks, and the one-off checks wanted."""

    agent: AgentTarget | None = None
    ingest: IngestTarget | None = None
    # A brain whose drains do not run; a factory gives a fresh one per example.
    backpressure: IngestTarget | Callable[[], AbstractContextManager[IngestTarget]] | None = None
    # For the frame rate check: a brain whose frame rate limit is low (the
    # machine's own traffic would trip it), or None for ``agent`` itself.
    rate_agent: AgentTarget | None = None
    opamp: OpampTarget | None = None
    hooks: Hooks = attrs.field(factory=Hooks)
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    # Add "revoked-4003" to revoke.
    checks: tuple[str, ...] = ("idle-4408", "worker-cap-4429", "rate-limit-4429")

    def check_target(self, check: str) -> AgentTarget | None:
        if check == "rate-limit-4429" and self.rate_agent is not None:
            return self.rate_agent
        return self.agent


@attrs.define
class Outcome:
    """How one part of the suite (a machine or a check) went."""

    part: str
    protocol: str
    seconds: float = 0.0
    failure: BaseException | None = None
    skipped: str | None = None
    exercised: Counter[str] = attrs.field(factory=Counter)


def all_violations(error: BaseException | None) -> list[Violation]:
    """Every Violation in ``error``: Hypothesis groups distinct failures (and Flaky ones)."""
    if isinstance(error, Violation):
        return [error]
    if isinstance(error, BaseExceptionGroup):
        return [v for inner in error.exceptions for v in all_violations(inner)]
    return []


def find_violation(error: BaseException | None) -> Violation | None:
    """The first Violation in ``error``, if any."""
    found = all_violations(error)
    return found[0] if found else None


def run_machine(machine: type[RuleBasedStateMachine], settings: settings) -> None:
    """`run_state_machine_as_test`, typed."""
    run_state_machine_as_test(machine, settings=settings)  # type: ignore[no-untyped-call]


def run_suite(
    suite: Suite,
    portal: TrioPortal,
    *,
    base: settings | None = None,
    max_examples: int | None = None,
    report: Callable[[Outcome], None] = lambda outcome: None,
) -> list[Outcome]:
    """Every part the suite can run against its targets, in order; each reported as it ends.

    ``base`` is the Hypothesis profile (the loaded one by default); each
    machine runs its share of it, or ``max_examples`` if given.
    """
    overrides = {} if max_examples is None else {"max_examples": max_examples}
    outcomes: list[Outcome] = []

    def machine(part: str, protocol: str, build: Callable[[], type], kind: str) -> None:
        outcome = Outcome(part=part, protocol=protocol)
        started = time.monotonic()
        machine_class = build()
        try:
            run_machine(machine_class, machine_settings(kind, base, **overrides))
        except Exception as exc:  # a failure of the target, reported rather than raised
            outcome.failure = exc
        outcome.seconds = time.monotonic() - started
        outcome.exercised = machine_class.exercised  # type: ignore[attr-defined]
        outcomes.append(outcome)
        report(outcome)

    hooks, timeouts = suite.hooks, suite.timeouts
    if suite.agent is not None:
        agent = suite.agent
        machine(
            "agent protocol v2",
            "agent",
            lambda: agent_machine(agent, hooks, portal, timeouts),
            "agent",
        )
    if suite.ingest is not None:
        ingest = suite.ingest
        machine(
            "ingest protocol v1",
            "ingest",
            lambda: ingest_machine(ingest, hooks, portal, timeouts),
            "ingest",
        )
    if suite.backpressure is not None:
        full = suite.backpressure
        machine(
            "ingest backpressure",
            "ingest",
            lambda: ingest_machine(full, hooks, portal, timeouts),
            "backpressure",
        )
    if suite.opamp is not None:
        opamp = suite.opamp
        machine("OpAMP", "opamp", lambda: opamp_machine(opamp, hooks, portal, timeouts), "opamp")
    if suite.agent is not None:
        for name in suite.checks:
            outcome = Outcome(part=name, protocol="agent")
            started = time.monotonic()
            try:
                outcome.skipped = portal.run(
                    CHECKS[name], suite.check_target(name), hooks, timeouts, Transcript()
                )
                if outcome.skipped is None:
                    outcome.exercised[name] += 1
            except Exception as exc:
                outcome.failure = exc
            outcome.seconds = time.monotonic() - started
            outcomes.append(outcome)
            report(outcome)
    return outcomes


def _cannot(rule: str, suite: Suite) -> str | None:
    """Why ``rule`` cannot be checked against ``suite``'s target (None: it can)."""
    protocol = RULES[rule].protocol
    hooks = suite.hooks
    agent = suite.agent
    if protocol == "agent" and agent is None:
        return "no agent target (--agent-url)"
    if protocol == "ingest" and rule != "ingest-backpressure" and suite.ingest is None:
        return "no ingest target (--ingest)"
    if protocol == "opamp":
        if suite.opamp is None:
            return "no OpAMP target (--opamp-url)"
        if RULES[rule].z4j and not suite.opamp.z4j_policy:
            return "z4j's own policy: checked with --z4j-opamp"
        if rule == "opamp-unauthorized-401" and suite.opamp.token is None:
            return f"needs {RULES[rule].needs}"
        if rule == "opamp-z4j-remote-config-offered" and hooks.opamp_config is None:
            return f"needs {RULES[rule].needs}"
        return None
    missing = {
        "resent-events-land-once": hooks.stored_events is None,
        "ingest-acked-land-once": hooks.stored_events is None,
        "command-delivered-once": hooks.mint_command is None,
        "command-final-state": hooks.mint_command is None or hooks.command_state is None,
        "ingest-backpressure": suite.backpressure is None,
        "revoked-4003": hooks.revoke_agent is None,
        "idle-4408": "idle-4408" not in suite.checks,
        "worker-cap-4429": agent is not None and agent.worker_cap is None,
        "rate-limit-4429": agent is not None
        and (agent.events_per_second is None or agent.events_per_second >= 5000)
        and "rate-limit-4429" not in suite.checks,
    }
    if missing.get(rule):
        return f"needs {RULES[rule].needs}"
    if rule == "revoked-4003" and rule not in suite.checks:
        return "not asked for (--check-revocation): it revokes the agent"
    return None


def rule_results(suite: Suite, outcomes: list[Outcome]) -> list[tuple[str, str, str]]:
    """(rule, result, detail) for every rule: passed, FAILED, skipped or not reached."""
    failed = {}
    stopped = set()  # protocols a part of which ended early
    for outcome in outcomes:
        violation = find_violation(outcome.failure)
        if violation is not None:
            failed[violation.rule] = violation.message
        if outcome.failure is not None:
            stopped.add(outcome.protocol)
    skipped_checks = {o.part: o.skipped for o in outcomes if o.skipped}
    exercised: Counter[str] = Counter()
    for outcome in outcomes:
        exercised.update(outcome.exercised)
    results = []
    for name, rule in RULES.items():
        if name in failed:
            results.append((name, "FAILED", failed[name]))
        elif (why := _cannot(name, suite)) is not None:
            results.append((name, "skipped", why))
        elif name in skipped_checks and not exercised[name]:
            results.append((name, "skipped", str(skipped_checks[name])))
        elif exercised[name]:
            note = " (the run stopped early)" if rule.protocol in stopped else ""
            if name in skipped_checks:  # the machine checked part of it
                note += f" (its one-off check skipped: {skipped_checks[name]})"
            results.append((name, "passed", f"{exercised[name]} checks{note}"))
        else:
            results.append((name, "not reached", "no example got to it"))
    return results
