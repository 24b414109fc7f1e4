"""Remote configuration for one OpAMP agent, on a running brain, on both stores.

A configuration pushed through ``PUT /api/v1/opamp/agents/{uid}/config``
reaches the OpenTelemetry Python client's agent loop, is applied, and shows
applied with its hash; with hand-built messages: offered until APPLIED and
not after, FAILED with the agent's message, DELETE stops the offer, never
sent to an agent that does not accept remote config nor to another
project's agent, the validation errors, and the audit rows (pushes,
deletes, and the agent's acknowledgements).
"""

from __future__ import annotations

import atexit
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from z4j.config import Config
from z4j.protocol.opamp import AgentCapability, AgentFlag
from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.protocol.opamp.remote_config import ConfigFile, config_hash
from z4j.store import store_for
from z4j.testing.agents import admin_token
from z4j.testing.brain import make_config, wait_until
from z4j.testing.http import HttpReply, http_request

pytest.importorskip("opentelemetry._opamp", reason="opentelemetry-opamp-client is not installed")
pytest.importorskip("requests")

from opentelemetry._opamp.agent import OpAMPAgent
from opentelemetry._opamp.callbacks import MessageData, OpAMPCallbacks
from opentelemetry._opamp.client import OpAMPClient
from test_opamp_http import UID, _free_port, opamp_token, post, ready_brain, reply_of

ACCEPTS = (
    AgentCapability.REPORTS_STATUS
    | AgentCapability.ACCEPTS_REMOTE_CONFIG
    | AgentCapability.REPORTS_REMOTE_CONFIG
)
YAML = {"collector.yaml": {"body": "receivers:\n  otlp: {}\n", "content_type": "text/yaml"}}
JSON = {"sdk.json": {"body": '{"sampler": "always_on"}', "content_type": "application/json"}}
YAML_TYPES = ("text/yaml", "application/yaml", "application/x-yaml", "text/x-yaml; charset=utf-8")
APPLYING: Any = pb.RemoteConfigStatus.STATUS_APPLYING
APPLIED: Any = pb.RemoteConfigStatus.STATUS_APPLIED
FAILED: Any = pb.RemoteConfigStatus.STATUS_FAILED


def hash_of(files: dict[str, dict[str, str]]) -> bytes:
    return config_hash(
        {
            n: ConfigFile(body=f["body"].encode(), content_type=f["content_type"])
            for n, f in files.items()
        }
    )


def brain_project(shown: dict[str, Any]) -> uuid.UUID:
    return uuid.UUID(shown["project_id"])


