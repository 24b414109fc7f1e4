"""A Trio worker that reports to a z4j brain through `z4j.agent`.

It runs a few pretend jobs, emits an event for each, answers the brain's
``ping`` command, and on Ctrl+C / SIGTERM (or after ``--duration``) flushes
what it can and closes the connection cleanly::

    Z4J_TOKEN=... Z4J_HMAC_SECRET=... python examples/agent_worker.py https://brain.example

The token and the project secret come from the environment only: a command
line is visible to every user of the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
from typing import Any

import trio

from z4j.agent import Agent, SpoolFull


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Environment: Z4J_TOKEN (agent token) and Z4J_HMAC_SECRET (project secret, "
        "URL-safe base64) are required; Z4J_BRAIN_URL and Z4J_WORKER_ROLE are optional.",
    )
    parser.add_argument(
        "brain_url",
        nargs="?",
        default=os.environ.get("Z4J_BRAIN_URL"),
        help="the brain's base URL, e.g. https://brain.example (default: $Z4J_BRAIN_URL)",
    )
    parser.add_argument("--events", type=int, default=5, help="pretend jobs to run (default 5)")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: run until interrupted)",
    )
    parser.add_argument(
        "--role",
        default=os.environ.get("Z4J_WORKER_ROLE"),
        help="worker role reported to the brain",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow plain http:// to a host that is not loopback"
    )
    args = parser.parse_args(argv)
    if not args.brain_url:
        parser.error("give the brain URL as an argument or in Z4J_BRAIN_URL")
    for name in ("Z4J_TOKEN", "Z4J_HMAC_SECRET"):
        if not os.environ.get(name):
            parser.error(f"set {name} in the environment")
    return args


async def run_jobs(agent: Agent, count: int) -> None:
    for i in range(count):
        started = trio.current_time()
        await trio.sleep(random.uniform(0.01, 0.1))  # the "work"
        event = {
            "kind": "task.succeeded",
            "engine": "trio",
            "task_id": f"job-{i}",
            "data": {
                "name": "example.job",
                "runtime_ms": round((trio.current_time() - started) * 1000),
            },
        }
        try:
            agent.emit(event)
        except SpoolFull:
            logging.warning(
                "spool full (brain unreachable for long?): dropped %s", event["task_id"]
            )


async def stop_on_signal(agent: Agent) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logging.info("%s: stopping", signal.Signals(signum).name)
            agent.stop()
            return


async def stop_after(agent: Agent, seconds: float) -> None:
    await trio.sleep(seconds)
    agent.stop()


async def main(args: argparse.Namespace) -> None:
    agent = Agent(
        args.brain_url,
        token=os.environ["Z4J_TOKEN"],
        secret=os.environ["Z4J_HMAC_SECRET"],
        worker_role=args.role,
        allow_insecure=args.insecure,
    )

    @agent.command("ping")
    async def ping(target: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "worker_id": agent.worker_id, "parameters": parameters}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal, agent)
        # The jobs do not wait for the brain: their events wait in the
        # agent's spool until a connection is up.
        nursery.start_soon(run_jobs, agent, args.events)
        if args.duration is not None:
            nursery.start_soon(stop_after, agent, args.duration)
        await agent.run()  # until agent.stop(); then it flushes (briefly) and closes
        stats = agent.statistics()
        logging.info("acked %d events, %d still spooled", stats.acked_events, stats.spooled_events)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    try:
        trio.run(main, parse_args(sys.argv[1:]))
    except ValueError as exc:  # a bad URL or secret
        sys.exit(f"agent_worker: {exc}")
