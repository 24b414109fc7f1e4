"""The ``z4j`` command: ``brain``, ``migrate`` and ``send``."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import trio

from ._version import __version__
from .buffer import BufferInUse
from .config import (
    FIELDS,
    HELP,
    SECRET_FIELDS,
    Config,
    ConfigError,
    env_name,
    load_config,
    parse_bind,
    reference_markdown,
)
from .logs import configure_logging

__all__ = ["main"]

log = logging.getLogger("z4j.cli")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file of settings (or Z4J_CONFIG)")
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        if FIELDS[name].type is bool:
            parser.add_argument(
                flag,
                dest=name,
                default=None,
                choices=["true", "false"],
                help=f"{HELP[name]} [{env_name(name)}]",
            )
        else:
            parser.add_argument(
                flag,
                dest=name,
                default=None,
                metavar="VALUE",
                help=f"{HELP[name]} [{env_name(name)}]",
            )


def _config_from(args: argparse.Namespace) -> Config:
    overrides = {name: getattr(args, name) for name in FIELDS}
    return load_config(file=args.config, overrides=overrides)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="z4j", description="z4j brain and tools")
    parser.add_argument("--version", action="version", version=f"z4j {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    brain = sub.add_parser("brain", help="run a brain (SQLite in ./.z4j unless configured)")
    _add_config_flags(brain)

    migrate = sub.add_parser("migrate", help="apply the schema to the configured store")
    _add_config_flags(migrate)

    show = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    _add_config_flags(show)
    show.add_argument(
        "--reference", action="store_true", help="print the settings table of docs/configuration.md"
    )

    send = sub.add_parser(
        "send",
        help="send records to a brain's ingest port",
        description="Read records (a JSON array, or one JSON object per line) from FILE "
        "or stdin and send them. Exit status 1 if any payload is refused.",
    )
    send.add_argument("file", nargs="?", default="-", help="input file, - for stdin (default)")
    send.add_argument("--ingest", default="127.0.0.1:2407", help="HOST:PORT (default %(default)s)")
    send.add_argument("--token", default=None, help="ingest token (default: Z4J_INGEST_TOKEN)")
    send.add_argument(
        "--batch", type=_positive_int, default=100, help="records per payload (default 100)"
    )
    send.add_argument("--gzip", action="store_true", help="gzip each payload")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "send":
        return _send(args)
    if args.command == "config" and args.reference:
        print(reference_markdown(), end="")
        return 0
    try:
        config = _config_from(args)
    except ConfigError as exc:
        print(f"z4j: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        for name in FIELDS:
            value = getattr(config, name)
            if name == "database_url" and value:
                value = re.sub(r"(//[^:/@]*:)[^@]*@", r"\1********@", value)
            elif name in SECRET_FIELDS and value:
                value = "********"
            print(f"{env_name(name)}={'' if value is None else value}")
        return 0
    configure_logging(config.log_level, config.log_format)
    if args.command == "brain":
        return trio.run(_run_brain, config)
    return trio.run(_migrate, config)


async def _run_brain(config: Config) -> int:
    from .brain import serve_brain

    shutdown = trio.Event()
    failed = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, shutdown, nursery.cancel_scope)
            await serve_brain(config, shutdown=shutdown)
            # A graceful stop returned; stop watching signals too.
            nursery.cancel_scope.cancel()
    except* (OSError, BufferInUse) as group:  # a port in use, a buffer in use, ...
        for exc in group.exceptions:
            log.error("%s", exc)
        failed = True
    return 1 if failed else 0


async def _watch_signals(shutdown: trio.Event, scope: trio.CancelScope) -> None:
    first_at = 0.0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not shutdown.is_set():
                log.info(
                    "%s: stopping gracefully (send again to stop at once)",
                    signal.Signals(signum).name,
                )
                shutdown.set()
                first_at = trio.current_time()
            elif trio.current_time() - first_at < 1.0:
                # One signal often arrives twice (to the process group and
                # forwarded by a wrapper); only a deliberate second one counts.
                continue
            else:
                log.warning("second signal: stopping now")
                scope.cancel()
                return


async def _migrate(config: Config) -> int:
    from .store import store_for

    store = store_for(config)
    try:
        applied = await store.migrate()
    except Exception as exc:
        log.error("migration failed: %s", exc)
        return 1
    finally:
        await store.aclose()
    if applied:
        print(f"applied migrations: {', '.join(map(str, applied))}")
    else:
        print("schema is up to date")
    return 0


def _read_records(path: str) -> Iterator[dict[str, Any]]:
    text = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    stripped = text.lstrip()
    if stripped.startswith(b"["):
        yield from orjson.loads(stripped)
        return
    for line in text.splitlines():
        if line.strip():
            yield orjson.loads(line)


def _send(args: argparse.Namespace) -> int:
    import os

    from .ingest import connect

    host, port = parse_bind(args.ingest)
    token = args.token if args.token is not None else os.environ.get("Z4J_INGEST_TOKEN") or None
    try:
        records = list(_read_records(args.file))
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"z4j send: cannot read records: {exc}", file=sys.stderr)
        return 2
    batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    try:
        with connect(host, port, token=token, compress=args.gzip) as client:
            results = client.send_many(batches) if batches else []
    except OSError as exc:
        print(f"z4j send: {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    refused = results.count(False)
    print(
        f"sent {len(records)} records in {len(batches)} payloads: "
        f"{len(batches) - refused} stored, {refused} refused",
        file=sys.stderr,
    )
    return 1 if refused else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