async def api(
    address: tuple[str, int], method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        headers["Content-Type"] = "application/json"
    reply: HttpReply = await http_request(
        address, method, "/api/v1" + path, body=data, headers=headers
    )
    return reply.status, reply.json()


def message(
    seq: int,
    capabilities: AgentCapability = ACCEPTS,
    status: tuple[bytes, Any, str] | None = None,
    uid: bytes = UID,
) -> bytes:
    """A message from ``uid``: the description on the first, a config status when given."""
    m = pb.AgentToServer(instance_uid=uid, sequence_num=seq, capabilities=int(capabilities))
    if seq == 0:
        m.agent_description.identifying_attributes.add(key="service.name").value.string_value = "x"
    if status is not None:
        digest, code, error = status
        m.remote_config_status.CopyFrom(
            pb.RemoteConfigStatus(last_remote_config_hash=digest, status=code, error_message=error)
        )
    return m.SerializeToString()


async def test_offered_until_applied_failed_shown_deleted_and_audited(config: Config) -> None:
    token = await opamp_token(config, "a")
    admin = await admin_token(config)
    path = f"/opamp/agents/{UID.hex()}/config"
    async with ready_brain(config) as brain:
        http = brain.addresses.http
        assert not reply_of(await post(http, message(0), token)).HasField("remote_config")

        status, pushed = await api(http, "PUT", path, admin, {"files": YAML})
        assert status == 200, pushed
        digest = hash_of(YAML)
        assert pushed["config_hash"] == digest.hex() and pushed["status"] == "pending"
        assert pushed["files"] == YAML and pushed["created_by"] == "token:test"

        offer = reply_of(await post(http, message(1), token))
        assert offer.remote_config.config_hash == digest
        [(name, file)] = offer.remote_config.config.config_map.items()
        assert (name, file.body, file.content_type) == (
            "collector.yaml",
            YAML["collector.yaml"]["body"].encode(),
            "text/yaml",
        )
        # APPLYING: still offered (not applied yet), and shown.
        reply = reply_of(await post(http, message(2, status=(digest, APPLYING, "")), token))
        assert reply.remote_config.config_hash == digest
        assert (await api(http, "GET", path, admin))[1]["status"] == "applying"
        # APPLIED: no longer offered, on this reply nor the next ones.
        reply = reply_of(await post(http, message(3, status=(digest, APPLIED, "")), token))
        assert not reply.HasField("remote_config")
        for seq in (4, 5):
            assert not reply_of(await post(http, message(seq), token)).HasField("remote_config")
        status, shown = await api(http, "GET", path, admin)
        assert status == 200 and shown["status"] == "applied"
        assert shown["config_hash"] == digest.hex() and shown["error_message"] == ""
        assert shown["files"] == YAML
        # What a poll reads of an applied configuration: not its files.
        store = store_for(config)
        try:
            _, loaded = await store.load_opamp_agent(brain_project(shown), UID)
        finally:
            await store.aclose()
        assert loaded is not None and loaded.files == {} and loaded.status == "applied"
        _, agent = await api(http, "GET", f"/opamp/agents/{UID.hex()}", admin)
        assert agent["remote_config_status"]["last_remote_config_hash"] == digest.hex()
        # The listing and the agent show its desired configuration's summary.
        summary = {
            "config_hash": digest.hex(),
            "status": "applied",
            "error_message": "",
            "status_at": shown["status_at"],
        }
        assert agent["desired_config"] == summary
        _, listing = await api(http, "GET", "/opamp/agents", admin)
        assert [item["desired_config"] for item in listing["items"]] == [summary]
        # One status write per move (applying, applied), none per heartbeat.
        assert brain.stats.opamp_writes["config_status"] == 2
        # The agent reports another configuration (rolled back, restarted):
        # offered again at once, pending, until it reports this one applied.
        other = (b"\x01" * 32, APPLIED, "")
        reply = reply_of(await post(http, message(6, status=other), token))
        assert reply.remote_config.config_hash == digest
        assert (await api(http, "GET", path, admin))[1]["status"] == "pending"
        reply = reply_of(await post(http, message(7, status=(digest, APPLIED, "")), token))
        assert not reply.HasField("remote_config")
        assert (await api(http, "GET", path, admin))[1]["status"] == "applied"
        assert brain.stats.opamp_writes["config_status"] == 4

        # A second configuration: offered again; FAILED shows the agent's message.
        assert (await api(http, "PUT", path, admin, {"files": JSON}))[0] == 200
        second = hash_of(JSON)
        assert reply_of(await post(http, message(8), token)).remote_config.config_hash == second
        await post(http, message(9, status=(second, FAILED, "unknown sampler")), token)
        _, shown = await api(http, "GET", path, admin)
        assert (shown["status"], shown["error_message"]) == ("failed", "unknown sampler")
        assert shown["config_hash"] == second.hex()

        # DELETE stops the offer.
        assert (await api(http, "DELETE", path, admin))[0] == 204
        assert not reply_of(await post(http, message(10), token)).HasField("remote_config")
        assert (await api(http, "GET", path, admin))[0] == 404
        assert (await api(http, "DELETE", path, admin))[0] == 404

        _, audit = await api(http, "GET", "/audit", admin)
        rows = [(a["action"], a["details"].get("config_hash")) for a in audit["items"]]
        # Pushes, deletes and the agent's acknowledgements (applied, failed:
        # once each time the status moves there, not per poll).
        assert rows[:6] == [
            ("opamp.config.deleted", second.hex()),
            ("opamp.config.failed", second.hex()),
            ("opamp.config.pushed", second.hex()),
            ("opamp.config.applied", digest.hex()),
            ("opamp.config.applied", digest.hex()),
            ("opamp.config.pushed", digest.hex()),
        ]
        assert audit["items"][5]["subject"].endswith(UID.hex())
        assert audit["items"][5]["actor"] == "token:test"
        assert audit["items"][1]["actor"] == "opamp-agent"
        assert audit["items"][1]["details"]["error_message"] == "unknown sampler"


async def test_never_sent_without_the_capability_nor_to_another_project(config: Config) -> None:
    token_a = await opamp_token(config, "a")
    token_b = await opamp_token(config, "b")
    admin = await admin_token(config)
    path = f"/opamp/agents/{UID.hex()}/config"
    async with ready_brain(config) as brain:
        http = brain.addresses.http
        # Pushed before the agent is heard from: the project must be named.
        status, body = await api(http, "PUT", path, admin, {"files": YAML})
        assert status == 404 and "?project=" in body["message"]
        assert (await api(http, "PUT", path + "?project=b", admin, {"files": YAML}))[0] == 200

        # A's token, B's agent's uid: A's own agent, which has no configuration.
        for seq in range(3):
            assert not reply_of(await post(http, message(seq), token_a)).HasField("remote_config")
        # B's agent, not accepting remote config: never offered.
        no_remote = AgentCapability.REPORTS_STATUS | AgentCapability.REPORTS_REMOTE_CONFIG
        for seq in range(3):
            reply = reply_of(await post(http, message(seq, no_remote), token_b))
            assert not reply.HasField("remote_config")
        # ...until it says it does.
        reply = reply_of(await post(http, message(3), token_b))
        assert reply.remote_config.config_hash == hash_of(YAML)
        _, shown = await api(http, "GET", path + "?project=b", admin)
        assert shown["status"] == "pending"
        status, body = await api(http, "GET", path, admin)
        assert status == 409 and body["error"] == "ambiguous"
        assert (await api(http, "GET", path + "?project=a", admin))[0] == 404
        # Each project's listing shows its own agent's configuration, or none.
        for project, desired in (("a", None), ("b", "pending")):
            _, listing = await api(http, "GET", f"/opamp/agents?project={project}", admin)
            [item] = listing["items"]
            assert (item["desired_config"] or {}).get("status") == desired, (project, item)


async def test_the_configuration_follows_an_agent_given_a_new_id(config: Config) -> None:
    token = await opamp_token(config, "a")
    admin = await admin_token(config)
    async with ready_brain(config) as brain:
        http = brain.addresses.http
        reply_of(await post(http, message(0), token))
        path = f"/opamp/agents/{UID.hex()}/config"
        assert (await api(http, "PUT", path, admin, {"files": YAML}))[0] == 200
        ask = pb.AgentToServer.FromString(message(1))
        ask.flags = AgentFlag.REQUEST_INSTANCE_UID
        reply = reply_of(await post(http, ask.SerializeToString(), token))
        new = reply.agent_identification.new_instance_uid
        assert len(new) == 16 and reply.remote_config.config_hash == hash_of(YAML)
        reply = reply_of(await post(http, message(2, uid=new), token))
        assert reply.remote_config.config_hash == hash_of(YAML)
        applied = (hash_of(YAML), APPLIED, "")
        reply = reply_of(await post(http, message(3, status=applied, uid=new), token))
        assert not reply.HasField("remote_config")
        status, shown = await api(http, "GET", f"/opamp/agents/{new.hex()}/config", admin)
        assert status == 200 and shown["status"] == "applied"
        assert (await api(http, "GET", path + "?project=a", admin))[0] == 404


async def test_the_configuration_follows_a_new_agent_given_a_new_id_at_once(
    config: Config,
) -> None:
    """Pushed before the agent is heard from, whose first message asks for a new id:
    the configuration moves with it (found by the conformance suite: it stayed behind)."""
    token = await opamp_token(config, "a")
    admin = await admin_token(config)
    async with ready_brain(config) as brain:
        http = brain.addresses.http
        path = f"/opamp/agents/{UID.hex()}/config"
        assert (await api(http, "PUT", path + "?project=a", admin, {"files": YAML}))[0] == 200
        ask = pb.AgentToServer.FromString(message(0))
        ask.flags = AgentFlag.REQUEST_INSTANCE_UID
        reply = reply_of(await post(http, ask.SerializeToString(), token))
        new = reply.agent_identification.new_instance_uid
        assert len(new) == 16 and reply.remote_config.config_hash == hash_of(YAML)
        reply = reply_of(await post(http, message(1, uid=new), token))
        assert reply.remote_config.config_hash == hash_of(YAML)
        status, shown = await api(http, "GET", f"/opamp/agents/{new.hex()}/config", admin)
        assert status == 200 and shown["config_hash"] == hash_of(YAML).hex()
        assert (await api(http, "GET", path + "?project=a", admin))[0] == 404


async def test_validation_errors_are_400_with_a_reason(config: Config) -> None:
    await opamp_token(config, "a")
    admin = await admin_token(config)
    path = f"/opamp/agents/{UID.hex()}/config?project=a"
    big = {"f": {"body": "x" * (512 * 1024 + 1), "content_type": ""}}
    cases: list[tuple[Any, str]] = [
        (b"not json", "not valid JSON"),
        ({}, "files"),
        ({"files": {}}, "at least one file"),
        ({"files": {"": {"body": "x"}}}, "names of 1 to"),
        ({"files": {"a": {"body": 3}}}, "body (text)"),
        ({"files": {"a": "text"}}, "body (text)"),
        ({"files": {"a": {"body": "x", "content_type": 5}}}, "content_type"),
        (
            {"files": {"a.json": {"body": "{", "content_type": "application/json"}}},
            "not valid JSON",
        ),
        ({"files": {"a": {"body": "[1,", "content_type": "application/vnd.x+json"}}}, "JSON"),
        ({"files": big}, "bytes of bodies"),
        ({"files": {"a": {"body": "nul \u0000"}}}, "NUL"),
    ]
    async with ready_brain(config) as brain:
        http = brain.addresses.http
        for body, reason in cases:
            status, reply = await api(http, "PUT", path, admin, body)
            assert status == 400 and reason in reply["message"], (body, reply)
        bad_uid = await api(
            http, "PUT", "/opamp/agents/xyz/config?project=a", admin, {"files": YAML}
        )
        assert bad_uid[0] == 400
        # YAML must parse too, whichever YAML media type names it.
        for content_type in YAML_TYPES:
            odd = {"c.yaml": {"body": "a: [", "content_type": content_type}}
            status, reply = await api(http, "PUT", path, admin, {"files": odd})
            assert status == 400 and "not valid YAML" in reply["message"], (content_type, reply)
            assert "line 2, column 1" in reply["message"]  # where it broke
            fine = {"c.yaml": {"body": "a: [1]\n---\nb: {}\n", "content_type": content_type}}
            assert (await api(http, "PUT", path, admin, {"files": fine}))[0] == 200
        # Not YAML by its type: kept as given.
        plain = {"c.txt": {"body": "a: [", "content_type": "text/plain"}}
        assert (await api(http, "PUT", path, admin, {"files": plain}))[0] == 200
        # Scalars that do not fit their type, tags safe_load refuses, and
        # nesting past MAX_YAML_DEPTH (refused before libyaml's slow paths:
        # this body took it 25 s, and crashed its constructor).
        for body, reason in [
            ("when: 2026-13-01\n", "month"),
            ("x: !!python/object:os.system ls\n", "constructor"),
            ("[" * 100_000, "nested deeper than 64"),
            ("- " * 100_000, "nested deeper than 64"),
        ]:
            bad = {"c.yaml": {"body": body, "content_type": "application/yaml"}}
            status, reply = await api(http, "PUT", path, admin, {"files": bad})
            assert status == 400 and reason in reply["message"], (body[:20], reply)
        deep_enough = "[" * 64 + "]" * 64
        ok = {"c.yaml": {"body": deep_enough, "content_type": "application/yaml"}}
        assert (await api(http, "PUT", path, admin, {"files": ok}))[0] == 200
        unauthenticated = await http_request(http, "PUT", "/api/v1" + path, body=b"{}")
        assert unauthenticated.status == 401


class _Applier(OpAMPCallbacks):
    """What a distribution does with a remote config: apply it, report APPLIED."""

    def __init__(self) -> None:
        self.configs: list[tuple[bytes, dict[str, bytes]]] = []

    def on_message(self, agent: OpAMPAgent, client: OpAMPClient, message: MessageData) -> None:
        if message.remote_config is None:
            return
        remote = message.remote_config
        files = {n: f.body for n, f in remote.config.config_map.items()}
        self.configs.append((remote.config_hash, files))
        status = client.update_remote_config_status(remote.config_hash, APPLIED)
        if status is not None:
            agent.send(client.build_remote_config_status_response_message(status))


async def test_the_python_client_applies_a_pushed_configuration(
    tmp_path: Path, database_url: str | None
) -> None:
    port = _free_port()
    config = make_config(tmp_path / "data", database_url, http_bind=f"127.0.0.1:{port}")
    token = await opamp_token(config, "fleet")
    admin = await admin_token(config)
    client = OpAMPClient(
        endpoint=f"http://127.0.0.1:{port}/v1/opamp",
        headers={"Authorization": f"Bearer {token}"},
        agent_identifying_attributes={"service.name": "checkout"},
    )
    callbacks = _Applier()
    agent = OpAMPAgent(interval=0.1, callbacks=callbacks, client=client, initial_backoff=0.05)
    http = ("127.0.0.1", port)
    try:
        async with ready_brain(config) as brain:
            await trio.to_thread.run_sync(agent.start)

            async def listed() -> str | None:
                _, page = await api(http, "GET", "/opamp/agents", admin)
                return page["items"][0]["instance_uid"] if page["items"] else None

            await wait_until(listed)
            uid = await listed()
            path = f"/opamp/agents/{uid}/config"
            status, pushed = await api(http, "PUT", path, admin, {"files": YAML})
            assert status == 200 and pushed["status"] == "pending"

            async def applied() -> bool:
                _, shown = await api(http, "GET", path, admin)
                return bool(shown["status"] == "applied")

            await wait_until(applied)
            _, shown = await api(http, "GET", path, admin)
            assert shown["config_hash"] == hash_of(YAML).hex()
            assert callbacks.configs == [
                (hash_of(YAML), {"collector.yaml": YAML["collector.yaml"]["body"].encode()})
            ]
            _, item = await api(http, "GET", f"/opamp/agents/{uid}", admin)
            assert item["remote_config_status"] == {
                "last_remote_config_hash": hash_of(YAML).hex(),
                "status": "applied",
                "error_message": "",
            }
            # Polls go on; the configuration is not offered again.
            before = brain.stats.opamp_messages["heartbeat"]
            await wait_until(lambda: brain.stats.opamp_messages["heartbeat"] >= before + 3)
            assert len(callbacks.configs) == 1
    finally:
        await trio.to_thread.run_sync(lambda: agent.stop(timeout=5))
        atexit.unregister(agent.stop)
