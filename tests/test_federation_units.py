"""Federation's sans-IO parts and its configuration, without a brain.

- The merge of regions' pages: paging through any mix of regions (short
  pages with more to come included) gives every row once, in time order;
  a region that fails keeps its place; a cursor that is not ours is refused.
- The answer cache: an entry lives its time, and the cache stays within
  its entries and bytes.
- The peers' configuration: Z4J_FEDERATION_PEERS and the peers file, and
  what each refusal says; no token in a Peer's repr.
- ``z4j federation token create/list/revoke``: a read-only token by
  default, --allow-commands, --expires; revoked, its next request is 401.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from z4j._federation_peers import Peer, load_peers, parse_peer_list
from z4j.brain.federation.cache import TtlCache
from z4j.brain.federation.merge import (
    BadCursor,
    BadPage,
    Place,
    RegionPage,
    decode_cursor,
    encode_cursor,
    merge,
    region_page,
)
from z4j.config import ConfigError
from z4j.testing.brain import make_config, run_z4j

# -- the merge ---------------------------------------------------------------------------


def _region_rows(rng: random.Random, name: str, n: int) -> list[dict[str, Any]]:
    """Rows newest first, times with ties (within and across regions)."""
    times = sorted((round(rng.uniform(0, 50), 0) for _ in range(n)), reverse=True)
    return [
        {"id": f"{name}-{i}", "sort_at": at, "cursor": f"{name}:{i}"} for i, at in enumerate(times)
    ]


def _answer(
    rows: list[dict[str, Any]], place: Place, limit: int, scan: int | None
) -> dict[str, Any]:
    """A region's page as the peer routes give it: after ``place``, at most
    ``limit`` rows; with ``scan``, a text search that reads only that many
    rows a page (so a page may be short, even empty, with more to come)."""
    start = 0 if place is None else int(str(place).split(":")[1]) + 1
    end = min(len(rows), start + (limit if scan is None else min(limit, scan)))
    taken = [r for r in rows[start:end] if scan is None or int(r["id"].split("-")[1]) % 3]
    more = end < len(rows)
    last = rows[end - 1] if end > start else None
    return {
        "items": taken,
        "next_cursor": last["cursor"] if more and last else (place if more else None),
        "frontier": last["sort_at"]
        if more and last
        else (rows[start]["sort_at"] if more else None),
    }


@pytest.mark.parametrize("seed", range(40))
def test_paging_through_merged_regions_gives_every_row_once_in_time_order(seed: int) -> None:
    rng = random.Random(seed)
    regions = {f"r{i}": _region_rows(rng, f"r{i}", rng.randint(0, 30)) for i in range(3)}
    scan = rng.choice([None, 2, 5])
    limit = rng.randint(1, 8)
    places: dict[str, Place] = dict.fromkeys(regions)
    seen: list[dict[str, Any]] = []
    for _ in range(500):
        pages = {
            name: region_page(_answer(rows, places[name], limit, scan))
            for name, rows in regions.items()
            if places[name] is not False
        }
        merged, places = merge(pages, places, limit)
        assert len(merged) <= limit
        seen += [item for _, item in merged]
        cursor = encode_cursor(places)
        if cursor is None:
            break
        assert decode_cursor(cursor, regions) == places
    else:
        raise AssertionError("paging did not end")
    expected = [r for rows in regions.values() for r in rows]
    if scan is not None:
        expected = [r for r in expected if int(r["id"].split("-")[1]) % 3]
    assert sorted(r["id"] for r in seen) == sorted(r["id"] for r in expected)
    assert [r["sort_at"] for r in seen] == sorted((r["sort_at"] for r in seen), reverse=True)


def test_a_region_without_a_page_keeps_its_place() -> None:
    page = RegionPage(items=[{"sort_at": 5.0, "cursor": "a:0"}], next_cursor=None, frontier=None)
    merged, places = merge({"a": page}, {"a": None, "b": "b:7"}, 10)
    assert [region for region, _ in merged] == ["a"]
    assert places == {"a": False, "b": "b:7"}
    assert encode_cursor(places) is not None  # b is not done: a later page may hold its rows
    assert encode_cursor({"a": False, "b": False}) is None


def test_rows_older_than_a_region_answered_for_wait_for_its_next_page() -> None:
    # a answered down to t=10 and has more; b's rows at 3 must not jump ahead of a's.
    a = RegionPage(items=[{"sort_at": 12.0, "cursor": "a:0"}], next_cursor="a:0", frontier=10.0)
    b = RegionPage(
        items=[{"sort_at": 11.0, "cursor": "b:0"}, {"sort_at": 3.0, "cursor": "b:1"}],
        next_cursor=None,
        frontier=None,
    )
    merged, places = merge({"a": a, "b": b}, {"a": None, "b": None}, 10)
    assert [item["cursor"] for _, item in merged] == ["a:0", "b:0"]
    assert places == {"a": "a:0", "b": "b:0"}


@pytest.mark.parametrize(
    "body",
    [
        None,
        {"items": "no"},
        {"items": [{"sort_at": 1.0}]},  # no cursor
        {"items": [{"cursor": "x"}]},  # no time
        {"items": [{"sort_at": True, "cursor": "x"}]},
        {"items": [{"sort_at": 1.0, "cursor": "x" * 300}]},
        {
            "items": [{"sort_at": 1.0, "cursor": "a"}, {"sort_at": 2.0, "cursor": "b"}]
        },  # out of order
        {"items": [], "next_cursor": "x"},  # more to come, no frontier
        {"items": [], "next_cursor": 5, "frontier": 1.0},
    ],
)
def test_a_malformed_page_is_refused(body: Any) -> None:
    with pytest.raises(BadPage):
        region_page(body)


@pytest.mark.parametrize(
    "cursor",
    [
        "not base64 at all!",
        "e30",  # {}
        encode_cursor({"elsewhere": "x"}),
        encode_cursor({"a": True}),  # type: ignore[dict-item]
        encode_cursor({"a": "y" * 300}),
        "A" * 9000,
    ],
)
def test_a_cursor_we_did_not_make_is_refused(cursor: str | None) -> None:
    assert cursor is not None
    with pytest.raises(BadCursor):
        decode_cursor(cursor, ["a", "b"])


# -- the cache ---------------------------------------------------------------------------


def test_the_cache_keeps_answers_for_their_time_within_its_bounds() -> None:
    now = [0.0]
    cache: TtlCache[str] = TtlCache(ttl=2.0, max_entries=3, max_bytes=100, clock=lambda: now[0])
    cache.put("a", "A", 10)
    assert cache.get("a") == "A"
    now[0] = 2.0
    assert cache.get("a") is None and len(cache) == 0 and cache.bytes == 0
    for key in "bcde":  # four entries, room for three: the least recently used goes
        cache.put(key, key.upper(), 10)
    assert cache.get("b") is None and [cache.get(k) for k in "cde"] == ["C", "D", "E"]
    cache.put("f", "F", 95)  # over the byte budget with the others: they go
    assert cache.get("f") == "F" and len(cache) == 1 and cache.bytes == 95
    cache.put("g", "G", 101)  # larger than the whole budget: not kept
    assert cache.get("g") is None and cache.get("f") == "F"
    off: TtlCache[str] = TtlCache(ttl=0, max_entries=3, max_bytes=100, clock=lambda: now[0])
    off.put("a", "A", 1)
    assert off.get("a") is None


# -- the peers' configuration --------------------------------------------------------------


def test_the_peer_list_names_and_urls() -> None:
    assert parse_peer_list(" east=https://e.example:7700/ , west=http://127.0.0.1:9") == {
        "east": "https://e.example:7700",
        "west": "http://127.0.0.1:9",
    }
    for bad, says in [
        ("east", "NAME=URL"),
        ("east=ftp://x", "base URL"),
        ("east=https://u:p@x", "credentials"),
        ("-x=https://x", "region name"),
        ("a=https://x,a=https://y", "twice"),
        ("a=https://x:99999", "port"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_peer_list(bad)


def test_peers_take_their_tokens_from_the_file_never_the_environment(tmp_path: Path) -> None:
    file = tmp_path / "peers.toml"
    file.write_text(
        '[east]\ntoken = "z4j_fed_secret"\n[west]\ntoken = "z4j_fed_w"\nurl = "https://w:1"\n'
    )
    config = make_config(
        tmp_path, federation_peers="east=https://e:7700", federation_peers_file=file
    )
    east, west = load_peers(config)
    assert east == Peer(name="east", url="https://e:7700", token="z4j_fed_secret")
    assert west.url == "https://w:1"
    assert "z4j_fed_secret" not in repr(east)
    assert load_peers(make_config(tmp_path)) == ()

    def refused(settings: dict[str, Any], text: str | None = None) -> str:
        if text is not None:
            file.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_peers(make_config(tmp_path, **settings))
        return str(caught.value)

    assert "Z4J_FEDERATION_PEERS_FILE is unset" in refused({"federation_peers": "e=https://e"})
    on_file = {"federation_peers_file": file}
    assert "needs token" in refused(on_file, '[east]\nurl = "https://e"\n')
    assert "needs token" in refused(on_file, '[east]\nurl = "https://e"\ntoken = "z4j_admin_x"\n')
    assert "no URL" in refused(on_file, '[east]\ntoken = "z4j_fed_x"\n')
    assert "unknown keys" in refused(
        on_file, '[east]\ntoken = "z4j_fed_x"\nurl = "https://e"\nx=1\n'
    )
    assert "ca must name" in refused(
        on_file, '[east]\ntoken = "z4j_fed_x"\nurl = "https://e"\nca = "/no/such.pem"\n'
    )
    assert "not valid TOML" in refused(on_file, "[east\n")
    assert "also a peer's name" in refused(
        {**on_file, "region_name": "east"}, '[east]\ntoken = "z4j_fed_x"\nurl = "https://e"\n'
    )
    missing = {"federation_peers_file": tmp_path / "nope.toml"}
    assert "nope.toml" in refused(missing)


# -- the command line -----------------------------------------------------------------------


def test_federation_tokens_from_the_command_line(tmp_path: Path) -> None:
    env = {"Z4J_DATA_DIR": str(tmp_path / "data")}
    made = run_z4j("federation", "token", "create", "--name", "hub", env=env)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("z4j_fed_") and "read-only" in made.stderr
    made = run_z4j(
        "federation",
        "token",
        "create",
        "--name",
        "ops",
        "--allow-commands",
        "--expires",
        "30d",
        env=env,
    )
    assert made.returncode == 0 and "send commands" in made.stderr
    both = run_z4j(
        "federation", "token", "create", "--name", "x", "--read-only", "--allow-commands", env=env
    )
    assert both.returncode == 2 and "not allowed with" in both.stderr
    bad = run_z4j("federation", "token", "create", "--name", "x", "--expires", "soon", env=env)
    assert bad.returncode == 2 and "90d" in bad.stderr

    listed = run_z4j("federation", "token", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["hub"]["allow_commands"] is False and rows["hub"]["expires_at"] is None
    assert rows["ops"]["allow_commands"] is True and rows["ops"]["expires_at"]
    assert token not in listed.stdout

    gone = run_z4j("federation", "token", "revoke", "hub", env=env)
    assert gone.returncode == 0 and "revoked" in gone.stdout
    again = run_z4j("federation", "token", "revoke", "hub", env=env)
    assert again.returncode == 1 and "no live federation token" in again.stderr
    listed = run_z4j("federation", "token", "list", env=env)
    assert "revoked" in listed.stdout and "active" in listed.stdout
