"""What the rest of the brain needs from shared persistence.

Two implementations: `PostgresStore` (production, many replicas) and
`SqliteStore` (the embedded default). The brain only talks to this protocol,
so tests and future stores slot in without touching the drain or heartbeat.

One concern justifies the length (past 700 lines): the `Store` protocol
and the records it speaks in, which the API derives its resources from
(brain/http/resources.py); each method's contract is written here once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import attrs

from ..buffer import ClaimedRow
from ..schedules import ScheduleRow
from ..tasks import TaskEvent

if TYPE_CHECKING:
    from .audit_query import AuditFilter
    from .opamp import StateWrite
    from .pg import PgPool
    from .replica import ReadReplica

__all__ = [
    "COMMAND_STATES",
    "FINAL_COMMAND_STATES",
    "ROLES",
    "TOKEN_SCOPES",
    "Agent",
    "AgentLogin",
    "ApiToken",
    "CommandRecord",
    "CredentialDeadlines",
    "DirectoryConflict",
    "EngineWorker",
    "EventHistogram",
    "EventPage",
    "ExportFormat",
    "ExportPage",
    "ExportRow",
    "FederationToken",
    "InstanceInfo",
    "OpampAgent",
    "OpampConfig",
    "OpampHistoryEntry",
    "OpampRollout",
    "OpampToken",
    "Project",
    "ScheduleFilter",
    "ScheduleRecord",
    "ScheduleStream",
    "Store",
    "StoreUnavailable",
    "TaskCounts",
    "TaskFilter",
    "TaskRecord",
    "UnstorableRows",
    "User",
    "UserSession",
    "UserToken",
]


class StoreUnavailable(Exception):
    """The store could not be reached or refused the write; retry later."""


class UnstorableRows(Exception):
    """The store rejected the data itself: retrying the same rows cannot help.

    The drain splits the batch to find the rows at fault and sets them
    aside in the buffer's dead-letter table (kept, counted, logged).
    """


class DirectoryConflict(Exception):
    """The name is taken: a project of that name, or an agent of that name in the project."""


@attrs.frozen
class Project:
    """A project. Its agents' signing key is of generation ``secret_generation``
    (keys.project_key); after a rotation the previous generation's key still
    verifies until ``previous_secret_expires_at``. An archived project takes
    no new agents (archiving revoked those it had)."""

    id: uuid.UUID
    name: str
    archived_at: float | None = None
    secret_generation: int = 0
    previous_secret_expires_at: float | None = None

    @property
    def archived(self) -> bool:
        return self.archived_at is not None

    def secret_generations(self, now: float) -> tuple[int, ...]:
        """The generations whose key verifies at ``now``: the current one first."""
        until = self.previous_secret_expires_at
        if self.secret_generation > 0 and until is not None and now < until:
            return (self.secret_generation, self.secret_generation - 1)
        return (self.secret_generation,)


@attrs.frozen
class Agent:
    id: uuid.UUID
    project_id: uuid.UUID
    name: str
    revoked: bool
    created_at: float  # what pages of agents are ordered by (with the id)


@attrs.frozen(kw_only=True)
class AgentLogin:
    """What a connecting agent's token opens: the agent (not revoked), when
    that token stops working (None: not rotated away), and its project (for
    the signing keys)."""

    agent: Agent
    token_expires_at: float | None
    project: Project


@attrs.frozen(kw_only=True)
class CredentialDeadlines:
    """What the brain's sweep checks live agent sessions against: the tokens
    that end (keyed hash -> expires_at), and every project (its secrets).
    Revoked agents' sessions are closed by the command sweep (4003)."""

    tokens: dict[bytes, float]
    projects: dict[uuid.UUID, Project]


COMMAND_STATES = ("pending", "dispatched", "completed", "failed", "timeout", "cancelled")
FINAL_COMMAND_STATES = frozenset({"completed", "failed", "timeout", "cancelled"})


@attrs.frozen
class CommandRecord:
    """One row of ``commands``; times are epoch seconds."""

    id: uuid.UUID
    project_id: uuid.UUID
    agent_id: uuid.UUID
    action: str
    target: dict[str, Any]
    parameters: dict[str, Any]
    timeout_seconds: int
    issued_by: str | None
    state: str
    worker_id: str | None
    delivery_claim_token: str | None
    created_at: float
    dispatched_at: float | None
    finished_at: float | None
    result: dict[str, Any] | None
    error: str | None


@attrs.frozen(kw_only=True)
class InstanceInfo:
    """This process's row in ``instances``."""

    id: uuid.UUID
    name: str
    host: str
    pid: int
    buffer_id: uuid.UUID
    started_at: float
    last_seen: float
    ingest_rate: float = 0.0
    drain_rate: float = 0.0
    buffer_depth: int = 0
    stopped_at: float | None = None


@attrs.frozen(kw_only=True)
class WorkerInfo:
    """One row of ``workers``: a worker (connection identity) of an agent."""

    agent_id: uuid.UUID
    worker_id: str
    role: str | None
    instance_id: uuid.UUID | None
    connected_at: float
    last_seen: float
    disconnected_at: float | None
    status: dict[str, Any] | None
    # From its hello: the actions each engine of the worker takes.
    capabilities: dict[str, list[str]] = attrs.field(factory=dict)
    # Its last heartbeat's adapter_health: "<engine>.<key>": text (JSON for
    # dicts, e.g. "celery.queue_depths"), as the adapters send it.
    health: dict[str, Any] | None = None
    # From its hello: its scheduler adapters (their actions are in
    # capabilities, by scheduler name) and its runtime's protocol features.
    schedulers: list[str] = attrs.field(factory=list)
    runtime_features: list[str] = attrs.field(factory=list)
    agent_version: str | None = None  # from its hello


