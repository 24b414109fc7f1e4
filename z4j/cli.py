"""The ``z4j`` command: ``brain``, ``migrate``, ``backup``, ``doctor``,
``config``, ``send``, ``project``, ``agent``, ``admin``, ``command``,
``opamp``, ``user``, ``federation``, ``dead-letters`` (bodies of the larger
ones in _store_ops_cli.py, _doctor.py, cli_users.py, _federation_cli.py and
_dead_letters_cli.py).

Imports are lazy: ``z4j --version`` and ``z4j send`` load neither the brain
nor a store (Trio's, Hypercorn's and psycopg's imports took 1.4 s of them);
each subcommand imports what it runs.

One concern justifies the length (past 700 lines): the command line, its
parser and one thin function per subcommand over the store; each is a few
lines, and splitting them by noun would scatter the one parser they share.
"""

from __future__ import annotations

import argparse
import gc
import logging
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ._cli_out import add_json_flag, emit, iso
from ._federation_cli import FEDERATION_COMMANDS, add_federation_parser
from ._version import __version__
from .cli_users import USER_COMMANDS, add_user_parser
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

if TYPE_CHECKING:
    import trio

    from .brain import Brain
    from .store import Agent, CommandRecord, Project, Store

__all__ = ["main"]

log = logging.getLogger("z4j.cli")

# The settings each kind of command reads; its --help shows only these (every
# setting is still read from Z4J_* variables and --config, and checked).
LOGGING = ("log_level", "log_levels")
STORE = ("data_dir", "database_url", "db_pool_size", "db_statement_timeout_ms", *LOGGING)
KEYED = (*STORE, "secret")  # hashes tokens or derives signing secrets with the master secret
ADVERTISED = (*KEYED, "http_bind")  # also prints where agents reach the brain
BUFFER = ("buffer_path", "buffer_max_rows")
_REFERENCE = (
    "Settings also come from Z4J_* variables and --config FILE; this command reads only "
    "those listed. Every setting: docs/configuration.md (or `z4j config --reference`)."
)


def _add_config_flags(
    parser: argparse.ArgumentParser, names: Collection[str] | None = None
) -> None:
    """Flags for the settings ``names`` (all of them when None: the brain's)."""
    group = parser.add_argument_group("settings", None if names is None else _REFERENCE)
    # Absent flags stay out of the namespace (SUPPRESS): a subcommand's own
    # flags (`admin token list`) then never reset its parent's (`admin token`).
    group.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="TOML file of settings (or Z4J_CONFIG)",
    )
    for name in FIELDS:
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        if FIELDS[name].type is bool:
            group.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                choices=["true", "false"],
                help=f"{HELP[name]} [{env_name(name)}]",
            )
        else:
            group.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                metavar="VALUE",
                help=f"{HELP[name]} [{env_name(name)}]",
            )


def _log_levels(config: Config) -> dict[str, str]:
    """Z4J_LOG_LEVELS as loggers and levels (checked when the config was built)."""
    from .logs import parse_log_levels

    return parse_log_levels(config.log_levels or "")


