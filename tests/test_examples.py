"""The examples run and do what they say."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_brain_example() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embedded_brain.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "stored: kind=log" in out
    assert "stored: kind=job" in out


def start_example(name: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / name)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def test_bare_agent_example_connects_with_the_line_agent_create_prints(
    tmp_path: Path,
) -> None:
    """`z4j agent create` (the CLI, a subprocess) → a file → the example, a real
    z4j-bare agent in a subprocess → a session on the brain and its event stored."""
    import os
    import socket

    import trio

    from z4j.testing.agents import provision
    from z4j.testing.brain import make_config, read_events, run_z4j, running_brain, wait_until

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = make_config(tmp_path / "data", http_bind=f"127.0.0.1:{port}")
    await provision(config, project="demo")
    created = await trio.to_thread.run_sync(
        lambda: run_z4j(
            "agent",
            "create",
            "--project",
            "demo",
            "example",
            env={"Z4J_DATA_DIR": str(config.data_dir), "Z4J_HTTP_BIND": config.http_bind},
        )
    )
    assert created.returncode == 0, created.stderr
    line_file = tmp_path / "agent.txt"
    line_file.write_text(created.stdout)
    line_file.chmod(0o600)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("Z4J_")}
    env.update(
        {
            "Z4J_AGENT_FILE": str(line_file),
            "Z4J_HOME": str(home),
            "Z4J_EXAMPLE_SECONDS": "60",
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    with trio.fail_after(90):
        async with running_brain(config) as brain:
            agent = start_example("bare_agent.py", env, tmp_path / "example.log")
            try:

                def example_events() -> list[dict[str, object]]:
                    return [e for e in read_events(config) if e["source"] == "agent"]

                await wait_until(lambda: brain.stats.agent_sessions_open == 1, timeout=60)
                await wait_until(lambda: len(example_events()) == 1, timeout=60)
            finally:
                agent.terminate()
                await trio.to_thread.run_sync(agent.wait, 20)
            assert brain.stats.agent_rejected == {}
    assert example_events()[0]["body"]["data"] == {"example": True}  # type: ignore[index]
    assert "stopped" in (tmp_path / "example.log").read_text()