@attrs.frozen(kw_only=True)
class WorkerRegistry:
    """A worker's task registry as its ``registry_delta`` frames left it:
    ``{engine: {task name: task}}``, each task as the adapter described it."""

    agent_id: uuid.UUID
    worker_id: str
    registry: dict[str, Any]


@attrs.frozen(kw_only=True)
class EventRecord:
    """One stored event; ``body`` is parsed JSON."""

    id: int
    key: str  # the idempotency key, hex: the same event always has the same one
    received_at: float
    source: str
    kind: str
    project_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    worker_id: str | None
    body: Any


@attrs.frozen(kw_only=True)
class TaskRecord:
    """One row of ``tasks``: what the projection knows of one task (z4j.tasks).

    A list shows the summary; the inputs, result, traceback, lineage and
    the attempts' timeline (None in a list) come with the task itself.
    """

    project_id: uuid.UUID
    engine: str
    task_id: str
    name: str | None
    queue: str | None
    state: str
    attempts: int
    agent_id: uuid.UUID | None
    worker: str | None
    exception: str | None
    message: str | None
    runtime_ms: float | None
    first_seen: float
    received_at: float | None
    started_at: float | None
    finished_at: float | None
    last_event_at: float
    args: Any = None
    kwargs: Any = None
    result: Any = None
    traceback: str | None = None
    parent_id: str | None = None
    root_id: str | None = None
    tags: Any = None
    priority: Any = None
    timeline: list[dict[str, Any]] | None = None


@attrs.frozen(kw_only=True)
class EngineWorker:
    """An engine's own worker (celery's hostname ``name@host``, dramatiq's
    ``host@pid``) as the task projection names it, per agent that reported
    it: over a window of tasks, when it was last heard of and its tasks by state."""

    engine: str
    worker: str
    agent_id: uuid.UUID | None
    last_seen: float  # the latest last_event_at of its tasks in the window
    tasks: int
    states: dict[str, int]


@attrs.frozen(kw_only=True)
class TaskFilter:
    """Which tasks to list: all given conditions hold; newest first."""

    state: str | None = None
    engine: str | None = None
    queue: str | None = None
    name: str | None = None
    agent_id: uuid.UUID | None = None
    project_id: uuid.UUID | None = None
    projects: frozenset[uuid.UUID] | None = None  # only these projects' (None: any)
    since: float | None = None  # last_event_at >= since
    until: float | None = None  # last_event_at < until
    text: str | None = None  # a substring of the name, id, exception or message
    # Keyset cursor: tasks strictly older than (last_event_at, engine, task_id).
    before: tuple[float, str, str] | None = None
    limit: int = 50


@attrs.frozen
class TaskCounts:
    """Tasks per state under a filter. Not ``exact``: counted over the newest
    matching tasks only (store/tasks.py, COUNT_WINDOW), so each is a lower bound."""

    by_state: dict[str, int]
    exact: bool


@attrs.frozen(kw_only=True)
class ScheduleRecord(ScheduleRow):
    """One row of ``schedules``: a schedule as its scheduler adapter last
    published it (the `ScheduleRow` of z4j.schedules), with where that came
    from.

    Keyed by (project, scheduler, source key). ``stream_id``,
    ``epoch_number`` and ``sequence`` name the observation it comes from;
    ``snapshot_id`` is None when that was a control projection.
    """

    project_id: uuid.UUID
    agent_id: uuid.UUID
    worker_id: str | None
    stream_id: str
    epoch_number: int
    sequence: int
    snapshot_id: str | None
    updated_at: float


@attrs.frozen(kw_only=True)
class ScheduleFilter:
    """Which schedules to list: all given conditions hold; by scheduler, source key, project."""

    scheduler: str | None = None
    engine: str | None = None
    project_id: uuid.UUID | None = None
    projects: frozenset[uuid.UUID] | None = None  # only these projects' (None: any)
    enabled: bool | None = None
    # Keyset cursor: schedules strictly after (scheduler, source_key, project_id).
    after: tuple[str, str, uuid.UUID] | None = None
    limit: int = 50


@attrs.frozen(kw_only=True)
class ScheduleStream:
    """One row of ``schedule_streams``: the brain's grant to publish one
    scheduler's schedules of one project, and how far it has applied them.

    ``epoch_number`` rises with every grant (``schedule.external.activate``
    to the worker named, whose connection began at ``worker_connected_at``);
    only observations of the current epoch are applied, each newer
    (``applied_epoch``, ``applied_sequence``) than the last.
    """

    project_id: uuid.UUID
    scheduler: str
    stream_id: str
    epoch_number: int
    epoch_uuid: str
    adapter_instance_id: str
    agent_id: uuid.UUID
    worker_id: str
    worker_connected_at: float
    command_id: uuid.UUID | None
    granted_at: float
    applied_epoch: int
    applied_sequence: int
    applied_at: float | None


@attrs.frozen(kw_only=True)
class ApiToken:
    """An admin token as the store knows it: its keyed hash, never the secret."""

    token_hash: bytes
    name: str
    created_at: float
    last_used_at: float | None

    @property
    def id(self) -> str:
        """A short handle to name the token by (a prefix of its keyed hash)."""
        return self.token_hash[:8].hex()


ROLES: Final = ("admin", "operator", "viewer")
TOKEN_SCOPES: Final = ("read", "commands", "admin")