def _config_from(args: argparse.Namespace) -> Config:
    overrides = {name: getattr(args, name, None) for name in FIELDS}
    return load_config(file=getattr(args, "config", None), overrides=overrides)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="z4j", description="z4j brain and tools")
    parser.add_argument("--version", action="version", version=f"z4j {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    brain = sub.add_parser(
        "brain",
        help="run a brain (SQLite in ./.z4j unless configured)",
        description="Run a brain until SIGINT or SIGTERM (graceful: it answers what it "
        "holds and exits 0 within --shutdown-grace-seconds). With --instances N > 1, "
        "run N brain processes on one host under a supervisor: they share "
        "--ingest-bind and --http-bind through SO_REUSEPORT (fixed ports, not 0), each "
        "has its own buffer file (instance 1 the usual one, instance i "
        "buffer-i.sqlite3 beside it) and its own row in instances, and they need the "
        "Postgres store (--database-url). The supervisor restarts an instance that "
        "dies (after 0.5 s, doubling up to 30 s), forwards signals, and exits 0 once "
        "all stopped; instances stop by themselves if it is killed. See "
        "docs/scaling.md.",
    )
    _add_config_flags(brain)
    # Internal: how `z4j brain --instances N` talks to the brains it starts.
    brain.add_argument("--supervisor-fd", type=int, default=None, help=argparse.SUPPRESS)
    brain.add_argument("--supervised-instance", type=int, default=None, help=argparse.SUPPRESS)

    migrate = sub.add_parser(
        "migrate",
        help="apply the schema to the configured store (--check: only say what is pending)",
        description="Apply the pending schema migrations (a brain also applies them as it "
        "starts). With --check apply nothing: exit 0 when the schema is current, 1 with "
        "the pending versions named when it is behind (for deploy pipelines).",
    )
    migrate.add_argument(
        "--check", action="store_true", help="apply nothing; exit 1 if any migration is pending"
    )
    _add_config_flags(migrate, STORE)

    backup = sub.add_parser(
        "backup",
        help="copy the embedded SQLite store to PATH (safe while the brain runs)",
        description="Copy DATA_DIR/store.sqlite3 to PATH with SQLite's online backup API: "
        "a consistent copy, taken while a brain runs. Not for a Postgres store (use "
        "pg_dump). Restore: see docs/operations.md.",
    )
    backup.add_argument("path", type=Path, metavar="PATH", help="the new file (must not exist)")
    _add_config_flags(backup, ("data_dir", "database_url", *LOGGING))

    doctor = sub.add_parser(
        "doctor",
        help="check settings, store, schema, clock skew and free disk; exit 1 on a failure",
        description="Check what a `z4j brain` with the same settings would meet: the "
        "settings load, the store answers, its schema is current, this host's clock agrees "
        "with Postgres', the buffer's disk has room. One line per check (ok, warn, fail, "
        "skip); exit 1 if any failed.",
    )
    doctor.add_argument(
        "--min-free-mib",
        type=_positive_int,
        default=256,
        help="free disk below this fails, below 4 times this warns (default %(default)s)",
    )
    add_json_flag(doctor)
    _add_config_flags(doctor)

    show = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    _add_config_flags(show)
    show.add_argument(
        "--reference", action="store_true", help="print the settings table of docs/configuration.md"
    )
    add_json_flag(show)

    send = sub.add_parser(
        "send",
        help="send records to a brain's ingest port",
        description="Read records (a JSON array, or one JSON object per line) from FILE "
        "or stdin and send them. A payload counts as accepted once the brain has it "
        "durably in its buffer (it reaches the store when drained). Exit status 1 if any "
        "payload is refused. Reads no brain settings but Z4J_INGEST_TOKEN.",
    )
    send.add_argument("file", nargs="?", default="-", help="input file, - for stdin (default)")
    send.add_argument("--ingest", default="127.0.0.1:2407", help="HOST:PORT (default %(default)s)")
    send.add_argument("--token", default=None, help="ingest token (default: Z4J_INGEST_TOKEN)")
    send.add_argument(
        "--batch", type=_positive_int, default=100, help="records per payload (default 100)"
    )
    send.add_argument("--gzip", action="store_true", help="gzip each payload")
    send.add_argument(
        "--tls",
        action="store_true",
        help="connect over TLS (a brain with Z4J_TLS_CERT_FILE), trusting the system's CAs",
    )
    send.add_argument(
        "--ca-file", type=Path, default=None, help="connect over TLS, trusting this PEM CA file"
    )
    send.add_argument(
        "--retry-seconds",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="after a broken connection, reconnect and resend what was not answered "
        "for up to SECONDS (default 30; 0: give up at the first break)",
    )

    project = sub.add_parser("project", help="create and list projects")
    project_sub = project.add_subparsers(dest="action", required=True)
    project_create = project_sub.add_parser("create", help="create a project")
    project_create.add_argument("name", type=_directory_name, help="its name (unique)")
    project_list = project_sub.add_parser("list", help="list the projects")

    agent = sub.add_parser("agent", help="create, list and revoke agents (and their tokens)")
    agent_sub = agent.add_subparsers(dest="action", required=True)
    agent_create = agent_sub.add_parser(
        "create",
        help="create an agent and print its token (shown only now)",
        description="Create an agent in a project and print its id, its token and the "
        "project's signing secret. The token is shown only now: the store keeps its hash.",
    )
    agent_create.add_argument("--project", required=True, help="project name or id")
    agent_create.add_argument("name", type=_directory_name, help="its name (unique in the project)")
    agent_list = agent_sub.add_parser("list", help="list agents (revoked ones too)")
    agent_list.add_argument("--project", default=None, help="only this project (name or id)")
    agent_revoke = agent_sub.add_parser("revoke", help="revoke an agent: its token stops working")
    agent_revoke.add_argument("agent", help="agent id, or name (with --project if ambiguous)")
    agent_revoke.add_argument("--project", default=None, help="project name or id")

    admin = sub.add_parser("admin", help="admin tokens for the API and the dashboard")
    admin_sub = admin.add_subparsers(dest="action", required=True)
    admin_token = admin_sub.add_parser(
        "token",
        help="make a new admin token and print it (shown only now); list; revoke",
        description="Make an admin token for the REST API and the dashboard sign-in. "
        "It is shown only now: the store keeps its keyed hash. `list` shows the tokens "
        "(never their secrets), `revoke` ends one and every session it opened.",
    )
    admin_token.add_argument("--name", default="admin", help="a label for it (default admin)")
    token_sub = admin_token.add_subparsers(dest="token_action", required=False)
    admin_token_list = token_sub.add_parser(
        "list", help="list admin tokens: id, name, created, last used (never the secret)"
    )
    token_revoke = token_sub.add_parser(
        "revoke",
        help="revoke an admin token: it and its dashboard sessions stop working at once",
    )
    token_revoke.add_argument("ref", metavar="NAME_OR_ID", help="the token's name or id")

    add_user_parser(sub, lambda leaf: _add_config_flags(leaf, KEYED), add_json_flag)
    add_federation_parser(sub, lambda leaf: _add_config_flags(leaf, KEYED), add_json_flag)

    opamp = sub.add_parser("opamp", help="OpAMP: bearer tokens for POST /v1/opamp")
    opamp_sub = opamp.add_subparsers(dest="action", required=True)
    opamp_token = opamp_sub.add_parser("token", help="create, list and revoke OpAMP tokens")
    opamp_token_sub = opamp_token.add_subparsers(dest="token_action", required=True)
    opamp_create = opamp_token_sub.add_parser(
        "create",
        help="make an OpAMP token for a project and print it (shown only now)",
        description="Make a bearer token OpAMP clients send to POST /v1/opamp. Agents it "
        "admits belong to the project; it never reads or writes another project's. It is "
        "shown only now: the store keeps its keyed hash.",
    )
    opamp_create.add_argument("--project", required=True, help="project name or id")
    opamp_create.add_argument("--name", default="opamp", help="a label for it (default opamp)")
    opamp_list = opamp_token_sub.add_parser(
        "list", help="list OpAMP tokens: id, project, name, created (never the secret)"
    )
    opamp_revoke = opamp_token_sub.add_parser(
        "revoke", help="revoke an OpAMP token: its agents' next requests get 401"
    )
    opamp_revoke.add_argument("ref", metavar="ID", help="the token's id (from list)")

    command = sub.add_parser("command", help="send commands to agents and follow them")
    command_sub = command.add_subparsers(dest="action", required=True)
    command_send = command_sub.add_parser(
        "send",
        help="mint a command for an agent",
        description="Mint a command. A running brain with a live worker of the agent "
        "delivers it within a second; it waits as pending until one connects or its "
        "timeout passes.",
    )
    command_send.add_argument("--agent", required=True, help="agent id, or name")
    command_send.add_argument("--project", default=None, help="project name or id")
    command_send.add_argument("name", metavar="ACTION", help="the action, e.g. schedule.resync")
    command_send.add_argument("--target", type=_json_object, default={}, help="JSON object")
    command_send.add_argument("--params", type=_json_object, default={}, help="JSON object")
    command_send.add_argument(
        "--timeout", type=_positive_int, default=60, help="seconds until it times out (default 60)"
    )
    command_send.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for a final state and print it (exit 1 unless completed)",
    )
    command_show = command_sub.add_parser(
        "show", help="print a command and its state (a JSON object, with or without --json)"
    )
    command_show.add_argument("id", type=uuid.UUID, help="the command id")

    dead = sub.add_parser(
        "dead-letters",
        help="payloads the store refused, in this instance's buffer file (brain stopped)",
        description="List, inspect, re-queue or discard the dead letters of the buffer file "
        "(Z4J_BUFFER_PATH, default DATA_DIR/buffer.sqlite3) while its brain is stopped; "
        "while it runs, use its API or dashboard. Re-queued payloads drain at the next start.",
    )
    dead_sub = dead.add_subparsers(dest="action", required=True)
    dead_list = dead_sub.add_parser(
        "list", help="list dead letters, newest first (the next page's --cursor on stderr)"
    )
    dead_list.add_argument("--limit", type=_positive_int, default=50, help="at most (default 50)")
    dead_list.add_argument("--cursor", type=_positive_int, default=None, help="ids below this")
    dead_show = dead_sub.add_parser("show", help="a dead letter's payload and the store's error")
    dead_show.add_argument("id", type=_positive_int)
    dead_leaves = [dead_list, dead_show]
    for verb, what in (("requeue", "put back for the drain"), ("discard", "delete for good")):
        leaf = dead_sub.add_parser(verb, help=f"{what}: the ids given, or --all")
        leaf.add_argument("ids", type=_positive_int, nargs="*", metavar="ID")
        leaf.add_argument("--all", action="store_true", help="every dead letter (up to 500)")
        dead_leaves.append(leaf)
    for leaf in dead_leaves:
        add_json_flag(leaf)
        _add_config_flags(leaf, (*STORE, *BUFFER))

    for leaf in (project_list, agent_list, admin_token_list, opamp_list, command_show):
        add_json_flag(leaf)
    for leaf in (
        project_create,
        project_list,
        agent_list,
        agent_revoke,
        command_send,
        command_show,
        admin_token_list,
        token_revoke,
        opamp_list,
        opamp_revoke,
    ):
        _add_config_flags(leaf, KEYED)
    for leaf in (agent_create, admin_token, opamp_create):
        _add_config_flags(leaf, ADVERTISED)
    return parser


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _directory_name(text: str) -> str:
    if not text or text != text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be printable, without surrounding spaces: {text!r}")
    try:
        uuid.UUID(text)
    except ValueError:
        return text
    raise argparse.ArgumentTypeError(f"must not look like an id: {text!r}")


