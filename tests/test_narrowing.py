"""A user narrowed to projects sees those and nothing of the others; a
route that cannot keep to their projects is refused to them (narrowing.py)."""

from __future__ import annotations

import trio
from test_accounts_api import PASSWORD, _sign_in
from test_api import call

from z4j.config import Config
from z4j.testing.agents import admin_token, provision
from z4j.testing.brain import running_brain


async def test_a_narrowed_user_sees_only_their_projects(config: Config) -> None:
    legacy = await admin_token(config)
    _, _, mine = await provision(config, project="shop", agent="a")
    _, _, theirs = await provision(config, project="bank", agent="b")
    with trio.fail_after(60):
        async with running_brain(config) as brain:
            http = brain.addresses.http
            new = {"name": "nina", "password": PASSWORD, "role": "operator", "projects": ["shop"]}
            status, _, user = await call(http, "POST", "/api/v1/users", token=legacy, body=new)
            assert status == 201 and [p["name"] for p in user["projects"]] == ["shop"], user
            cookie, _ = await _sign_in(http, "nina")

            async def get(path: str) -> tuple[int, object]:
                status, _, body = await call(http, "GET", path, cookie=cookie)
                return status, body

            _, projects = await get("/api/v1/projects")
            assert [p["name"] for p in projects["items"]] == ["shop"]  # type: ignore[index]
            _, agents = await get("/api/v1/agents")
            assert [a["id"] for a in agents["items"]] == [str(mine)]  # type: ignore[index]
            assert (await get(f"/api/v1/agents/{mine}"))[0] == 200
            assert (await get(f"/api/v1/agents/{theirs}"))[0] == 404
            assert (await get(f"/api/v1/events?agent_id={mine}"))[0] == 200
            assert (await get(f"/api/v1/events?agent_id={theirs}"))[0] == 404
            assert (await get("/api/v1/events"))[0] == 400
            status, body = await get("/api/v1/tasks")
            assert status == 403 and body["error"] == "narrowed"  # type: ignore[index]
            ping = {"action": "ping"}
            ids = {}
            for agent in (mine, theirs):
                status, _, command = await call(
                    http,
                    "POST",
                    "/api/v1/commands",
                    token=legacy,
                    body={**ping, "agent": str(agent)},
                )
                assert status == 201
                ids[agent] = command["id"]
            assert (await get(f"/api/v1/commands/{ids[mine]}"))[0] == 200
            assert (await get(f"/api/v1/commands/{ids[theirs]}"))[0] == 404
            _, listed = await get(f"/api/v1/commands?agent_id={mine}")
            assert [c["id"] for c in listed["items"]] == [ids[mine]]  # type: ignore[index]
            # The same user unnarrowed sees both projects.
            status, _, _ = await call(http, "GET", "/api/v1/session", cookie=cookie)
            assert status == 200
            _, _, everything = await call(http, "GET", "/api/v1/agents", token=legacy)
            assert len(everything["items"]) == 2