@attrs.frozen(kw_only=True)
class User:
    """An account: a role on this brain, optionally narrowed to some projects
    (``projects`` None: all of them). Its password hash stays in the store."""

    id: uuid.UUID
    name: str
    role: str
    projects: tuple[uuid.UUID, ...] | None
    disabled: bool
    created_at: float
    updated_at: float


@attrs.frozen(kw_only=True)
class UserToken:
    """A personal API token: its owner, scope and lifetime, never the secret."""

    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    scope: str
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    revoked_at: float | None


@attrs.frozen(kw_only=True)
class UserSession:
    """A signed-in browser of a user (by password, or by one of their tokens)."""

    user: User
    token: UserToken | None
    expires_at: float
    last_seen_at: float


@attrs.frozen(kw_only=True)
class OpampToken:
    """An OpAMP bearer token: its keyed hash and the one project it admits to."""

    token_hash: bytes
    project_id: uuid.UUID
    name: str
    created_at: float

    @property
    def id(self) -> str:
        """A short handle to name the token by (a prefix of its keyed hash)."""
        return self.token_hash[:8].hex()


@attrs.frozen(kw_only=True)
class FederationToken:
    """A token a peer region's hub reads this region with (never the secret).

    ``allow_commands``: it may also send commands to this region's agents
    (`z4j federation token create --allow-commands`); otherwise read-only.
    """

    id: uuid.UUID
    name: str
    allow_commands: bool
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    revoked_at: float | None
    token_hash: bytes = attrs.field(repr=False)


@attrs.frozen(kw_only=True)
class OpampAgent:
    """An OpAMP agent of one project, as the store keeps it (store/opamp.py).

    ``state`` and ``full_state_requests`` rebuild the core's `AgentState`
    (with ``sequence_num`` and ``disconnected_at``); the rest is its
    summary for the API, derived when the state is written.
    """

    project_id: uuid.UUID
    instance_uid: str  # 32 hex digits
    identifying: dict[str, Any]
    non_identifying: dict[str, Any]
    capabilities: list[str]
    health: dict[str, Any] | None
    effective_config: dict[str, Any] | None
    remote_config_status: dict[str, Any] | None
    sequence_num: int
    transport: str
    first_seen: float
    last_seen: float
    disconnected_at: float | None
    state: bytes = attrs.field(default=b"", repr=False)
    full_state_requests: int = 0


@attrs.frozen(kw_only=True)
class OpampHistoryEntry:
    """One change an OpAMP agent went through (store/opamp_history.py):
    ``changes`` names what changed, ``details`` the new summary of each."""

    id: int
    project_id: uuid.UUID
    instance_uid: str  # 32 hex digits
    at: float
    changes: list[str]
    details: dict[str, Any]


@attrs.frozen(kw_only=True)
class OpampConfig:
    """The configuration one OpAMP agent should run, and how far it got.

    ``files`` maps each name to ``{"body": text, "content_type": text}``;
    ``config_hash`` (hex) is `remote_config.config_hash` of them, the value
    the agent reports back. ``status`` (pending, applying, applied, failed)
    and ``error_message`` follow its last report about that hash.
    """

    project_id: uuid.UUID
    instance_uid: str  # 32 hex digits
    config_hash: str  # 64 hex digits
    files: dict[str, Any]
    created_at: float
    created_by: str | None
    status: str
    error_message: str
    status_at: float
    rollout_id: uuid.UUID | None = None  # the rollout that assigned it, if one did


@attrs.frozen(kw_only=True)
class OpampRollout:
    """A staged rollout of one configuration to the agents a selector matched
    (z4j/opamp_rollouts.py decides its steps, store/opamp_rollouts.py keeps it).

    ``stage`` stages of ``stages`` are assigned, covering the first
    ``assigned`` of its ``targets`` (fixed when it started); ``counts`` are
    the statuses of those assigned (pending, applying, applied, failed,
    superseded), read with it.
    """

    id: uuid.UUID
    project_id: uuid.UUID
    selector: dict[str, str]
    config_hash: str  # 64 hex digits
    canary_percent: int
    batch_size: int
    failure_threshold_percent: int
    state: str  # running, halted, completed, cancelled
    stage: int
    stages: int
    targets: int
    assigned: int
    accepted_failures: int
    counts: dict[str, int]
    halted_reason: str | None
    created_at: float
    created_by: str | None
    updated_at: float


@attrs.frozen(kw_only=True)
class AuditRecord:
    id: int
    at: float
    actor: str | None
    action: str
    subject: str
    details: dict[str, Any]


@attrs.frozen(kw_only=True)
class EventFilter:
    """Which events to list: all given conditions hold; newest first."""

    kind: str | None = None
    project_id: uuid.UUID | None = None
    # Only these projects' events (None: any; a user narrowed to projects).
    projects: frozenset[uuid.UUID] | None = None
    agent_id: uuid.UUID | None = None
    worker_id: str | None = None
    # Agent events about one task, one engine, one task name (fields of the body).
    task_id: str | None = None
    engine: str | None = None
    task_name: str | None = None
    since: float | None = None  # received_at >= since
    until: float | None = None  # received_at < until
    # A case-insensitive substring of any string value inside the body
    # (store/event_search.py: a bounded scan, not an index).
    text: str | None = None
    # Keyset cursor: events strictly older than (received_at, id).
    before: tuple[float, int] | None = None
    limit: int = 50


@attrs.frozen(kw_only=True)
class EventPage:
    """One page of a search, newest first. ``next``: the cursor to continue
    from (None: nothing older matches). A text search reads a bounded number
    of rows per page, so a page may hold fewer than asked (even none) and
    still have a ``next``."""

    events: list[EventRecord]
    next: tuple[float, int] | None


