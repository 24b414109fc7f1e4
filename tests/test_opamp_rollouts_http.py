"""OpAMP rollouts end to end, on a running brain, on both stores.

Many simulated agents speak raw ``AgentToServer`` protobufs to ``POST
/v1/opamp``; a rollout made through ``POST /api/v1/opamp/rollouts`` reaches
the canary first, then each batch once the one before applied it, and only
the agents its selector matched; a second rollout whose agents report
FAILED halts by itself past its threshold and assigns no further stage.
A WebSocket agent is pushed its stage unasked (the task nudges it). The
brain's own leader task advances the rollouts: the test waits for
each stage to be shown, then checks exactly which agents are offered the
configuration: a stage cannot move until its agents report, and only they
poll while they report (`answer`), so what is offered after the wait is
determined.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
import trio

from z4j.config import Config
from z4j.protocol.opamp import AgentCapability, key_values
from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.protocol.opamp.remote_config import ConfigFile, config_hash
from z4j.testing.agents import admin_token
from z4j.testing.brain import wait_until
from z4j.testing.http import http_request
from z4j.testing.opamp import opamp_socket

pytest.importorskip("opentelemetry._opamp", reason="opentelemetry-opamp-client is not installed")
pytest.importorskip("requests")

from test_dashboard_hub import viewer
from test_opamp_http import opamp_token, post, ready_brain, reply_of

ACCEPTS = (
    AgentCapability.REPORTS_STATUS
    | AgentCapability.ACCEPTS_REMOTE_CONFIG
    | AgentCapability.REPORTS_REMOTE_CONFIG
)
YAML = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}
JSON = {"sdk.json": {"body": '{"sampler": "always_on"}', "content_type": "application/json"}}
APPLIED: Any = pb.RemoteConfigStatus.STATUS_APPLIED
FAILED: Any = pb.RemoteConfigStatus.STATUS_FAILED
PROD = {"service.name": "checkout", "deployment.environment": "prod"}


def hash_of(files: dict[str, dict[str, str]]) -> bytes:
    return config_hash(
        {
            n: ConfigFile(body=f["body"].encode(), content_type=f["content_type"])
            for n, f in files.items()
        }
    )


class Agent:
    """One simulated agent: applies what it is offered, or fails it when told to."""

    def __init__(self, n: int, environment: str) -> None:
        self.uid = uuid.UUID(int=n + 1).bytes
        self.environment = environment
        self.seq = 0
        self.offered: set[bytes] = set()  # hashes it was ever offered
        self.answer: bytes | None = None  # the hash to report on next (applied or failed)
        self.fail: set[bytes] = set()  # hashes it fails

    def message(self) -> bytes:
        m = pb.AgentToServer(
            instance_uid=self.uid, sequence_num=self.seq, capabilities=int(ACCEPTS)
        )
        if self.seq == 0:
            description = m.agent_description
            description.identifying_attributes.extend(key_values({"service.name": "checkout"}))
            description.non_identifying_attributes.extend(
                key_values({"deployment.environment": self.environment})
            )
        if self.answer is not None:
            failed = self.answer in self.fail
            m.remote_config_status.CopyFrom(
                pb.RemoteConfigStatus(
                    last_remote_config_hash=self.answer,
                    status=FAILED if failed else APPLIED,
                    error_message="exporter otlp: unknown field" if failed else "",
                )
            )
            self.answer = None
        self.seq += 1
        return m.SerializeToString()

    async def poll(self, http: tuple[str, int], token: str) -> bytes | None:
        """One message (answering the offer of the last one, if any); the hash offered."""
        reply = reply_of(await post(http, self.message(), token))
        if not reply.HasField("remote_config"):
            return None
        self.answer = reply.remote_config.config_hash
        self.offered.add(self.answer)
        return self.answer


async def api(
    http: tuple[str, int], method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = orjson.dumps(body)
        headers["Content-Type"] = "application/json"
    reply = await http_request(http, method, "/api/v1" + path, body=data, headers=headers)
    return reply.status, reply.json() if reply.body else None


async def at_stage(
    http: tuple[str, int], admin: str, path: str, n: int, state: str = "running"
) -> None:
    """Wait until the rollout at ``path`` shows stage ``n`` in ``state``."""

    async def shown() -> bool:
        _, body = await api(http, "GET", path, admin)
        return bool(body["stage"] == n and body["state"] == state)

    await wait_until(shown)


async def answer(http: tuple[str, int], token: str, agents: list[Agent]) -> None:
    """The agents offered a configuration report on it, and no other agent polls: a
    stage assigned meanwhile is first offered on the next `poll_all`."""
    await poll_all(http, token, [a for a in agents if a.answer is not None])


async def poll_all(http: tuple[str, int], token: str, agents: list[Agent]) -> dict[bytes, bytes]:
    """Every agent polls once (answering any offer of its previous poll): who is offered what."""
    offered = {}
    for agent in agents:
        digest = await agent.poll(http, token)
        if digest is not None:
            offered[agent.uid] = digest
    return offered


async def test_a_rollout_goes_canary_then_batches_and_a_failing_one_halts_itself(
    config: Config,
) -> None:
    token = await opamp_token(config, "edge")
    admin = await admin_token(config)
    prod = [Agent(n, "prod") for n in range(30)]
    dev = [Agent(100 + n, "dev") for n in range(5)]
    fleet = prod + dev
    async with ready_brain(config) as brain:
        http = brain.addresses.http
        assert await poll_all(http, token, fleet) == {}

        # Bad input first: each refused with the reason.
        for body in (
            {"project": "edge", "files": {}},
            {"project": "edge", "files": YAML, "selector": {"a": 1}},
            {"project": "edge", "files": YAML, "canary_percent": 101},
            {"project": "edge", "files": YAML, "batch_size": 0},
            {"files": YAML},
        ):
            assert (await api(http, "POST", "/opamp/rollouts", admin, body))[0] == 400, body
        assert (
            await api(http, "POST", "/opamp/rollouts", admin, {"project": "no", "files": YAML})
        )[0] == 404

        status, rollout = await api(
            http,
            "POST",
            "/opamp/rollouts",
            admin,
            {"project": "edge", "selector": PROD, "files": YAML, "batch_size": 10},
        )
        assert status == 201, rollout
        path = f"/opamp/rollouts/{rollout['id']}"
        assert (rollout["targets"], rollout["stages"], rollout["project"]) == (30, 4, "edge")
        assert rollout["config_hash"] == hash_of(YAML).hex()
        assert (rollout["canary_percent"], rollout["failure_threshold_percent"]) == (10, 10)

        # The canary (3 of 30), then batches of 10: each stage is offered to
        # exactly its agents, and the next comes once they applied it.
        seen: set[bytes] = set()
        for stage, size in ((1, 3), (2, 10), (3, 10), (4, 7)):
            await at_stage(http, admin, path, stage)
            offered = await poll_all(http, token, fleet)
            assert len(offered) == size and not set(offered) & seen, stage
            assert set(offered.values()) == {hash_of(YAML)}
            seen |= set(offered)
            _, shown = await api(http, "GET", path, admin)
            assert shown["counts"]["pending"] == size
            await answer(http, token, fleet)  # they report APPLIED
        await at_stage(http, admin, path, 4, "completed")
        _, shown = await api(http, "GET", path, admin)
        assert shown["counts"] == {
            "pending": 0,
            "applying": 0,
            "applied": 30,
            "failed": 0,
            "superseded": 0,
        }
        assert seen == {a.uid for a in prod} and not any(a.offered for a in dev)
        _, listed = await api(http, "GET", "/opamp/rollouts?project=edge", admin)
        assert [r["id"] for r in listed["items"]] == [rollout["id"]]

        # A configuration the agents fail: the canary applies it, the next
        # batch fails it, and the rollout halts by itself; the dashboard is
        # shown each change.
        async with viewer(http, admin) as v, trio.open_nursery() as watching:
            await v.next_message("hello")  # subscribed from here on
            shown: list[dict[str, Any]] = []

            async def watch() -> None:
                while True:
                    shown.append((await v.next_message("opamp_rollout"))["rollout"])

            watching.start_soon(watch)
            failing = await fail_a_rollout(http, admin, token, prod, dev)

            async def cancelled_shown() -> bool:
                return any(r["id"] == failing["id"] and r["state"] == "cancelled" for r in shown)

            await wait_until(cancelled_shown)
            watching.cancel_scope.cancel()
        mine = [r for r in shown if r["id"] == failing["id"]]
        _, latest = await api(http, "GET", f"/opamp/rollouts/{failing['id']}", admin)
        assert mine[-1] == latest  # the same JSON as the API's
        moves = [(r["state"], r["stage"]) for r in mine]
        for move in (("running", 0), ("running", 1), ("running", 2), ("halted", 2)):
            assert move in moves, moves
        assert moves.index(("halted", 2)) < moves.index(("cancelled", 2))

        _, audit = await api(http, "GET", "/audit?limit=500", admin)
        actions = [
            a["action"] for a in audit["items"] if a["subject"] == f"opamp-rollout:{failing['id']}"
        ]
        assert actions == [
            "opamp.rollout.cancelled",
            "opamp.rollout.halted",
            "opamp.rollout.stage",
            "opamp.rollout.stage",
            "opamp.rollout.created",
        ]
        failures = [
            a
            for a in audit["items"]
            if a["action"] == "opamp.config.failed"
            and a["details"].get("rollout_id") == failing["id"]
        ]
        assert len(failures) == 10

        # The gauges, as the leader's next round sets them.
        async def gauged() -> bool:
            metrics = (await http_request(http, "GET", "/metrics")).body.decode()
            return all(
                line in metrics
                for line in (
                    'z4j_opamp_rollouts{state="completed"} 1.0',
                    'z4j_opamp_rollouts{state="cancelled"} 1.0',
                    'z4j_opamp_config_status{status="failed"} 10.0',
                )
            )

        await wait_until(gauged)


async def fail_a_rollout(
    http: tuple[str, int], admin: str, token: str, prod: list[Agent], dev: list[Agent]
) -> dict[str, Any]:
    """A rollout of JSON that every agent but the canary fails: halted at stage 2, cancelled."""
    fleet = prod + dev
    for agent in prod:
        agent.fail.add(hash_of(JSON))
    status, failing = await api(
        http,
        "POST",
        "/opamp/rollouts",
        admin,
        {
            "project": "edge",
            "selector": PROD,
            "files": JSON,
            "canary_percent": 10,
            "batch_size": 10,
            "failure_threshold_percent": 10,
        },
    )
    assert status == 201
    path = f"/opamp/rollouts/{failing['id']}"
    await at_stage(http, admin, path, 1)
    canary = await poll_all(http, token, fleet)
    assert len(canary) == 3
    for agent in prod:
        if agent.uid in canary:
            agent.fail.discard(hash_of(JSON))
    await answer(http, token, fleet)
    await at_stage(http, admin, path, 2)
    batch = await poll_all(http, token, fleet)
    assert len(batch) == 10 and not set(batch) & set(canary)
    await answer(http, token, fleet)  # 10 of 13 report FAILED
    await at_stage(http, admin, path, 2, "halted")
    _, halted = await api(http, "GET", path, admin)
    assert halted["counts"]["failed"] == 10 and halted["counts"]["applied"] == 3
    assert "over the 10% threshold" in halted["halted_reason"]
    # No further stage: only the 13 were ever offered this configuration.
    await poll_all(http, token, fleet)
    assert sum(hash_of(JSON) in a.offered for a in fleet) == 13
    _, config_row = await api(http, "GET", f"/opamp/agents/{next(iter(batch)).hex()}/config", admin)
    assert config_row["status"] == "failed"
    assert config_row["error_message"] == "exporter otlp: unknown field"
    assert config_row["rollout_id"] == failing["id"]
    # Cancelled: resuming it is refused; ids that are not rollouts.
    assert (await api(http, "POST", path + "/cancel", admin))[1]["state"] == "cancelled"
    assert (await api(http, "POST", path + "/resume", admin))[0] == 409
    assert (await api(http, "POST", "/opamp/rollouts/nope/halt", admin))[0] == 400
    assert (await api(http, "POST", f"/opamp/rollouts/{uuid.uuid4()}/halt", admin))[0] == 404
    return failing


async def test_a_websocket_agent_is_pushed_its_stage_unasked(config: Config) -> None:
    token = await opamp_token(config, "edge")
    admin = await admin_token(config)
    agent = Agent(0, "prod")
    async with ready_brain(config) as brain, opamp_socket(brain.addresses.http, token) as ws:
        http = brain.addresses.http
        first = pb.AgentToServer.FromString(agent.message())
        assert not (await ws.exchange(first)).HasField("remote_config")
        status, rollout = await api(
            http,
            "POST",
            "/opamp/rollouts",
            admin,
            {"project": "edge", "selector": PROD, "files": YAML, "canary_percent": 100},
        )
        assert status == 201 and rollout["targets"] == 1
        # The leader assigns the stage and nudges the agent's session: the
        # configuration arrives without the agent asking.
        with trio.fail_after(30):  # a bound on a hang, not a speed check
            pushed = await ws.receive()
        assert pushed.remote_config.config_hash == hash_of(YAML)
        agent.answer = hash_of(YAML)
        await ws.exchange(pb.AgentToServer.FromString(agent.message()))
        await at_stage(http, admin, f"/opamp/rollouts/{rollout['id']}", 1, "completed")
