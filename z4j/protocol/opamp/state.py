"""One agent's OpAMP status, and what each message it sends does to it.

Theory of operation
-------------------
The brain keeps an `AgentState` per agent: the last report of each status
part (as deterministic protobuf bytes), its capabilities, the last sequence
number, whether it is connected, and whether we are waiting for a full
report. `receive` takes that state (None for an agent never heard of) and
one decoded `AgentToServer`, and returns an `Outcome`: the new state, the
`ServerToAgent` to send back and the `Change`s made. It does no I/O and
remembers nothing between calls, so whichever replica answers an HTTP poll
can apply it, given the state the previous message left in the store.

The rules, in the order `receive` applies them:

1. Every message is answered, echoing its ``instance_uid``.
2. Non-zero ``capabilities`` replace the stored ones; 0 means "not said"
   (a bare HTTP poll may carry nothing but ``instance_uid``).
3. Status compression: a part absent from the message is unchanged; a part
   present replaces the stored one (`STATUS_PARTS`).
4. ``agent_disconnect`` marks the agent disconnected; a second one changes
   nothing. An agent on its way out is offered, asked and given nothing
   (rules 5-7). Any other message marks it connected again.
5. Sequence numbers. A message is *in sequence* when its number is the
   previous one + 1 (from an agent never heard of: when it is 0, its first
   message ever, which cannot rely on earlier ones), and the caller vouches
   for the stored state (``vouched``: not so for the first message a
   server process gets from a known agent, which may have dropped a report
   while the server was away). It is *complete* when
   it carries every part its capabilities promise (`expected_parts`). A
   message that is neither may rely on a report we missed: the agent's
   status is then *suspect*, and replies set ReportFullState until the
   answer comes:

       suspect | complete | in sequence | has description | then
       no      |   yes    |      -      |        -        | fine
       no      |   no     |     yes     |        -        | fine
       no      |   no     |     no      |        -        | suspect: ask
       yes     |   yes    |      -      |        -        | fine (answered)
       yes     |   no     |     yes     |       yes       | fine (answered)
       yes     |   no     |  otherwise                    | still suspect: ask

   A full report always carries the description, so an agent with no
   health or configuration to report still answers; in sequence, so that a
   retried old message or one sent after a lost answer does not pass for
   it. A suspect agent is asked in at most `MAX_FULL_STATE_REQUESTS` replies
   in a row, then one reply goes without: each ask makes a client send at
   once, and one that never answers as we expect must not ping-pong with
   us; yet we keep asking, so the status converges whenever it does.
6. ``RequestInstanceUid`` is answered with a fresh 16-byte id from the
   injected generator (`AgentIdentification`); the new state is the
   agent's under that id from then on.
7. A desired configuration is offered while the agent has not reported its
   hash as APPLIED, and only to an agent that accepts remote config. Over
   HTTP every reply offers it (each poll stands alone); on a WebSocket it
   goes once per connection (``config_sent``: the stream delivers it, and
   the agent's status reports follow), again only if the agent reports
   another hash. `push` makes the unsolicited message that offers a new
   configuration to a connected WebSocket agent.
8. Server capabilities go in every HTTP reply and in the first reply on a
   WebSocket; error replies (`replies`) carry none.

Writes: `Outcome.changed` empty means only the sequence number moved; the
caller may coalesce that with "last seen" rather than write at once, as
long as the agent's next message, on whichever replica, reads the new
number: a stale one looks like a gap and costs a full report.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

import attrs

from ..errors import LocalProtocolError
from . import opamp_pb2 as pb
from .codec import INSTANCE_UID_BYTES
from .flags import SERVER_CAPABILITIES, AgentCapability, AgentFlag, ServerCapability, ServerFlag
from .remote_config import ConfigProgress, RemoteConfig, progress

__all__ = [
    "MAX_FULL_STATE_REQUESTS",
    "STATUS_PARTS",
    "AgentState",
    "Change",
    "Outcome",
    "Transport",
    "expected_parts",
    "push",
    "receive",
]

MAX_FULL_STATE_REQUESTS: Final = 3


class Transport(enum.Enum):
    HTTP = "http"
    WEBSOCKET = "websocket"


class Change(enum.Enum):
    """What a message changed in an agent's state (the caller writes these).

    The status parts' values are their ``AgentToServer`` field names.
    """

    AGENT_DESCRIPTION = "agent_description"
    HEALTH = "health"
    EFFECTIVE_CONFIG = "effective_config"
    REMOTE_CONFIG_STATUS = "remote_config_status"
    PACKAGE_STATUSES = "package_statuses"
    CUSTOM_CAPABILITIES = "custom_capabilities"
    AVAILABLE_COMPONENTS = "available_components"
    CONNECTION_SETTINGS_STATUS = "connection_settings_status"
    CAPABILITIES = "capabilities"
    CONNECTED = "connected"  # connected or disconnected (a first message included)
    INSTANCE_UID = "instance_uid"  # we gave the agent a new id: the state moves to it
    FULL_STATE_REQUESTS = "full_state_requests"  # suspect, asked again, or answered


STATUS_PARTS: Final = (
    Change.AGENT_DESCRIPTION,
    Change.HEALTH,
    Change.EFFECTIVE_CONFIG,
    Change.REMOTE_CONFIG_STATUS,
    Change.PACKAGE_STATUSES,
    Change.CUSTOM_CAPABILITIES,
    Change.AVAILABLE_COMPONENTS,
    Change.CONNECTION_SETTINGS_STATUS,
)
"""The status sub-messages an agent may leave out when unchanged."""

# Which capability promises which part; the description is always due.
_PROMISED_BY: Final = {
    Change.HEALTH: AgentCapability.REPORTS_HEALTH,
    Change.EFFECTIVE_CONFIG: AgentCapability.REPORTS_EFFECTIVE_CONFIG,
    Change.REMOTE_CONFIG_STATUS: AgentCapability.REPORTS_REMOTE_CONFIG,
    Change.PACKAGE_STATUSES: AgentCapability.REPORTS_PACKAGE_STATUSES,
    Change.AVAILABLE_COMPONENTS: AgentCapability.REPORTS_AVAILABLE_COMPONENTS,
    Change.CONNECTION_SETTINGS_STATUS: AgentCapability.REPORTS_CONNECTION_SETTINGS_STATUS,
}


def expected_parts(capabilities: AgentCapability) -> frozenset[Change]:
    """The parts a full report from an agent with these capabilities carries."""
    promised = {part for part, bit in _PROMISED_BY.items() if bit in capabilities}
    return frozenset({Change.AGENT_DESCRIPTION, *promised})


@attrs.frozen(kw_only=True)
class AgentState:
    """What we know of one agent; a status part is None until first reported.

    Parts hold the deterministic encoding of the last report, so equal
    reports are equal bytes and "changed" is a byte comparison.
    """

    instance_uid: bytes
    sequence_num: int = 0
    capabilities: AgentCapability = attrs.field(
        default=AgentCapability(0), converter=AgentCapability
    )
    connected: bool = False
    full_state_requests: int = 0  # 0: nothing missing; else the place in the ask cycle
    agent_description: bytes | None = None
    health: bytes | None = None
    effective_config: bytes | None = None
    remote_config_status: bytes | None = None
    package_statuses: bytes | None = None
    custom_capabilities: bytes | None = None
    available_components: bytes | None = None
    connection_settings_status: bytes | None = None

    def part(self, part: Change) -> bytes | None:
        """The stored encoding of a status part (one of `STATUS_PARTS`)."""
        if part not in STATUS_PARTS:
            raise ValueError(f"{part} is not a status part")
        value: bytes | None = getattr(self, part.value)
        return value

    def report(self) -> pb.AgentToServer:
        """Everything known, as one full `AgentToServer` (for reading, not sending)."""
        message = pb.AgentToServer(
            instance_uid=self.instance_uid,
            sequence_num=self.sequence_num,
            capabilities=int(self.capabilities),
        )
        for part in STATUS_PARTS:
            data = self.part(part)
            if data is not None:
                getattr(message, part.value).MergeFromString(data)
        return message


@attrs.frozen(kw_only=True)
class Outcome:
    """What `receive` decided: the state to keep, the reply, and what changed."""

    state: AgentState
    reply: pb.ServerToAgent
    changed: frozenset[Change]


def receive(
    stored: AgentState | None,
    message: pb.AgentToServer,
    *,
    transport: Transport,
    new_instance_uid: Callable[[], bytes],
    capabilities_sent: bool = False,
    desired_config: RemoteConfig | None = None,
    config_sent: bytes | None = None,
    vouched: bool = True,
    server_capabilities: ServerCapability = SERVER_CAPABILITIES,
) -> Outcome:
    """Apply one message from an agent to its stored state (see the module docstring).

    ``stored`` is the state kept under ``message.instance_uid``, or None.
    ``capabilities_sent`` says an earlier reply on this WebSocket already
    carried our capabilities, and ``config_sent`` the hash of the
    configuration it already offered (both ignored over HTTP).
    ``desired_config`` is the configuration the agent should run, if any.
    ``new_instance_uid`` makes a 16-byte id, called only when the agent
    asks for one. ``vouched`` False says the caller cannot vouch that no
    report went missing since ``stored`` was kept (the first message a
    server process gets from this agent: while it was down, the agent may
    have dropped a report it could not send): then only a complete message
    passes, as after a gap (rule 5).
    """
    uid = message.instance_uid
    if stored is not None and stored.instance_uid != uid:
        raise LocalProtocolError(
            "stored state belongs to another instance_uid", reason="wrong_state"
        )
    before = stored if stored is not None else AgentState(instance_uid=uid)
    changed: set[Change] = set()
    reply = pb.ServerToAgent(instance_uid=uid)

    capabilities = before.capabilities
    if message.capabilities and message.capabilities != before.capabilities:
        capabilities = AgentCapability(message.capabilities)
        changed.add(Change.CAPABILITIES)

    parts: dict[str, bytes] = {}
    for part in STATUS_PARTS:
        if message.HasField(part.value):
            data = getattr(message, part.value).SerializeToString(deterministic=True)
            if data != before.part(part):
                parts[part.value] = data
                changed.add(part)

    leaving = message.HasField("agent_disconnect")
    if before.connected == leaving:
        changed.add(Change.CONNECTED)

    requests = before.full_state_requests
    new_uid = uid
    if not leaving:
        requests = _full_state_requests(stored, message, capabilities, vouched=vouched)
        if 0 < requests <= MAX_FULL_STATE_REQUESTS:
            reply.flags |= ServerFlag.REPORT_FULL_STATE
        if requests != before.full_state_requests:
            changed.add(Change.FULL_STATE_REQUESTS)

        if message.flags & AgentFlag.REQUEST_INSTANCE_UID:
            new_uid = new_instance_uid()
            if len(new_uid) != INSTANCE_UID_BYTES:
                raise LocalProtocolError(
                    f"new instance_uid is {len(new_uid)} bytes, not {INSTANCE_UID_BYTES}",
                    reason="instance_uid",
                )
            reply.agent_identification.new_instance_uid = new_uid
            changed.add(Change.INSTANCE_UID)

    state = attrs.evolve(
        before,
        instance_uid=new_uid,
        sequence_num=message.sequence_num,
        capabilities=capabilities,
        connected=not leaving,
        full_state_requests=requests,
        **parts,
    )

    sent = config_sent if transport is Transport.WEBSOCKET else None
    if (
        not leaving
        and desired_config is not None
        and _due(state, desired_config, server_capabilities, sent, reported=message)
    ):
        reply.remote_config.CopyFrom(desired_config.to_message())

    if transport is Transport.HTTP or not capabilities_sent:
        reply.capabilities = int(server_capabilities)

    return Outcome(state=state, reply=reply, changed=frozenset(changed))


def push(
    state: AgentState,
    desired_config: RemoteConfig,
    *,
    capabilities_sent: bool,
    config_sent: bytes | None,
    server_capabilities: ServerCapability = SERVER_CAPABILITIES,
) -> pb.ServerToAgent | None:
    """The message offering ``desired_config`` to a connected WebSocket agent
    unasked (its configuration just changed), or None when rule 7 would not
    offer it: the agent is gone, does not accept remote config, runs it
    already, or was offered this very hash on this connection."""
    if not state.connected or not _due(
        state, desired_config, server_capabilities, config_sent, reported=None
    ):
        return None
    message = pb.ServerToAgent(instance_uid=state.instance_uid)
    message.remote_config.CopyFrom(desired_config.to_message())
    if not capabilities_sent:
        message.capabilities = int(server_capabilities)
    return message


def _due(
    state: AgentState,
    config: RemoteConfig,
    server_capabilities: ServerCapability,
    sent: bytes | None,
    *,
    reported: pb.AgentToServer | None,
) -> bool:
    """Rule 7: whether ``config`` is to be offered now. ``sent``: the hash this
    WebSocket already carried; a message reporting another hash since (the
    agent rolled back or restarted) makes it due again."""
    if AgentCapability.ACCEPTS_REMOTE_CONFIG not in state.capabilities:
        return False
    if ServerCapability.OFFERS_REMOTE_CONFIG not in server_capabilities:
        return False
    if _progress(state, config) is ConfigProgress.APPLIED:
        return False
    if sent != config.hash:
        return True
    return (
        reported is not None
        and reported.HasField("remote_config_status")
        and reported.remote_config_status.last_remote_config_hash not in (b"", config.hash)
    )


def _full_state_requests(
    stored: AgentState | None,
    message: pb.AgentToServer,
    capabilities: AgentCapability,
    *,
    vouched: bool,
) -> int:
    """Rule 5: 0 when nothing is missing; else 1..MAX (ask) or MAX + 1 (pause)."""
    complete = all(message.HasField(p.value) for p in expected_parts(capabilities))
    if stored is None:
        return 0 if complete or message.sequence_num == 0 else 1
    in_sequence = message.sequence_num == stored.sequence_num + 1
    if not stored.full_state_requests:
        return 0 if complete or (in_sequence and vouched) else 1
    if complete or (in_sequence and message.HasField("agent_description")):
        return 0
    return stored.full_state_requests % (MAX_FULL_STATE_REQUESTS + 1) + 1


def _progress(state: AgentState, config: RemoteConfig) -> ConfigProgress:
    reported = state.remote_config_status
    status = None if reported is None else pb.RemoteConfigStatus.FromString(reported)
    return progress(status, config.hash)
