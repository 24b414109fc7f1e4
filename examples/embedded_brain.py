"""A brain embedded in a Trio program, fed by the Trio ingest client.

Run it: ``python examples/embedded_brain.py`` — it starts a brain on free
loopback ports with a temporary data directory, sends a few records, waits
for them to be stored, prints them and stops.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import trio

import z4j
import z4j.ingest


async def main() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="z4j-example-"))
    config = z4j.load_config(
        env={},
        overrides={
            "data_dir": data_dir,
            "ingest_bind": "127.0.0.1:0",
            "http_bind": "127.0.0.1:0",
        },
    )
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(z4j.serve_brain, config)  # a z4j.Brain
        print(f"brain ready: ingest {addresses.ingest}, http {addresses.http_url}")

        async with await z4j.ingest.open_trio(*addresses.ingest) as client:
            await client.send([{"t": "log", "message": "hello"}, {"t": "job", "name": "send_mail"}])
            print("sent 2 records; both are durable now")

        # The drain moves them into the store within moments.
        store = config.sqlite_store_path
        with trio.fail_after(10):
            while True:
                await trio.sleep(0.1)
                rows = await trio.to_thread.run_sync(_events, store)
                if len(rows) == 2:
                    break
        for kind, body in rows:
            print(f"stored: kind={kind} body={body}")
        nursery.cancel_scope.cancel()


def _events(store: Path) -> list[tuple[str, str]]:
    if not store.exists():
        return []
    db = sqlite3.connect(store)
    try:
        return db.execute("SELECT kind, body FROM events ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # not migrated yet
        return []
    finally:
        db.close()


if __name__ == "__main__":
    trio.run(main)
