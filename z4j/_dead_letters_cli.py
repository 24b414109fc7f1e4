"""``z4j dead-letters list/show/requeue/discard``: a buffer file's dead letters, offline.

The buffer file is locked to the brain process that uses it, so these work
on the local data directory while that brain is stopped (the next start
drains what was re-queued); while it runs, its API and dashboard do the same
(`BufferInUse` says so). Another instance's file is named with
``--buffer-path``. Re-queues and discards are counted in the file (the
brain's metrics carry the totals) and audited in the store as ``cli:<user>``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
import trio

from ._cli_out import emit
from .buffer import BufferFile, BufferFull, BufferInUse
from .config import Config
from .dead_letters import DETAIL_BODY_BYTES, LIST_BODY_BYTES, MAX_IDS, dead_letter_json

__all__ = ["run_dead_letters"]


class _Refused(Exception):
    """A one-line refusal for stderr."""


async def run_dead_letters(args: argparse.Namespace, config: Config, actor: str) -> int:
    path = config.resolved_buffer_path
    try:
        if not path.exists():
            raise _Refused(f"no buffer file at {path} (set --data-dir or --buffer-path)")
        try:
            buffer = await trio.to_thread.run_sync(BufferFile, path)
        except BufferInUse:
            raise _Refused(
                f"a running brain holds {path}: use its API (/api/v1/dead-letters) or its "
                "dashboard's Dead letters page, or stop it first"
            ) from None
        try:
            return await _ACTIONS[args.action](args, config, buffer, actor)
        finally:
            await trio.to_thread.run_sync(buffer.close)
    except (_Refused, BufferFull, OSError, ValueError) as exc:
        print(f"z4j dead-letters {args.action}: {exc}", file=sys.stderr)
        return 1


_out = emit


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


async def _list(args: argparse.Namespace, config: Config, buf: BufferFile, actor: str) -> int:
    letters = await trio.to_thread.run_sync(
        lambda: buf.dead_letter_page(
            before=args.cursor, limit=args.limit + 1, body_bytes=LIST_BODY_BYTES
        )
    )
    more = len(letters) > args.limit
    letters = letters[: args.limit]
    buffer_id = str(buf.buffer_id)
    items = [dead_letter_json(d, buffer_id=buffer_id) for d in letters]
    cursor = str(letters[-1].id) if more else None

    def text() -> str:
        lines = [f"{'ID':>8}  {'FAILED AT (UTC)':19}  {'SOURCE':16}  {'BYTES':>8}  ERROR"]
        for d in letters:
            error = " ".join(d.error.split())[:80]
            lines.append(
                f"{d.id:>8}  {_when(d.failed_at)}  {d.source[:16]:16}  {d.body_bytes:>8}  {error}"
            )
        lines.append(f"{buf.dead_letter_rows} in {buf.path}")
        if cursor:
            lines.append(f"more: --cursor {cursor}")
        return "\n".join(lines)

    # A list prints a JSON array like every list command; where the next page
    # starts goes to stderr, as a hint for people.
    _out(args, items, text)
    if cursor and args.json:
        print(f"more: --cursor {cursor}", file=sys.stderr)
    return 0


async def _show(args: argparse.Namespace, config: Config, buf: BufferFile, actor: str) -> int:
    letter = await trio.to_thread.run_sync(
        lambda: buf.dead_letter(args.id, body_bytes=DETAIL_BODY_BYTES)
    )
    if letter is None:
        raise _Refused(f"no dead letter {args.id} in {buf.path}")
    item = dead_letter_json(letter, buffer_id=str(buf.buffer_id))

    def text() -> str:
        cut = (
            f" (first {len(letter.body)} of {letter.body_bytes} bytes)"
            if item["body_truncated"]
            else ""
        )
        return "\n".join(
            [
                f"id:          {letter.id}",
                f"source:      {letter.source}",
                f"origin:      {orjson.dumps(item['origin']).decode()}",
                f"received at: {_when(letter.received_at)} UTC",
                f"failed at:   {_when(letter.failed_at)} UTC",
                f"error:       {item['error']}",
                f"body ({item['body_encoding']}){cut}:",
                item["body"],
            ]
        )

    _out(args, item, text)
    return 0


def _ids(args: argparse.Namespace, buf: BufferFile) -> list[int]:
    if args.all:
        return [d.id for d in buf.dead_letter_page(before=None, limit=MAX_IDS, body_bytes=0)]
    if not args.ids:
        raise _Refused("name the ids to act on, or --all")
    return list(args.ids)


async def _requeue(args: argparse.Namespace, config: Config, buf: BufferFile, actor: str) -> int:
    def run() -> dict[int, int]:
        return buf.requeue(_ids(args, buf), config.buffer_max_rows)

    moved = await trio.to_thread.run_sync(run)
    audited = await _audit(
        config, buf, actor, "dead_letter.requeued", {o: {"row_id": n} for o, n in moved.items()}
    )
    _out(
        args,
        {"requeued": [{"id": o, "row_id": n} for o, n in moved.items()]},
        lambda: (
            f"re-queued {len(moved)} (drained at the brain's next start)"
            + "".join(f"\n{o} -> payload row {n}" for o, n in moved.items())
        ),
    )
    return 0 if audited else 1


async def _discard(args: argparse.Namespace, config: Config, buf: BufferFile, actor: str) -> int:
    gone = await trio.to_thread.run_sync(lambda: buf.discard(_ids(args, buf)))
    audited = await _audit(config, buf, actor, "dead_letter.discarded", {i: {} for i in gone})
    _out(args, {"discarded": gone}, lambda: f"discarded {len(gone)}")
    return 0 if audited else 1


async def _audit(
    config: Config, buf: BufferFile, actor: str, action: str, rows: dict[int, dict[str, Any]]
) -> bool:
    """One audit row per dead letter, as the API writes them. The file changed
    already: a store that cannot be reached is reported (exit 1), the change stands."""
    if not rows:
        return True
    from .store import store_for

    store = store_for(config, application_name="z4j-cli")
    try:
        await store.migrate()
        for row_id, extra in rows.items():
            await store.audit(
                action, f"{buf.buffer_id}/{row_id}", {"instance": "cli", **extra}, actor=actor
            )
    except Exception as exc:
        print(f"z4j dead-letters: done, but not audited: {exc}", file=sys.stderr)
        return False
    finally:
        await store.aclose()
    return True


_ACTIONS = {"list": _list, "show": _show, "requeue": _requeue, "discard": _discard}
