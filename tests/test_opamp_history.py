"""Each OpAMP agent's history (z4j/store/opamp_history.py): rows only when
something an operator sees changed, never per heartbeat, through a running
brain and the API's ``/opamp/agents/{uid}/history``.

Covered: the first message (connected, capabilities, description), many
unchanged heartbeats adding nothing, a health change with its new summary,
a pushed configuration's status moving (applying, then applied, each once,
in the same row as the agent's own report), a repeated report adding
nothing, the goodbye, keyset pages, an agent given a new instance id
keeping its history, and the leader's upkeep forgetting old rows.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import trio
from test_opamp_ws import FILES, api, digest_of, hello, ready, status

from z4j.config import Config
from z4j.protocol.opamp import AgentCapability, AgentFlag
from z4j.protocol.opamp import opamp_pb2 as pb
from z4j.store import store_for
from z4j.testing import admin_token, opamp_socket, opamp_token, running_brain, wait_until

UID = uuid.UUID("0190b1c2-0000-7000-8000-0000000000bb").bytes


async def history(
    address: tuple[str, int], token: str, uid: bytes, query: str = ""
) -> dict[str, Any]:
    code, body = await api(address, "GET", f"/opamp/agents/{uid.hex()}/history{query}", token)
    assert code == 200, body
    assert isinstance(body, dict)
    return body


def unhealthy(uid: bytes, seq: int) -> pb.AgentToServer:
    message = pb.AgentToServer(instance_uid=uid, sequence_num=seq)
    message.health.healthy = False
    message.health.status = "exporter down"
    return message


async def test_history_rows_only_when_something_changed(config: Config) -> None:
    token = await opamp_token(config, "history")
    admin = await admin_token(config)
    async with running_brain(config) as brain:
        http = brain.addresses.http
        await ready(http)
        async with opamp_socket(http, token) as ws:
            caps = AgentCapability.REPORTS_STATUS | AgentCapability.ACCEPTS_REMOTE_CONFIG
            caps |= AgentCapability.REPORTS_HEALTH | AgentCapability.REPORTS_REMOTE_CONFIG
            await ws.exchange(hello(UID, 0, caps))
            first = (await history(http, admin, UID))["items"]
            assert [e["changes"] for e in first] == [
                ["connected", "capabilities", "agent_description"]
            ]
            assert first[0]["details"]["agent_description"]["identifying"] == {
                "service.name": "ws-agent"
            }
            # Heartbeats that change nothing add no row.
            seq = 0
            for _ in range(20):
                seq += 1
                await ws.exchange(pb.AgentToServer(instance_uid=UID, sequence_num=seq))
            assert len((await history(http, admin, UID))["items"]) == 1

            seq += 1
            await ws.exchange(unhealthy(UID, seq))
            latest = (await history(http, admin, UID))["items"][0]
            assert latest["changes"] == ["health"]
            assert latest["details"]["health"]["healthy"] is False
            assert latest["details"]["health"]["status"] == "exporter down"
            # The same report again is no change.
            seq += 1
            await ws.exchange(unhealthy(UID, seq))
            assert len((await history(http, admin, UID))["items"]) == 2

            # A pushed configuration: its status moves with the agent's reports.
            code, body = await api(
                http, "PUT", f"/opamp/agents/{UID.hex()}/config", admin, {"files": FILES}
            )
            assert code == 200, body
            digest = digest_of(FILES)
            with trio.fail_after(30):
                pushed = await ws.receive()
            assert pushed.remote_config.config_hash == digest
            for state in (
                pb.RemoteConfigStatus.STATUS_APPLYING,
                pb.RemoteConfigStatus.STATUS_APPLIED,
                pb.RemoteConfigStatus.STATUS_APPLIED,  # repeated: nothing moves
            ):
                seq += 1
                await ws.exchange(status(UID, seq, digest, state))
            items = (await history(http, admin, UID))["items"]
            assert [e["changes"] for e in items[:2]] == [
                ["remote_config_status", "config_status"],
                ["remote_config_status", "config_status"],
            ]
            assert [e["details"]["config_status"]["status"] for e in items[:2]] == [
                "applied",
                "applying",
            ]
            assert items[0]["details"]["config_status"]["config_hash"] == digest.hex()
            assert len(items) == 4

            seq += 1
            goodbye = pb.AgentToServer(instance_uid=UID, sequence_num=seq)
            goodbye.agent_disconnect.SetInParent()
            await ws.exchange(goodbye)

        items = (await history(http, admin, UID))["items"]
        assert items[0]["changes"] == ["disconnected"]
        assert len(items) == 5
        # Keyset pages, newest first, meet the whole list exactly.
        seen: list[int] = []
        cursor = ""
        while True:
            body = await history(http, admin, UID, f"?limit=2{cursor}")
            seen += [e["id"] for e in body["items"]]
            if body["next_cursor"] is None:
                break
            cursor = f"&cursor={body['next_cursor']}"
        assert seen == [e["id"] for e in items]
        code, _ = await api(http, "GET", f"/opamp/agents/{uid_of(9).hex()}/history", admin)
        assert code == 404
        code, _ = await api(http, "GET", f"/opamp/agents/{UID.hex()}/history?cursor=x", admin)
        assert code == 400


def uid_of(n: int) -> bytes:
    return uuid.UUID(int=n).bytes


async def test_a_new_instance_uid_keeps_the_history(config: Config) -> None:
    token = await opamp_token(config, "history")
    admin = await admin_token(config)
    async with running_brain(config) as brain:
        http = brain.addresses.http
        await ready(http)
        async with opamp_socket(http, token) as ws:
            old = uid_of(1)
            await ws.exchange(hello(old, 0))
            ask = pb.AgentToServer(instance_uid=old, sequence_num=1)
            ask.flags = int(AgentFlag.REQUEST_INSTANCE_UID)
            reply = await ws.exchange(ask)
            new = reply.agent_identification.new_instance_uid
            assert len(new) == 16 and new != old

        async def moved() -> bool:
            code, _ = await api(http, "GET", f"/opamp/agents/{new.hex()}/history", admin)
            return code == 200

        await wait_until(moved)
        items = (await history(http, admin, new))["items"]
        assert [e["changes"] for e in items] == [
            ["instance_uid"],
            ["connected", "capabilities", "agent_description"],
        ]
        assert items[0]["details"]["instance_uid"] == new.hex()


async def test_upkeep_forgets_old_history(config: Config) -> None:
    token = await opamp_token(config, "history")
    async with running_brain(config) as brain:
        http = brain.addresses.http
        await ready(http)
        async with opamp_socket(http, token) as ws:
            await ws.exchange(hello(uid_of(2), 0))
            await ws.exchange(unhealthy(uid_of(2), 1))
    store = store_for(config)
    try:
        [project] = [p for p in await store.list_projects() if p.name == "history"]
        assert len(await store.list_opamp_history(project.id, uid_of(2))) == 2
        assert await store.forget_opamp_history(before=time.time() - 3600) == 0
        assert await store.forget_opamp_history(before=time.time() + 1) == 2
        assert await store.list_opamp_history(project.id, uid_of(2)) == []
    finally:
        await store.aclose()
