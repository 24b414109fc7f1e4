"""Regions' pages merged by time, and the cursor that continues them (sans-IO).

Each region answers a page newest first, each item with its own keyset
``cursor`` and its time ``sort_at``, and says down to which time its answer is
complete (``frontier``: the time of its last row read; None when nothing
older matches). A merged page may only hold rows that every region has
answered for: rows at or after the highest frontier among regions with
more to give. Of those, the newest ``limit`` are taken. Each region then
continues after its last row taken, and a region whose rows were all taken
continues where it said (or is done). So no row is skipped or repeated
across pages, and each page is in time order. A region that did not
answer keeps its place: a later page may hold its rows, and the answer
says it is partial.

The merged cursor is each region's place (its own cursor, None: from the
newest, False: done) as base64url JSON, bounded in size.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Mapping
from typing import Any, Final

import attrs
import orjson

__all__ = [
    "MAX_CURSOR_CHARS",
    "BadCursor",
    "BadPage",
    "Place",
    "RegionPage",
    "decode_cursor",
    "encode_cursor",
    "merge",
    "region_page",
]

# A region's place: its own cursor, None (from the newest) or False (done).
Place = str | None | bool
MAX_CURSOR_CHARS: Final = 8192
MAX_REGION_CURSOR_CHARS: Final = 256


class BadCursor(ValueError):
    """A merged cursor we did not make (or for other regions)."""


class BadPage(ValueError):
    """A region's answer that is not a page of the shape asked for."""


@attrs.frozen(kw_only=True)
class RegionPage:
    items: list[dict[str, Any]]  # newest first, each with "cursor" and "sort_at"
    next_cursor: str | None
    frontier: float | None


def _cursor_text(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REGION_CURSOR_CHARS:
        raise BadPage("a cursor must be a short string")
    return value


def region_page(body: object) -> RegionPage:
    """A region's answer as a `RegionPage`; `BadPage` if it is not one (a
    peer is not trusted to be well formed)."""
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise BadPage("not a page")
    items = []
    last = float("inf")
    for item in body["items"]:
        if not isinstance(item, dict):
            raise BadPage("an item is not an object")
        at = item.get("sort_at")
        if not isinstance(at, int | float) or isinstance(at, bool) or at != at:
            raise BadPage("an item without a time")
        if at > last:
            raise BadPage("items out of time order")
        last = float(at)
        _cursor_text(item.get("cursor"))
        items.append(item)
    next_cursor = body.get("next_cursor")
    frontier = body.get("frontier")
    if next_cursor is None:
        return RegionPage(items=items, next_cursor=None, frontier=None)
    if not isinstance(frontier, int | float) or isinstance(frontier, bool) or frontier != frontier:
        raise BadPage("a page with more to come names its frontier")
    return RegionPage(items=items, next_cursor=_cursor_text(next_cursor), frontier=float(frontier))


def merge(
    pages: Mapping[str, RegionPage], places: Mapping[str, Place], limit: int
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Place]]:
    """The newest ``limit`` rows all ``pages`` answer for, as (region, item),
    and every region's place after them (regions without a page keep theirs)."""
    frontiers = [p.frontier for p in pages.values() if p.next_cursor is not None]
    floor = max((f for f in frontiers if f is not None), default=float("-inf"))
    candidates = [
        (-float(item["sort_at"]), region, index, item)
        for region, page in pages.items()
        for index, item in enumerate(page.items)
        if item["sort_at"] >= floor
    ]
    candidates.sort(key=lambda c: (c[0], c[1], c[2]))
    taken = candidates[:limit]
    counts: dict[str, int] = {}
    for _, region, _, _ in taken:
        counts[region] = counts.get(region, 0) + 1
    after: dict[str, Place] = dict(places)
    for region, page in pages.items():
        n = counts.get(region, 0)
        if n == len(page.items):
            after[region] = page.next_cursor if page.next_cursor is not None else False
        elif n:
            after[region] = page.items[n - 1]["cursor"]
    return [(region, item) for _, region, _, item in taken], after


def encode_cursor(places: Mapping[str, Place]) -> str | None:
    """The merged cursor; None once every region is done."""
    if all(place is False for place in places.values()):
        return None
    data = orjson.dumps({"v": 1, "r": dict(sorted(places.items()))}, option=orjson.OPT_SORT_KEYS)
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def decode_cursor(text: str, regions: Collection[str]) -> dict[str, Place]:
    """Each region's place in a merged cursor (regions it does not name: from
    the newest); `BadCursor` if it is not one of ours."""
    if len(text) > MAX_CURSOR_CHARS:
        raise BadCursor("too long")
    try:
        data = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError):
        raise BadCursor("not a cursor of this API") from None
    if not isinstance(data, dict) or data.get("v") != 1 or not isinstance(data.get("r"), dict):
        raise BadCursor("not a cursor of this API")
    places: dict[str, Place] = dict.fromkeys(regions)
    for region, place in data["r"].items():
        if region not in places:
            raise BadCursor(f"names no region of this hub: {region!r}")
        if place is True or not (place is None or place is False or isinstance(place, str)):
            raise BadCursor("a region's place is its cursor, null or false")
        if isinstance(place, str) and not 0 < len(place) <= MAX_REGION_CURSOR_CHARS:
            raise BadCursor("a region's cursor is too long")
        places[region] = place
    return places
