"""/ws/agent with real agents: z4j-bare 1.13.0, unchanged, against our brain."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import trio

from z4j.config import Config
from z4j.testing.agents import provision
from z4j.testing.brain import read_events, running_brain, wait_until
from z4j.testing.store import query

BARE_AGENT = Path(__file__).parent / "agents" / "bare_agent.py"


def start_bare_agent(
    url: str, token: str, secret: str, events: int, seconds: float, home: Path
) -> subprocess.Popen[bytes]:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    env.update({"Z4J_HOME": str(home), "NO_PROXY": "127.0.0.1,localhost"})
    with open(home / "agent.log", "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, str(BARE_AGENT), url, token, secret, str(events), str(seconds)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


async def test_real_z4j_bare_agent_events_land_once(tmp_path: Path, config: Config) -> None:
    token, secret, _agent_id = await provision(config)
    with trio.fail_after(90):
        async with running_brain(config) as brain:
            agent = start_bare_agent(
                brain.addresses.http_url, token, secret, 5, 8, tmp_path / "agent"
            )
            try:

                def agent_events() -> list[dict[str, object]]:
                    return [e for e in read_events(config) if e["source"] == "agent"]

                await wait_until(lambda: len(agent_events()) >= 5, timeout=60)
                await wait_until(lambda: brain.stats.agent_sessions_open == 1)
            finally:
                agent.terminate()
                await trio.to_thread.run_sync(agent.wait, 20)
    events = agent_events()
    assert sorted(e["body"]["data"]["n"] for e in events) == [0, 1, 2, 3, 4]  # type: ignore[index]
    assert {e["kind"] for e in events} == {"task.succeeded"}
    assert brain.stats.agent_rejected == {}


async def test_unknown_token_is_refused_with_4401(tmp_path: Path, config: Config) -> None:
    _, secret, _ = await provision(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            agent = start_bare_agent(
                brain.addresses.http_url, "z4j_not-a-token", secret, 1, 3, tmp_path / "agent"
            )
            try:
                await wait_until(lambda: brain.stats.agent_rejected["bad_token"] >= 1)
            finally:
                agent.terminate()
                await trio.to_thread.run_sync(agent.wait, 20)
            assert brain.stats.agent_sessions_open == 0
    assert [e for e in read_events(config) if e["source"] == "agent"] == []


def audit_actions(config: Config, command_id: uuid.UUID) -> list[str]:
    rows = query(
        config,
        "SELECT action FROM audit_events WHERE subject = ? ORDER BY id",
        f"command:{command_id}",
    )
    return [r[0] for r in rows]


async def test_command_to_real_z4j_bare_agent_completes(tmp_path: Path, config: Config) -> None:
    token, secret, agent_id = await provision(config)
    with trio.fail_after(90):
        async with running_brain(config) as brain:
            commands = brain.addresses.commands
            # Minted before any worker is connected: it waits as pending.
            early = await commands.send(agent_id, "schedule.resync", issued_by="test")
            assert early.state == "pending"
            agent = start_bare_agent(
                brain.addresses.http_url, token, secret, 0, 30, tmp_path / "agent"
            )
            try:
                done = await commands.wait(early.id, within=60)
                assert done is not None and done.state == "completed", done
                assert done.result == {"schedulers_drained": 0}
                assert done.worker_id is not None and done.dispatched_at is not None
                # And one sent while the worker is live; then one it cannot do.
                live = await commands.send(agent_id, "schedule.resync")
                assert (await commands.wait(live.id, within=30)).state == "completed"  # type: ignore[union-attr]
                bogus = await commands.send(agent_id, "bogus.action")
                failed = await commands.wait(bogus.id, within=30)
                assert failed is not None and failed.state == "failed"
                assert "bogus.action" in (failed.error or "")
            finally:
                agent.terminate()
                await trio.to_thread.run_sync(agent.wait, 20)
    assert audit_actions(config, early.id) == [
        "command.created",
        "command.dispatched",
        "command.completed",
    ]


async def test_command_for_an_agent_never_connected_times_out(config: Config) -> None:
    _, _, agent_id = await provision(config)
    with trio.fail_after(30):
        async with running_brain(config) as brain:
            record = await brain.addresses.commands.send(
                agent_id, "schedule.resync", timeout_seconds=1
            )
            done = await brain.addresses.commands.wait(record.id, within=10)
    assert done is not None and done.state == "timeout"
    assert audit_actions(config, record.id) == ["command.created", "command.timeout"]


async def test_our_agent_library_streams_events_and_answers_commands(config: Config) -> None:
    import z4j.agent

    token, secret, agent_id = await provision(config)
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            agent = z4j.agent.Agent(
                brain.addresses.http_url, token=token, secret=secret, worker_id="w-ours"
            )

            @agent.command("ping")
            async def ping(
                target: dict[str, object], parameters: dict[str, object]
            ) -> dict[str, object]:
                return {"pong": parameters.get("n")}

            async with trio.open_nursery() as nursery:
                await nursery.start(agent.run)
                for n in range(5):
                    agent.emit({"kind": "job.done", "n": n})
                record = await brain.addresses.commands.send(agent_id, "ping", parameters={"n": 7})
                done = await brain.addresses.commands.wait(record.id, within=20)
                assert done is not None and done.state == "completed" and done.result == {"pong": 7}

                def ours() -> list[dict[str, object]]:
                    return [e for e in read_events(config) if e["source"] == "agent"]

                await wait_until(lambda: len(ours()) == 5, timeout=30)
                await agent.aclose()
    assert sorted(e["body"]["n"] for e in ours()) == [0, 1, 2, 3, 4]  # type: ignore[index]


async def test_z4j_command_send_from_another_process(tmp_path: Path, config: Config) -> None:
    """The CLI mints into the store; the running brain's sweep delivers it."""
    import orjson

    token, secret, agent_id = await provision(config)
    flags = ["--data-dir", str(config.data_dir)]
    if config.database_url:
        flags += ["--database-url", config.database_url]
    with trio.fail_after(90):
        async with running_brain(config) as brain:
            agent = start_bare_agent(
                brain.addresses.http_url, token, secret, 0, 40, tmp_path / "agent"
            )
            try:
                await wait_until(lambda: brain.stats.agent_sessions_open == 1, timeout=30)
                env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
                result = await trio.run_process(
                    [
                        sys.executable,
                        "-m",
                        "z4j",
                        "command",
                        "send",
                        "--agent",
                        str(agent_id),
                        "schedule.resync",
                        "--wait",
                        "30",
                        *flags,
                    ],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=env,
                )
            finally:
                agent.terminate()
                await trio.to_thread.run_sync(agent.wait, 20)
    assert result.returncode == 0, result.stderr.decode()
    shown = orjson.loads(result.stdout)
    assert shown["state"] == "completed"
    assert shown["result"] == {"schedulers_drained": 0}
    assert shown["issued_by"].startswith("cli")
