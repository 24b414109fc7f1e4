"""``z4j dead-letters``: a stopped brain's dead letters, from the command line."""

from __future__ import annotations

import functools

import orjson
import trio

import z4j.ingest
from z4j.config import Config
from z4j.testing.brain import read_events, run_z4j, running_brain, wait_until
from z4j.testing.dead_letters import accept_kind, refuse_kind
from z4j.testing.http import http_get
from z4j.testing.store import open_store, query


async def z4j_cli(config: Config, *args: str) -> tuple[int, str, str]:
    env = {"Z4J_DATA_DIR": str(config.data_dir)}
    if config.database_url is not None:  # audited in the store under test
        env["Z4J_DATABASE_URL"] = config.database_url
    done = await trio.to_thread.run_sync(functools.partial(run_z4j, "dead-letters", *args, env=env))
    return done.returncode, done.stdout, done.stderr


async def test_the_cli_lists_shows_requeues_and_discards_with_the_brain_stopped(
    config: Config,
) -> None:
    async with open_store(config):
        pass
    await trio.to_thread.run_sync(refuse_kind, config, "poison")
    with trio.fail_after(120):
        async with running_brain(config) as brain:
            async with await z4j.ingest.open_trio(*brain.ingest) as client:
                await client.send([{"t": "poison", "n": 1}])
                await client.send([{"t": "poison", "n": 2}])
            await wait_until(lambda: brain.stats.drain_quarantined == 2)
            status, _, err = await z4j_cli(config, "list")
            assert status == 1 and "a running brain holds" in err and "/api/v1/dead-letters" in err

        status, out, err = await z4j_cli(config, "list", "--json", "--limit", "1")
        assert status == 0
        listed = orjson.loads(out)  # an array, as every list command prints
        assert isinstance(listed, list) and len(listed) == 1
        newest = listed[0]["id"]
        assert f"more: --cursor {newest}" in err
        older = newest - 1
        status, out, _ = await z4j_cli(config, "list")
        rows = [line.split()[0] for line in out.splitlines()[1:3]]
        assert status == 0 and rows == [str(newest), str(older)] and "2 in " in out
        status, out, _ = await z4j_cli(config, "show", str(older))
        assert (
            status == 0 and '"n":1' in out.replace(" ", "") and "poison" in out.split("error:")[1]
        )
        status, _, err = await z4j_cli(config, "show", "999")
        assert status == 1 and "no dead letter 999" in err

        status, out, _ = await z4j_cli(config, "discard", str(newest), "--json")
        assert (status, orjson.loads(out)) == (0, {"discarded": [newest]})
        status, out, _ = await z4j_cli(config, "requeue", "--all")
        assert status == 0 and "re-queued 1" in out
        status, _, err = await z4j_cli(config, "requeue")
        assert status == 1 and "--all" in err

        # The next start drains it, the store taking it now.
        await trio.to_thread.run_sync(accept_kind, config, "poison")
        async with running_brain(config) as brain:
            await wait_until(lambda: len(read_events(config)) == 1)
            assert brain.stats.drain_quarantined == 0
            # The CLI's re-queue and discard were counted in the file: the brain reports them.
            status, metrics = await http_get(brain.addresses.http, "/metrics")
            assert status == 200
            assert "z4j_dead_letters_requeued_total 1.0" in metrics.splitlines()
            assert "z4j_dead_letters_discarded_total 1.0" in metrics.splitlines()
    assert read_events(config)[0]["body"] == {"t": "poison", "n": 1}
    audit = query(
        config,
        "SELECT action, actor FROM audit_events WHERE action IN (?, ?) ORDER BY id",
        "dead_letter.requeued",
        "dead_letter.discarded",
    )
    assert [a for a, _ in audit] == ["dead_letter.discarded", "dead_letter.requeued"]
    assert all(actor.startswith("cli") for _, actor in audit)