def _quiet_logging(config: Config) -> None:
    """Only warnings and errors: stdout is for the answer, stderr for trouble."""
    from .logs import configure_logging

    configure_logging(
        "WARNING" if config.log_level == "INFO" else config.log_level,
        "text",
        levels=_log_levels(config),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "send":
        return _send(args)
    if args.command == "config" and args.reference:
        print(reference_markdown(), end="")
        return 0
    if args.command == "doctor":
        from ._doctor import run_doctor

        return run_doctor(args, _config_from)
    supervised = args.command == "brain" and args.supervisor_fd is not None
    try:
        config = _config_from(args)
        if args.command == "brain" and not supervised:
            from .supervisor import check_instances

            check_instances(config)
    except ConfigError as exc:
        print(f"z4j: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        _show_config(args, config)
        return 0
    import trio

    if args.command in ("project", "agent", "command", "admin", "opamp", "user", "federation"):
        _quiet_logging(config)
        return trio.run(_directory, args, config)
    if args.command == "dead-letters":
        from ._dead_letters_cli import run_dead_letters

        _quiet_logging(config)
        return trio.run(run_dead_letters, args, config, _actor())
    if args.command in ("migrate", "backup"):
        from ._store_ops_cli import backup, migrate

        _quiet_logging(config)
        if args.command == "backup":
            return trio.run(backup, config, args.path)
        return trio.run(migrate, config, args.check)
    from .logs import configure_logging

    if supervised:
        configure_logging(
            config.log_level,
            config.log_format,
            instance=args.supervised_instance,
            levels=_log_levels(config),
        )
        tune_interpreter(config)
        return trio.run(_run_brain, config, args.supervisor_fd)
    configure_logging(config.log_level, config.log_format, levels=_log_levels(config))
    from .supervisor import stranded_buffers, supervise

    _warn_if_original_installed()
    for path, rows in stranded_buffers(config):
        log.warning(
            "%s holds %d payloads no instance drains now (a buffer of an earlier run with "
            "more instances): start once with enough --instances, or with "
            "Z4J_BUFFER_PATH=%s, to drain it",
            path,
            rows,
            path,
        )
    if config.instances > 1:
        return trio.run(supervise, config)
    tune_interpreter(config)
    return trio.run(_run_brain, config)


def _show_config(args: argparse.Namespace, config: Config) -> None:
    shown: dict[str, str] = {}
    for name in FIELDS:
        value = getattr(config, name)
        if name in ("database_url", "database_read_url") and value:
            value = re.sub(r"(//[^:/@]*:)[^@]*@", r"\1********@", value)
        elif name in SECRET_FIELDS and value:
            value = "********"
        shown[env_name(name)] = "" if value is None else str(value)
    emit(args, shown, lambda: "\n".join(f"{k}={v}" for k, v in shown.items()))


def _warn_if_original_installed() -> None:
    """Say so when the original brain's distribution shares this environment:
    both install the module ``z4j`` and the command ``z4j``, so whichever was
    installed last has overwritten the other's files (docs/install.md)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("z4j")
    except importlib.metadata.PackageNotFoundError:
        return
    log.warning(
        "the distribution 'z4j' (the original z4j brain) is installed in this environment "
        "beside 'z4j-trio': both own the module z4j and the command z4j, so their files "
        "overwrite each other; give each its own virtual environment (docs/install.md)"
    )


async def _run_brain(config: Config, supervisor_fd: int | None = None) -> int:
    import trio

    from ._datadir import BrainAlreadyRunning
    from .brain import serve_brain
    from .buffer import BufferInUse
    from .supervisor import SupervisorLink

    shutdown = trio.Event()
    status = 0
    # Under `z4j brain --instances N`: stop when the supervisor is gone.
    link = None if supervisor_fd is None else SupervisorLink(supervisor_fd)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, shutdown, nursery.cancel_scope)
            if link is not None:
                nursery.start_soon(link.watch, shutdown)

            async def run(task_status: trio.TaskStatus[Brain]) -> None:
                await serve_brain(config, shutdown=shutdown, task_status=task_status)
                # A graceful stop returned; stop watching signals too.
                nursery.cancel_scope.cancel()

            brain = await nursery.start(run)
            if link is not None:
                await link.ready(brain.instance_id)
    except* (OSError, BufferInUse, BrainAlreadyRunning) as group:  # a port in use, ...
        for exc in _leaves(group):
            log.error("%s", exc)
        status = 1
    except* ConfigError as group:  # found only as a service starts (a TLS file, say)
        for exc in _leaves(group):
            print(f"z4j: configuration error: {exc}", file=sys.stderr)
        status = 2
    return status


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    """The exceptions in a group, however deep the nurseries nested them."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


async def _watch_signals(shutdown: trio.Event, scope: trio.CancelScope) -> None:
    import signal

    import trio

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


# -- project and agent commands ------------------------------------------------------------


class _DirectoryError(Exception):
    """A one-line refusal: unknown project or agent, a name taken."""


async def _directory(args: argparse.Namespace, config: Config) -> int:
    from .store import DirectoryConflict, StoreUnavailable, store_for

    if args.command == "opamp":
        command = _OPAMP_TOKEN_COMMANDS[args.token_action]
    elif args.command == "user":
        command = USER_COMMANDS[args.action]
    elif args.command == "federation":
        command = FEDERATION_COMMANDS[args.token_action]
    else:
        command = _DIRECTORY_COMMANDS[args.command, args.action]
    if args.command == "admin" and args.token_action is not None:
        command = _ADMIN_TOKEN_COMMANDS[args.token_action]
    store = store_for(config, application_name="z4j-cli")
    try:
        await store.migrate()
        await command(args, config, store)
    except (_DirectoryError, DirectoryConflict, StoreUnavailable, OSError, ValueError) as exc:
        message = " ".join(str(exc).split())  # one line, even for libpq's two
        print(f"z4j {args.command} {args.action}: {message}", file=sys.stderr)
        return 1
    finally:
        await store.aclose()
    return 0


def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name to be had (a bare container)
        return "cli"


async def _project_of(store: Store, ref: str) -> Project:
    project = await store.find_project(ref)
    if project is None:
        raise _DirectoryError(f"no project {ref!r}")
    return project


async def _project_create(args: argparse.Namespace, config: Config, store: Store) -> None:
    project = await store.create_project(args.name)
    await store.audit(
        "project.create", f"project:{project.id}", {"name": project.name}, actor=_actor()
    )
    print(f"{project.id}  {project.name}")


async def _project_list(args: argparse.Namespace, config: Config, store: Store) -> None:
    projects = await store.list_projects()
    emit(
        args,
        [{"id": str(p.id), "name": p.name, "archived_at": iso(p.archived_at)} for p in projects],
        lambda: "\n".join(f"{p.id}  {p.name}" for p in projects),
    )
    if not projects:
        print("no projects yet: z4j project create NAME", file=sys.stderr)


async def _agent_create(args: argparse.Namespace, config: Config, store: Store) -> None:
    from . import keys
    from .store import DirectoryConflict

    project = await _project_of(store, args.project)
    master = keys.master_secret(config)
    # The current secret (it moves on at each rotation); checks the master first.
    secret = keys.project_secret_text(master, project.id, project.secret_generation)
    token = keys.new_agent_token()
    try:
        agent = await store.create_agent(project.id, args.name, keys.token_hash(master, token))
    except DirectoryConflict:
        taken = await store.find_agent(args.name, project.id)
        note = " (revoked; names stay taken)" if taken is not None and taken.revoked else ""
        raise _DirectoryError(
            f"project {project.name!r} has an agent named {args.name!r} already{note}"
        ) from None
    await store.audit(
        "agent.create",
        f"agent:{agent.id}",
        {"project_id": str(project.id), "name": agent.name},
        actor=_actor(),
    )
    print(f"agent id:       {agent.id}  ({agent.name} in project {project.name})")
    print(f"token:          {token}")
    print(f"signing secret: {secret}")
    print("The token is shown only now: only its hash is stored.")
    print(
        f"z4j-bare agent: Z4J_BRAIN_URL={_brain_url(config)} Z4J_TOKEN={token} "
        f"Z4J_PROJECT_ID={project.id} Z4J_HMAC_SECRET={secret}"
    )


def tune_interpreter(config: Config) -> None:
    """Tune the `z4j brain` process's interpreter for a server's load; a
    program that embeds the brain owns its interpreter and may do the same.

    The cyclic collector runs on the young generation every 100,000
    allocations, not every 700: a brain allocates a few dicts per event and
    keeps few of them, and what it keeps for a while is a drain's claim, and
    each young collection walks all of it. At the default the collector ran
    several times per 100-event batch (agent frames per second rose by about
    15 % at 10,000: benchmarks/agents.py, one connection, one event per frame,
    A/B runs, and stayed within noise at 100,000). With the task projection a
    claim of ~12,700 events stays alive while its tasks are folded: at 10,000
    the collector ran 44 times in a drain of 100,000 events, 0.5 to 0.7 s of
    the drain's CPU, at 100,000 once, 0.06 s (benchmarks/tasks.py with a
    gc.callbacks timer; drain throughput with the projection +7 %, A/B twice).

    The GIL switch interval is Z4J_GIL_SWITCH_INTERVAL_US (500 us, not
    Python's 5 ms): the store's threads give the GIL back on every SQLite
    step and every Postgres round trip, and with the event loop busy each
    took up to the interval to get it again. 2,000 OpAMP acknowledgements
    written beside a busy thread took 568 us each at 5 ms, 76 us at 500 us
    and 70 us alone (a store-only measurement, same machine and run).
    """
    gc.set_threshold(100_000, 20, 100)
    if config.gil_switch_interval_us:
        sys.setswitchinterval(config.gil_switch_interval_us / 1e6)


def _brain_url(config: Config) -> str:
    """Where agents reach this brain, as far as its own settings tell."""
    import socket

    host, port = parse_bind(config.http_bind)
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _agent_list(args: argparse.Namespace, config: Config, store: Store) -> None:
    project_id = None if args.project is None else (await _project_of(store, args.project)).id
    names = {p.id: p.name for p in await store.list_projects()}
    agents = await store.list_agents(project_id)
    emit(
        args,
        [
            {
                "id": str(a.id),
                "project_id": str(a.project_id),
                "project": names.get(a.project_id),
                "name": a.name,
                "revoked": a.revoked,
            }
            for a in agents
        ],
        lambda: "\n".join(
            f"{a.id}  {names.get(a.project_id, a.project_id)}  {a.name}"
            + ("  revoked" if a.revoked else "")
            for a in agents
        ),
    )
    if not agents:
        print("no agents yet: z4j agent create --project P NAME", file=sys.stderr)


async def _agent_revoke(args: argparse.Namespace, config: Config, store: Store) -> None:
    agent = await _agent_of(store, args.agent, args.project)
    if await store.revoke_agent(agent.id):
        await store.audit(
            "agent.revoke",
            f"agent:{agent.id}",
            {"project_id": str(agent.project_id), "name": agent.name},
            actor=_actor(),
        )
        print(f"revoked agent {agent.name} ({agent.id})")
    else:
        print(f"agent {agent.name} ({agent.id}) was revoked already", file=sys.stderr)


async def _agent_of(store: Store, ref: str, project_ref: str | None) -> Agent:
    if project_ref is not None:
        project = await _project_of(store, project_ref)
        agent = await store.find_agent(ref, project.id)
        if agent is None:
            raise _DirectoryError(f"no agent {ref!r} in project {project.name!r}")
        return agent
    agent = await store.find_agent(ref)
    if agent is not None:
        return agent
    named = [a for a in await store.list_agents() if a.name == ref]
    if not named:
        raise _DirectoryError(f"no agent {ref!r}")
    if len(named) > 1:
        raise _DirectoryError(f"{len(named)} agents are named {ref!r}: give --project")
    return named[0]


def _print_command(record: CommandRecord) -> None:
    import attrs

    print(
        orjson.dumps(
            attrs.asdict(record), default=str, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        ).decode()
    )


async def _command_send(args: argparse.Namespace, config: Config, store: Store) -> None:
    from .brain.commands import CommandError, Commands

    agent = await _agent_of(store, args.agent, args.project)
    commands = Commands(store)  # no live sessions here: a running brain delivers it
    try:
        record = await commands.send(
            agent.id,
            args.name,
            target=args.target,
            parameters=args.params,
            timeout_seconds=args.timeout,
            issued_by=_actor(),
        )
    except CommandError as exc:
        raise _DirectoryError(str(exc)) from None
    if args.wait <= 0:
        print(record.id)
        return
    final = await commands.wait(record.id, within=args.wait)
    assert final is not None
    _print_command(final)
    if final.state != "completed":
        raise _DirectoryError(f"command {final.id} is {final.state}")


async def _command_show(args: argparse.Namespace, config: Config, store: Store) -> None:
    record = await store.get_command(args.id)
    if record is None:
        raise _DirectoryError(f"no command {args.id}")
    _print_command(record)


async def _admin_token(args: argparse.Namespace, config: Config, store: Store) -> None:
    from . import keys
    from .brain.http.auth import Auth

    token = await Auth(store, keys.master_secret(config)).new_token(args.name)
    await store.audit("admin.token", f"api-token:{args.name}", {}, actor=_actor())
    print(token)


async def _admin_token_list(args: argparse.Namespace, config: Config, store: Store) -> None:
    tokens = await store.list_api_tokens()
    rows = [(t.id, t.name, _when(t.created_at), _when(t.last_used_at) or "never") for t in tokens]
    width = max([len(name) for _, name, _, _ in rows] + [4])

    def text() -> str:
        lines = [f"{'ID':<16}  {'NAME':<{width}}  {'CREATED':<20}  LAST USED"]
        for token_id, name, created, used in rows:
            lines.append(f"{token_id:<16}  {name:<{width}}  {created:<20}  {used}")
        return "\n".join(lines)

    emit(
        args,
        [
            {
                "id": t.id,
                "name": t.name,
                "created_at": iso(t.created_at),
                "last_used_at": iso(t.last_used_at),
            }
            for t in tokens
        ],
        text,
    )


async def _admin_token_revoke(args: argparse.Namespace, config: Config, store: Store) -> None:
    tokens = await store.list_api_tokens()
    matches = [t for t in tokens if t.id == args.ref.lower()] or [
        t for t in tokens if t.name == args.ref
    ]
    if not matches:
        raise _DirectoryError(f"no admin token with id or name {args.ref!r}")
    if len(matches) > 1:
        ids = ", ".join(t.id for t in matches)
        raise _DirectoryError(
            f"{len(matches)} admin tokens are named {args.ref!r}: give an id ({ids})"
        )
    [token] = matches
    await store.revoke_api_token(token.token_hash)
    await store.audit(
        "admin.token.revoked", f"api-token:{token.name}", {"id": token.id}, actor=_actor()
    )
    print(f"revoked admin token {token.id} ({token.name}); its sessions have ended")


def _when(at: float | None) -> str:
    from datetime import UTC, datetime

    if at is None:
        return ""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def _opamp_token_create(args: argparse.Namespace, config: Config, store: Store) -> None:
    from . import keys

    project = await _project_of(store, args.project)
    master = keys.master_secret(config)
    token = keys.new_opamp_token()
    await store.add_opamp_token(project.id, keys.opamp_token_hash(master, token), args.name)
    await store.audit(
        "opamp.token.create",
        f"opamp-token:{keys.opamp_token_hash(master, token)[:8].hex()}",
        {"project_id": str(project.id), "name": args.name},
        actor=_actor(),
    )
    print(token)
    print(
        f"The token is shown only now. Point OpAMP clients at {_brain_url(config)}/v1/opamp "
        f"with the header 'Authorization: Bearer {token}'.",
        file=sys.stderr,
    )


async def _opamp_token_list(args: argparse.Namespace, config: Config, store: Store) -> None:
    names = {p.id: p.name for p in await store.list_projects()}
    tokens = await store.list_opamp_tokens()
    rows = [
        (t.id, str(names.get(t.project_id, t.project_id)), t.name, _when(t.created_at))
        for t in tokens
    ]
    width = max([len(project) for _, project, _, _ in rows] + [7])

    def text() -> str:
        lines = [f"{'ID':<16}  {'PROJECT':<{width}}  {'CREATED':<20}  NAME"]
        for token_id, project, name, created in rows:
            lines.append(f"{token_id:<16}  {project:<{width}}  {created:<20}  {name}")
        return "\n".join(lines)

    emit(
        args,
        [
            {
                "id": t.id,
                "project_id": str(t.project_id),
                "project": names.get(t.project_id),
                "name": t.name,
                "created_at": iso(t.created_at),
            }
            for t in tokens
        ],
        text,
    )


async def _opamp_token_revoke(args: argparse.Namespace, config: Config, store: Store) -> None:
    matches = [t for t in await store.list_opamp_tokens() if t.id == args.ref.lower()]
    if not matches:
        raise _DirectoryError(f"no OpAMP token with id {args.ref!r}")
    [token] = matches
    await store.revoke_opamp_token(token.token_hash)
    await store.audit(
        "opamp.token.revoked",
        f"opamp-token:{token.id}",
        {"project_id": str(token.project_id), "name": token.name},
        actor=_actor(),
    )
    print(f"revoked OpAMP token {token.id} ({token.name})")


_OPAMP_TOKEN_COMMANDS: dict[str, Callable[[argparse.Namespace, Config, Store], Awaitable[None]]] = {
    "create": _opamp_token_create,
    "list": _opamp_token_list,
    "revoke": _opamp_token_revoke,
}


_ADMIN_TOKEN_COMMANDS: dict[str, Callable[[argparse.Namespace, Config, Store], Awaitable[None]]] = {
    "list": _admin_token_list,
    "revoke": _admin_token_revoke,
}


_DIRECTORY_COMMANDS: dict[
    tuple[str, str], Callable[[argparse.Namespace, Config, Store], Awaitable[None]]
] = {
    ("project", "create"): _project_create,
    ("admin", "token"): _admin_token,
    ("project", "list"): _project_list,
    ("agent", "create"): _agent_create,
    ("agent", "list"): _agent_list,
    ("agent", "revoke"): _agent_revoke,
    ("command", "send"): _command_send,
    ("command", "show"): _command_show,
}


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

    from .ingest import RETRY_SECONDS, connect

    host, port = parse_bind(args.ingest)
    token = args.token if args.token is not None else os.environ.get("Z4J_INGEST_TOKEN") or None
    try:
        records = list(_read_records(args.file))
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"z4j send: cannot read records: {exc}", file=sys.stderr)
        return 2
    batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    try:
        context = None
        if args.tls or args.ca_file is not None:
            import ssl

            context = ssl.create_default_context(cafile=args.ca_file)
        retry = RETRY_SECONDS if args.retry_seconds is None else args.retry_seconds
        with connect(
            host, port, token=token, compress=args.gzip, ssl_context=context, retry_seconds=retry
        ) as client:
            results = client.send_many(batches) if batches else []
    except OSError as exc:
        print(f"z4j send: {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    refused = results.count(False)
    print(
        f"sent {len(records)} records in {len(batches)} payloads: "
        f"{len(batches) - refused} accepted (durable in the brain's buffer), {refused} refused",
        file=sys.stderr,
    )
    return 1 if refused else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