# An event as an export reads it to encode it in Python: id, key (hex),
# received_at (epoch), source, kind, project_id, agent_id, worker_id (text
# or None), and the body as JSON text, never parsed (passed through).
ExportRow = tuple[int, str, float, str, str, str | None, str | None, str | None, str]
# How an export writes its events (store/event_export.py).
ExportFormat = Literal["ndjson", "csv"]


@attrs.frozen(kw_only=True)
class ExportPage:
    """One page of an export: its ``rows`` events as ``data``, their lines
    in the export's format, newest first (a CSV without its header);
    ``next`` as `EventPage`'s."""

    data: bytes
    rows: int
    next: tuple[float, int] | None


@attrs.frozen(kw_only=True)
class EventHistogram:
    """Matching events per bucket of ``bucket_seconds`` from ``start``:
    ``counts[i]`` for [start + i*w, start + (i+1)*w). Not ``complete``: only
    the newest rows were read (store/event_search.py), those from
    ``counted_since`` on."""

    start: float
    bucket_seconds: float
    counts: list[int]
    complete: bool
    counted_since: float | None


class Store(Protocol):
    @property
    def kind(self) -> Literal["postgres", "sqlite"]: ...

    # Called with each store call's operation (method name) and seconds (the query histogram).
    observe_query: Callable[[str, float], None]

    @property
    def pool(self) -> PgPool | None:
        """The connection pool, on Postgres (the registry and pool metrics use it)."""
        ...

    @property
    def read_replica(self) -> ReadReplica | None:
        """The standby API reads may go to (Z4J_DATABASE_READ_URL); Postgres only."""
        ...

    async def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied now."""
        ...

    async def applied_migrations(self) -> list[int]:
        """The versions in ``schema_version``, ascending (none on an empty
        store); reads only, so ``z4j migrate --check`` changes nothing."""
        ...

    async def database_time(self) -> float | None:
        """The database server's clock (Unix seconds), to measure this host's
        skew against it; None on SQLite, which has no clock of its own."""
        ...

    async def write_events(self, buffer_id: uuid.UUID, rows: Sequence[ClaimedRow]) -> int:
        """Store every record of ``rows`` idempotently; return rows newly stored."""
        ...

    async def check(self) -> None:
        """Raise `StoreUnavailable` unless a trivial query succeeds now."""
        ...

    async def enforce_retention(self, *, now: float, keep_days: int) -> int:
        """Remove events received more than ``keep_days`` days before ``now``.

        Returns what went: partitions dropped (Postgres) or rows deleted
        (SQLite). Postgres also creates the partitions of the next days.
        """
        ...

    async def upsert_instance(self, info: InstanceInfo) -> None: ...

    # -- the agent directory -----------------------------------------------------------

    async def create_project(self, name: str) -> Project:
        """A new project (fresh uuid4); `DirectoryConflict` if the name is taken."""
        ...

    async def find_project(self, ref: str) -> Project | None:
        """The project whose id (as text) or name is ``ref``; the id wins."""
        ...

    async def list_projects(self) -> list[Project]:
        """Every project, by name."""
        ...

    async def create_agent(self, project_id: uuid.UUID, name: str, token_hash: bytes) -> Agent:
        """A new agent and its token hash, in one transaction.

        `DirectoryConflict` if the project has an agent of that name;
        `LookupError` if there is no such project.
        """
        ...

    async def agent_by_token(self, token_hash: bytes) -> Agent | None:
        """The agent holding this token hash; None if unknown, revoked or
        rotated away past its grace (by the store's clock)."""
        ...

    async def find_agent(self, ref: str, project_id: uuid.UUID | None = None) -> Agent | None:
        """The agent whose id (as text) is ``ref``, else the one named ``ref`` in
        ``project_id``. Revoked agents are found too (see `Agent.revoked`). With
        ``project_id``, an agent found by id must belong to that project."""
        ...

    async def list_agents(self, project_id: uuid.UUID | None = None) -> list[Agent]:
        """Agents (revoked ones too), of one project or all; by project name, then name."""
        ...

    async def agents_page(
        self, *, before: tuple[float, uuid.UUID] | None = None, limit: int = 100
    ) -> list[Agent]:
        """The latest ``limit`` agents (revoked ones too), newest first by
        (created_at, id); ``before`` (created_at, id) continues a page."""
        ...

    async def revoke_agent(self, agent_id: uuid.UUID) -> bool:
        """Revoke an agent (its tokens stop working); False if unknown or revoked already."""
        ...

    # -- provisioning (store/provisioning.py) -----------------------------------------

    async def archive_project(self, project_id: uuid.UUID, *, now: float) -> list[Agent] | None:
        """Archive the project and revoke its agents, in one transaction; the
        agents revoked now. None if unknown or archived already."""
        ...

    async def rotate_agent_token(
        self, agent_id: uuid.UUID, token_hash: bytes, *, now: float, grace_seconds: float
    ) -> float | None:
        """Add ``token_hash`` as the agent's token; its other tokens that still
        work end at ``now + grace_seconds`` (or sooner, if they were ending
        already). Returns that end; None if the agent is unknown or revoked."""
        ...

    async def rotate_project_secret(
        self, project_id: uuid.UUID, *, now: float, grace_seconds: float
    ) -> Project | None:
        """Move the project's signing key to the next generation; the current
        one keeps verifying until ``now + grace_seconds`` (an older previous
        one stops at once). The project as now; None if unknown or archived."""
        ...

    async def agent_login(self, token_hash: bytes) -> AgentLogin | None:
        """The agent this token belongs to, if it is not revoked, with the
        token's end and the project. The caller compares the end with its clock."""
        ...

    async def credential_deadlines(self) -> CredentialDeadlines:
        """Tokens with an end (rotated away), and every project."""
        ...

    async def token_graces(self, *, now: float) -> dict[uuid.UUID, float]:
        """Agents with an older token still working after ``now``: the latest end."""
        ...

    async def worker_connected(
        self,
        agent_id: uuid.UUID,
        worker_id: str,
        *,
        role: str | None,
        hello: dict[str, Any],
        instance_id: uuid.UUID,
        at: float,
    ) -> None:
        """Upsert the worker's row: connected and seen at ``at``, not disconnected.

        Its last status and task registry are kept across reconnects.
        """
        ...

    async def worker_seen(
        self,
        agent_id: uuid.UUID,
        worker_id: str,
        *,
        at: float,
        status: dict[str, Any] | None = None,
        health: dict[str, Any] | None = None,
    ) -> None:
        """Record activity at ``at``, and the worker's status (agent_status)
        and adapters' health (a heartbeat's adapter_health) when given."""
        ...

    async def worker_registry(
        self,
        agent_id: uuid.UUID,
        worker_id: str,
        *,
        engine: str,
        added: list[dict[str, Any]],
        removed: list[str],
        updated: list[dict[str, Any]],
    ) -> None:
        """Apply a registry delta to the worker's ``{engine: {task name: task}}``.

        Added and updated tasks are keyed by their ``name`` (entries without a
        string name are skipped); removed ones are names. Read, changed and
        written in one transaction. Nothing happens for an unknown worker.
        """
        ...

    async def worker_disconnected(
        self, agent_id: uuid.UUID, worker_id: str, *, at: float
    ) -> None: ...

    async def audit(
        self, action: str, subject: str, details: dict[str, Any], *, actor: str | None = None
    ) -> None:
        """Append a row to ``audit_events``."""
        ...

    # -- commands ------------------------------------------------------------------------

    async def create_command(self, command: CommandRecord) -> None:
        """Insert ``command`` as given, with its ``command.created`` audit row, in one
        transaction. `LookupError` if its agent is not an agent of its project."""
        ...

    async def get_command(self, command_id: uuid.UUID) -> CommandRecord | None: ...

    async def open_commands(self, agent_id: uuid.UUID | None = None) -> list[CommandRecord]:
        """Pending and dispatched commands, of one agent or all; oldest first."""
        ...

    async def list_commands(
        self,
        *,
        agent_id: uuid.UUID | None = None,
        state: str | None = None,
        before: tuple[float, uuid.UUID] | None = None,
        limit: int = 100,
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[CommandRecord]:
        """The latest ``limit`` commands, of one agent or all, in one state or any,
        of ``projects`` only (None: any); newest first. ``before`` (created_at,
        id) continues a page."""
        ...

    async def transition_command(
        self,
        command_id: uuid.UUID,
        *,
        from_states: Collection[str],
        to_state: str,
        at: float,
        actor: str | None = None,
        worker_id: str | None = None,
        delivery_claim_token: str | None = None,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> CommandRecord | None:
        """Compare-and-set: move the command to ``to_state`` if its state is in
        ``from_states``; None (and nothing changed) if not, or if it is unknown.

        In one transaction with its audit row (``command.{to_state}``, details
        ``from`` and the ``worker_id`` and ``error`` given). Into ``dispatched``
        it sets ``dispatched_at``, into a final state ``finished_at``, both to
        ``at``. ``worker_id``, ``delivery_claim_token``, ``result`` and
        ``error`` are set when given and kept when None. Returns the record as
        stored now. `ValueError` if ``to_state`` is not in `COMMAND_STATES`.
        """
        ...

    async def overdue_commands(self, *, now: float) -> list[CommandRecord]:
        """Open commands whose ``created_at + timeout_seconds`` is before ``now``; oldest first."""
        ...

    # -- read models for the API -------------------------------------------------------

    async def list_instances(self) -> list[InstanceInfo]:
        """Every instance row, the most recently seen first."""
        ...

    async def list_workers(
        self, agent_id: uuid.UUID | None = None, *, agent_ids: frozenset[uuid.UUID] | None = None
    ) -> list[WorkerInfo]:
        """Workers of one agent, of ``agent_ids`` (a page of agents), or all; by
        agent then worker id."""
        ...

    async def forget_workers(self, *, before: float) -> int:
        """Delete the workers last seen before ``before`` (store/workers.py), in
        chunks of one transaction each; how many went."""
        ...

    async def connected_counts(self) -> tuple[int, int]:
        """(workers connected, agents with a worker connected), counted by the
        database: a region's summary, without reading every worker."""
        ...

    async def worker_registries(
        self,
        *,
        agent_id: uuid.UUID | None = None,
        after: tuple[uuid.UUID, str] | None = None,
        limit: int = 100,
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[WorkerRegistry]:
        """Workers' task registries, of one agent or all (of ``projects``'
        agents only, unless None), by agent then worker id, those after
        ``after`` (a keyset page)."""
        ...

    async def search_events(self, query: EventFilter) -> EventPage:
        """A page of the events matching ``query``, newest first (by received_at, then id)."""
        ...

    async def export_events(self, query: EventFilter, fmt: ExportFormat) -> ExportPage:
        """As `search_events`, the events written as lines of ``fmt`` (for a streamed export)."""
        ...

    async def event_histogram(
        self, query: EventFilter, *, start: float, bucket_seconds: float, buckets: int
    ) -> EventHistogram:
        """How many events match ``query`` (its cursor and limit aside) per
        bucket from ``start``; ``query.since``/``until`` bound the rows read."""
        ...

    async def list_tasks(self, query: TaskFilter) -> list[TaskRecord]:
        """Tasks matching ``query``, newest first (by last_event_at, engine, task_id)."""
        ...

    async def count_tasks(self, query: TaskFilter) -> TaskCounts:
        """How many tasks match ``query`` (its state aside), per state."""
        ...

    async def forget_tasks(self, *, before: float) -> int:
        """Delete the tasks whose last event is before ``before``, in chunks
        of one transaction each; how many went."""
        ...

    async def get_tasks(
        self, engine: str, task_id: str, project_id: uuid.UUID | None = None
    ) -> list[TaskRecord]:
        """The task(s) of this engine and id with their details: one per project."""
        ...

    async def task_outcomes(
        self,
        *,
        since: float,
        by: Literal["queue", "name"] = "queue",
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[tuple[str, str | None, str, int]]:
        """(engine, queue or name, state, tasks) for tasks last heard of at or
        after ``since``, of ``projects`` only (None: any)."""
        ...

    async def recent_runtimes(
        self, *, since: float, limit: int, projects: frozenset[uuid.UUID] | None = None
    ) -> list[tuple[str, str | None, float]]:
        """(engine, name, runtime_ms) of the newest ``limit`` tasks with a
        runtime, of ``projects`` only (None: any)."""
        ...

    async def engine_workers(
        self,
        *,
        since: float,
        engine: str | None = None,
        worker: str | None = None,
        projects: frozenset[uuid.UUID] | None = None,
    ) -> list[EngineWorker]:
        """The engines' own workers named by tasks last heard of at or after
        ``since``, one per (engine, worker, agent), by engine, worker and agent;
        only ``engine``'s, or only the worker of that name, when given; only
        from ``projects``' tasks unless None."""
        ...

    async def commands_for_task(
        self, project_id: uuid.UUID, engine: str, task_id: str
    ) -> list[CommandRecord]:
        """Commands of the project that named this task (target, parameters or
        result) and no other engine, newest first."""
        ...

    async def stuck_counts(self, *, before: float) -> dict[str, int]:
        """Per engine: tasks still received or started, last heard of before ``before``."""
        ...

    async def fold_task_events(self, events: Sequence[TaskEvent]) -> None:
        """Fold events the brain learnt otherwise (a reconcile answer) into
        their tasks, as the drain folds the agents' own (idempotent by id)."""
        ...

    # -- schedules (the drain writes them: store/schedules.py) -------------------------

    async def list_schedules(self, query: ScheduleFilter) -> list[ScheduleRecord]:
        """Schedules matching ``query``, by (scheduler, source_key, project_id)."""
        ...

    async def get_schedules(
        self, scheduler: str, source_key: str, project_id: uuid.UUID | None = None
    ) -> list[ScheduleRecord]:
        """The schedule(s) of this scheduler and source key: one per project."""
        ...

    async def schedule_streams(self) -> list[ScheduleStream]:
        """Every stream grant, by project and scheduler."""
        ...

    async def grant_schedule_stream(
        self,
        project_id: uuid.UUID,
        scheduler: str,
        *,
        agent_id: uuid.UUID,
        worker_id: str,
        worker_connected_at: float,
        expected_epoch: int,
        at: float,
    ) -> ScheduleStream | None:
        """Grant the stream of (project, scheduler) to a worker: the next epoch,
        with a new epoch uuid. Compare-and-set: None (nothing changed) unless
        the current epoch is ``expected_epoch`` (0: no grant yet)."""
        ...

    async def schedule_stream_command(
        self, project_id: uuid.UUID, scheduler: str, epoch_number: int, command_id: uuid.UUID
    ) -> None:
        """Record the activation command sent for that epoch (if it is still current)."""
        ...

    async def expire_schedule_frames(self, *, now: float) -> int:
        """Delete snapshot frames staged more than an hour before ``now``
        (``FRAME_MAX_AGE_SECONDS``): their snapshot was abandoned, and would
        otherwise keep them for ever. Returns how many went."""
        ...

    async def list_audit(
        self, *, before_id: int | None = None, limit: int = 50, query: AuditFilter | None = None
    ) -> list[AuditRecord]:
        """Audit events matching ``query``, newest first; ``before_id`` continues a page."""
        ...

    # -- API credentials (only keyed hashes are stored) -------------------------------

    async def add_api_token(self, token_hash: bytes, name: str) -> None: ...

    async def add_first_api_token(self, token_hash: bytes, name: str) -> bool:
        """Add the token only if the store has none; whether it did.

        Atomic across processes: of brains starting together on a fresh
        store, exactly one makes (and shows) the first admin token.
        """
        ...

    async def api_token_known(self, token_hash: bytes) -> bool: ...

    async def list_api_tokens(self) -> list[ApiToken]:
        """Every admin token, oldest first."""
        ...

    async def api_token_used(self, token_hash: bytes, *, now: float) -> None:
        """Record that the token signed something in (``last_used_at``)."""
        ...

    async def revoke_api_token(self, token_hash: bytes) -> bool:
        """Delete the token and every session it opened; whether it existed."""
        ...

    async def add_api_session(
        self, session_hash: bytes, *, token_hash: bytes, expires_at: float
    ) -> None: ...

    async def api_session_token(
        self, session_hash: bytes, *, now: float, idle_seconds: float | None = None
    ) -> bytes | None:
        """The hash of the token that opened the session, if the session has not
        expired, nor (with ``idle_seconds``) been idle that long since its last
        `touch_api_session`, and that token still exists (sessions found
        ended are deleted)."""
        ...

    async def touch_api_session(self, session_hash: bytes, *, now: float) -> None:
        """Record a request of the session (its idle limit counts from here)."""
        ...

    async def drop_api_session(self, session_hash: bytes) -> None: ...

    async def drop_api_token_sessions(self, token_hash: bytes) -> int:
        """End every session an admin token opened; how many."""
        ...

    # -- accounts (store/accounts.py) ---------------------------------------------------

    async def count_users(self) -> int: ...

    async def create_user(
        self, user: User, password_hash: str, *, only_if_first: bool = False
    ) -> bool:
        """Add ``user``; `DirectoryConflict` if the name is taken. With
        ``only_if_first``, only on a store with no user (atomic across
        processes, like `add_first_api_token`); whether it was added."""
        ...

    async def list_users(self) -> list[User]: ...

    async def find_user(self, ref: str) -> User | None:
        """A user by id or name."""
        ...

    async def user_password(self, name: str) -> tuple[User, str] | None:
        """The user named ``name`` and their password hash."""
        ...

    async def update_user(
        self,
        user_id: uuid.UUID,
        *,
        disabled: bool | None = None,
        password_hash: str | None = None,
        role: str | None = None,
        projects: tuple[uuid.UUID, ...] | bool | None = False,
    ) -> User | None:
        """Change what is given (``projects`` False: unchanged). Disabling or a
        new password ends the user's sessions. None if there is no such user."""
        ...

    async def add_user_token(self, token: UserToken, token_hash: bytes) -> None: ...

    async def user_token_owner(
        self, token_hash: bytes, *, now: float
    ) -> tuple[UserToken, User] | None:
        """The live (unrevoked, unexpired) token and its enabled owner."""
        ...

    async def user_token_used(self, token_hash: bytes, *, now: float) -> None: ...

    async def list_user_tokens(self, user_id: uuid.UUID | None = None) -> list[UserToken]:
        """Personal tokens, revoked ones too: one user's, or everyone's."""
        ...

    async def revoke_user_token(
        self, token_id: uuid.UUID, *, user_id: uuid.UUID | None = None, now: float
    ) -> UserToken | None:
        """Revoke a live token (only ``user_id``'s if given) and end its sessions."""
        ...

    async def add_user_session(
        self,
        session_hash: bytes,
        *,
        user_id: uuid.UUID,
        token_id: uuid.UUID | None,
        now: float,
        expires_at: float,
    ) -> None: ...

    async def user_session(
        self, session_hash: bytes, *, now: float, idle_seconds: float
    ) -> UserSession | None:
        """The live session (deleted if expired, idle, or its user or token is gone)."""
        ...

    async def touch_user_session(self, session_hash: bytes, *, now: float) -> None: ...

    async def drop_user_session(self, session_hash: bytes) -> None: ...

    async def drop_user_sessions(self, user_id: uuid.UUID) -> int:
        """End every session of the user; how many."""
        ...

    # -- federation tokens (store/federation.py) ----------------------------------------

    async def add_federation_token(self, token: FederationToken) -> None: ...

    async def federation_token(self, token_hash: bytes, *, now: float) -> FederationToken | None:
        """The live (not revoked, not expired) token of that hash, else None."""
        ...

    async def federation_token_used(self, token_hash: bytes, *, now: float) -> None: ...

    async def list_federation_tokens(self) -> list[FederationToken]:
        """Every federation token, revoked ones too, oldest first."""
        ...

    async def revoke_federation_token(
        self, token_id: uuid.UUID, *, now: float
    ) -> FederationToken | None:
        """Revoke a live token; it as it was, or None if there was none such."""
        ...

    # -- OpAMP (store/opamp.py) ---------------------------------------------------------

    async def add_opamp_token(self, project_id: uuid.UUID, token_hash: bytes, name: str) -> None:
        """`LookupError` if there is no such project."""
        ...

    async def opamp_token_project(self, token_hash: bytes) -> uuid.UUID | None:
        """The project this OpAMP token admits to; None if unknown or revoked."""
        ...

    async def list_opamp_tokens(self) -> list[OpampToken]:
        """Every OpAMP token, oldest first."""
        ...

    async def revoke_opamp_token(self, token_hash: bytes) -> bool:
        """Delete the token; whether it existed."""
        ...

    async def touch_opamp_agents(self, touches: list[tuple[uuid.UUID, bytes, int, float]]) -> None:
        """Move only ``last_seen`` and ``sequence_num`` of each (project,
        instance_uid, sequence_num, seen at): messages that changed nothing.
        One transaction; a row written after its touch was made keeps its own."""
        ...

    async def list_opamp_agents(
        self, project_id: uuid.UUID | None = None, instance_uid: bytes | None = None
    ) -> list[OpampAgent]:
        """OpAMP agents, of one project or all, by project then instance_uid."""
        ...

    async def list_opamp_history(
        self,
        project_id: uuid.UUID,
        instance_uid: bytes,
        *,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[OpampHistoryEntry]:
        """The agent's history, newest first; ``before_id`` continues a page."""
        ...

    async def forget_opamp_history(self, *, before: float) -> int:
        """Delete the OpAMP history rows older than ``before``, in chunks of
        one transaction each; how many went."""
        ...

    async def load_opamp_agent(
        self, project_id: uuid.UUID, instance_uid: bytes
    ) -> tuple[OpampAgent | None, OpampConfig | None]:
        """The agent's row and its desired configuration, in one call: what
        answering one of its messages needs. An applied configuration comes
        without its files (``files`` empty): read them with `get_opamp_config`
        if the agent turns out to need them."""
        ...

    async def get_opamp_config(
        self, project_id: uuid.UUID, instance_uid: bytes
    ) -> OpampConfig | None: ...

    async def list_opamp_configs(self, project_id: uuid.UUID | None = None) -> list[OpampConfig]:
        """Desired configurations, of one project or all, without their files
        (``files`` empty): what the fleet listing shows beside each agent."""
        ...

    async def put_opamp_config(self, config: OpampConfig, *, actor: str | None) -> None:
        """Insert or replace the agent's desired configuration, with its
        ``opamp.config.pushed`` audit row, in one transaction."""
        ...

    async def delete_opamp_config(
        self, project_id: uuid.UUID, instance_uid: bytes, *, actor: str | None
    ) -> bool:
        """Stop offering it (with an ``opamp.config.deleted`` audit row); whether it existed."""
        ...

    async def get_opamp_configs(
        self, project_id: uuid.UUID, instance_uids: list[bytes]
    ) -> dict[bytes, OpampConfig]:
        """Many agents' desired configurations (with their files), by instance_uid."""
        ...

    async def data_version(self) -> int | None:
        """A number that moves when another connection commits to this store
        (SQLite's ``PRAGMA data_version``); None where that cannot be told."""
        return None

    async def write_opamp_states(self, writes: list[StateWrite]) -> int:
        """Agents' rows (insert or replace; a row's ``replaces``: an instance_uid
        of the same project whose row goes, the agent having been given a new
        id) and configuration statuses (`store.opamp.StateWrite`), all in one
        transaction; how many statuses moved (none for a configuration
        another has replaced since). An acknowledgement is audited with it."""
        ...

    async def create_opamp_rollout(
        self,
        rollout_id: uuid.UUID,
        *,
        project_id: uuid.UUID,
        selector: dict[str, str],
        files: dict[str, Any],
        config_hash: str,
        canary_percent: int,
        batch_size: int,
        failure_threshold_percent: int,
        actor: str | None,
        now: float,
    ) -> OpampRollout:
        """Start a rollout: its targets are the project's stored agents that the
        selector matches and that accept remote configuration, now (audited
        ``opamp.rollout.created``). `LookupError` if there is no such project."""
        ...

    async def get_opamp_rollout(self, rollout_id: uuid.UUID) -> OpampRollout | None: ...

    async def list_opamp_rollouts(
        self, project_id: uuid.UUID | None = None, *, state: str | None = None
    ) -> list[OpampRollout]:
        """Rollouts, newest first."""
        ...

    async def assign_opamp_rollout_stage(
        self, rollout_id: uuid.UUID, *, stage: int, end: int, now: float
    ) -> list[bytes] | None:
        """Give the rollout's configuration to its targets up to ``end`` (stage
        order), as stage ``stage``, if the rollout is running at stage
        ``stage - 1`` (else None: someone else moved it). Each agent's push is
        audited (``opamp.config.pushed``, actor ``rollout:ID``), and the stage
        (``opamp.rollout.stage``). The agents given it."""
        ...

    async def transition_opamp_rollout(
        self,
        rollout_id: uuid.UUID,
        *,
        to_state: str,
        reason: str | None = None,
        actor: str | None,
        now: float,
    ) -> OpampRollout:
        """Move the rollout (audited ``opamp.rollout.<halted|completed|resumed|
        cancelled>``): halt or complete a running one, resume a halted one
        (accepting its failures so far), cancel either. `LookupError` if there
        is none, `ValueError` if it is in a state that cannot move so."""
        ...

    async def opamp_gauges(self) -> tuple[dict[str, int], dict[str, int]]:
        """Rollouts by state, and desired configurations by status (for /metrics)."""
        ...

    async def aclose(self) -> None: ...


def check_command_state(to_state: str) -> None:
    """`ValueError` unless ``to_state`` is one of `COMMAND_STATES`."""
    if to_state not in COMMAND_STATES:
        raise ValueError(f"unknown command state {to_state!r}")


def created_details(command: CommandRecord) -> dict[str, Any]:
    """The audit details of a new command."""
    return {
        "action": command.action,
        "agent_id": str(command.agent_id),
        "issued_by": command.issued_by,
    }


def transition_details(old_state: str, worker_id: str | None, error: str | None) -> dict[str, Any]:
    """The audit details of a command transition (only the keys with a value)."""
    details: dict[str, Any] = {"from": old_state}
    if worker_id is not None:
        details["worker_id"] = worker_id
    if error is not None:
        details["error"] = error
    return details


def apply_registry_delta(
    registry: Any,
    engine: str,
    added: list[dict[str, Any]],
    removed: list[str],
    updated: list[dict[str, Any]],
) -> dict[str, Any]:
    """``registry`` (``{engine: {task name: task}}``) with one delta applied.

    Both stores use it inside their read-modify-write transaction. Anything
    malformed already stored (not an object) starts over as empty.
    """
    result: dict[str, Any] = dict(registry) if isinstance(registry, dict) else {}
    current = result.get(engine)
    tasks: dict[str, Any] = dict(current) if isinstance(current, dict) else {}

    def put(entries: list[dict[str, Any]]) -> None:
        for task in entries:
            if isinstance(task, dict) and isinstance(task.get("name"), str):
                tasks[task["name"]] = task

    # In the order of the frame's fields: added, removed, updated.
    put(added)
    for name in removed:
        if isinstance(name, str):
            tasks.pop(name, None)
    put(updated)
    result[engine] = tasks
    return result
