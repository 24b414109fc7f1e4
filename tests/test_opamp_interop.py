"""Our OpAMP core against a real client: OpenTelemetry's Python OpAMP client.

`opentelemetry-opamp-client` (a test dependency) compiled its own copy of the
OpAMP schema; we wrote ours from the specification's prose. Here:

- every field its schema knows has our number, type and cardinality (ours,
  from a later specification, also has fields it does not know yet);
- what it serialises, over real HTTP to a small server in this test that
  runs `decode_http_body` -> `receive` -> `encode_server_to_agent`, decodes
  to the instance_uid, sequence numbers, description attributes,
  capabilities and effective configuration it was given;
- what we answer, it accepts: capabilities, a remote configuration it
  decodes to the files we offered, ReportFullState, the error replies;
- its own agent loop (threads, heartbeats) against our rules: the pushed
  configuration is applied and reported APPLIED with our hash, then no longer
  offered; a server that forgot the agent asks for the full state and gets
  it; ``stop()`` marks the agent disconnected.

The test server is a stand-in for the brain's endpoint (which comes later):
it keeps states in a dict, as the store will.
"""

from __future__ import annotations

import atexit
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from z4j.protocol.opamp import (
    SERVER_CAPABILITIES,
    AgentCapability,
    AgentState,
    ConfigFile,
    ConfigProgress,
    OpampDecodeError,
    RemoteConfig,
    ServerFlag,
    Transport,
    bad_request,
    decode_http_body,
    encode_server_to_agent,
    progress,
    receive,
    to_dict,
)
from z4j.protocol.opamp import opamp_pb2 as pb

pytest.importorskip("opentelemetry._opamp", reason="opentelemetry-opamp-client is not installed")
requests = pytest.importorskip("requests")

from opentelemetry._opamp import messages as client_messages  # noqa: E402
from opentelemetry._opamp.agent import OpAMPAgent  # noqa: E402
from opentelemetry._opamp.callbacks import MessageData, OpAMPCallbacks  # noqa: E402
from opentelemetry._opamp.client import OpAMPClient  # noqa: E402
from opentelemetry._opamp.proto import anyvalue_pb2 as their_anyvalue  # noqa: E402
from opentelemetry._opamp.proto import opamp_pb2 as theirs  # noqa: E402
from opentelemetry._opamp.transport.requests import RequestsTransport  # noqa: E402

SAMPLING = {"sampler": "parentbased_traceidratio", "ratio": 0.25}
CONFIG = RemoteConfig(
    {
        "sampling.json": ConfigFile(
            body=json.dumps(SAMPLING).encode(), content_type="application/json"
        )
    }
)
IDENTIFYING = {"service.name": "checkout", "service.version": "1.2.0"}
NON_IDENTIFYING: dict[str, Any] = {
    "host.name": "web-1",
    "process.pid": 4242,
    "debug": True,
    "load": 0.5,
}
# Their enum is top-level and named otherwise; the number is the same (test_enum_numbers_match).
APPLIED: Any = pb.RemoteConfigStatus.STATUS_APPLIED
CLIENT_CAPABILITIES = (
    AgentCapability.REPORTS_STATUS
    | AgentCapability.REPORTS_HEARTBEAT
    | AgentCapability.ACCEPTS_REMOTE_CONFIG
    | AgentCapability.REPORTS_REMOTE_CONFIG
    | AgentCapability.REPORTS_EFFECTIVE_CONFIG
)


# ---------------------------------------------------------------------------
# The schemas


def _shape(descriptor: Any) -> dict[int, tuple[str, int, bool, str | None]]:
    return {
        f.number: (
            f.name,
            f.type,
            f.is_repeated,
            f.message_type.name if f.message_type else None,
        )
        for f in descriptor.fields
    }


def _their_messages() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for module in (theirs, their_anyvalue):
        found.update(module.DESCRIPTOR.message_types_by_name)
    return found


def test_every_field_the_client_knows_has_our_number_and_type() -> None:
    ours = pb.DESCRIPTOR.message_types_by_name
    for name, their_message in _their_messages().items():
        assert name in ours, f"the client has a message {name} we lack"
        mine = _shape(ours[name])
        for number, shape in _shape(their_message).items():
            assert mine.get(number) == shape, f"{name} field {number}: ours {mine.get(number)}"
        nested_ours = {n.name: _shape(n) for n in ours[name].nested_types}
        for nested in their_message.nested_types:  # map entries
            assert nested_ours.get(nested.name) == _shape(nested), f"{name}.{nested.name}"
    # Our messages the client does not have are from a later specification.
    assert set(ours) - set(_their_messages()) == {
        "ConnectionSettingsStatus",
        "TLSConnectionSettings",
        "ProxyConnectionSettings",
    }


def test_enum_numbers_match() -> None:
    def numbers(enum: Any) -> list[int]:
        return sorted(v.number for v in enum.values)

    by_name = {e.name: e for e in theirs.DESCRIPTOR.enum_types_by_name.values()}
    for name in ("AgentCapabilities", "ServerCapabilities", "AgentToServerFlags", "PackageType"):
        their_numbers = numbers(by_name[name])
        assert set(their_numbers) <= set(numbers(pb.DESCRIPTOR.enum_types_by_name[name])), name
    assert numbers(by_name["ServerToAgentFlags"]) == numbers(pb.ServerToAgentFlags.DESCRIPTOR)
    # Theirs are top-level where the specification nests them; same numbers.
    assert numbers(by_name["RemoteConfigStatuses"]) == numbers(
        pb.RemoteConfigStatus.Status.DESCRIPTOR
    )
    assert numbers(by_name["ServerErrorResponseType"]) == numbers(
        pb.ServerErrorResponse.Type.DESCRIPTOR
    )


# ---------------------------------------------------------------------------
# A small OpAMP server over our core


class _Server:
    """Our core behind ``http.server``: decode, `receive`, encode; keeps what it saw."""

    def __init__(self, desired: RemoteConfig | None) -> None:
        self.desired = desired
        self.states: dict[bytes, AgentState] = {}
        self.received: list[pb.AgentToServer] = []
        self.replies: list[pb.ServerToAgent] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def handle(self, body: bytes, headers: dict[str, str]) -> bytes:
        with self.lock:
            self.headers.append(headers)
            try:
                message = decode_http_body(body, content_encoding=headers.get("Content-Encoding"))
            except OpampDecodeError as error:
                reply = bad_request(error)
            else:
                self.received.append(message)
                outcome = receive(
                    self.states.get(message.instance_uid),
                    message,
                    transport=Transport.HTTP,
                    new_instance_uid=lambda: bytes(16),
                    desired_config=self.desired,
                )
                self.states[outcome.state.instance_uid] = outcome.state
                reply = outcome.reply
            self.replies.append(reply)
            self.changed.notify_all()
            return encode_server_to_agent(reply)

    def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not condition():
                left = deadline - time.monotonic()
                assert left > 0, "the client did not get there in time"
                self.changed.wait(left)


def _handler(server: _Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            data = server.handle(body, dict(self.headers.items()))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[_Server, str]]:
    core = _Server(desired=CONFIG)
    http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(core))
    thread = threading.Thread(target=http.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield core, f"http://127.0.0.1:{http.server_address[1]}/v1/opamp"
    finally:
        http.shutdown()
        http.server_close()
        thread.join(5)


@pytest.fixture
def session() -> Iterator[Any]:
    with requests.Session() as s:
        yield s


def _client(url: str, session: Any) -> OpAMPClient:
    return OpAMPClient(
        endpoint=url,
        agent_identifying_attributes=IDENTIFYING,
        agent_non_identifying_attributes=NON_IDENTIFYING,
        transport=RequestsTransport(session),
    )


# ---------------------------------------------------------------------------
# Message by message


def test_what_the_client_sends_we_read_and_what_we_answer_it_reads(
    server: tuple[_Server, str], session: Any
) -> None:
    core, url = server
    client = _client(url, session)
    client.update_effective_config({"": {"exporter": "otlp"}}, "application/json")

    reply = client.send(client.build_full_state_message())

    sent = core.received[0]
    assert core.headers[0]["Content-Type"] == "application/x-protobuf"
    assert len(sent.instance_uid) == 16 and sent.sequence_num == 0
    assert to_dict(sent.agent_description.identifying_attributes) == IDENTIFYING
    assert to_dict(sent.agent_description.non_identifying_attributes) == NON_IDENTIFYING
    assert AgentCapability(sent.capabilities) == CLIENT_CAPABILITIES
    effective = sent.effective_config.config_map.config_map[""]
    assert (json.loads(effective.body), effective.content_type) == (
        {"exporter": "otlp"},
        "application/json",
    )
    state = core.states[sent.instance_uid]
    assert state.connected and state.capabilities == CLIENT_CAPABILITIES

    # Our reply, parsed by the client's own schema.
    assert reply.instance_uid == sent.instance_uid
    assert reply.capabilities == SERVER_CAPABILITIES
    assert not reply.flags & ServerFlag.REPORT_FULL_STATE  # seq 0: nothing left out
    assert reply.remote_config.config_hash == CONFIG.hash
    assert list(OpAMPClient.decode_remote_config(reply.remote_config)) == [
        ("sampling.json", SAMPLING)
    ]

    # The agent applies it and says so; the offer stops.
    status = client.update_remote_config_status(CONFIG.hash, APPLIED)
    assert status is not None
    reply = client.send(client.build_remote_config_status_response_message(status))
    sent = core.received[1]
    assert sent.sequence_num == 1
    assert sent.remote_config_status.last_remote_config_hash == CONFIG.hash
    state = core.states[sent.instance_uid]
    assert progress(state.report().remote_config_status, CONFIG.hash) is ConfigProgress.APPLIED
    assert not reply.HasField("remote_config") and not reply.flags

    # A heartbeat changes nothing; a disconnect marks it gone.
    client.send(client.build_heartbeat_message())
    assert core.states[sent.instance_uid].sequence_num == 2
    client.send(client.build_agent_disconnect_message())
    assert not core.states[sent.instance_uid].connected


def test_the_client_reads_our_error_replies(server: tuple[_Server, str], session: Any) -> None:
    core, url = server
    response = session.post(
        url, data=b"\xff\xff", headers={"Content-Type": "application/x-protobuf"}
    )
    reply = client_messages.decode_message(response.content)
    assert reply.HasField("error_response")
    assert int(reply.error_response.type) == pb.ServerErrorResponse.TYPE_BAD_REQUEST
    assert core.received == []


def test_a_gzipped_body_from_the_client_library(server: tuple[_Server, str], session: Any) -> None:
    """The client does not compress; its bytes gzipped by hand stand in for one that does."""
    import gzip

    core, url = server
    client = _client(url, session)
    body = gzip.compress(client.build_full_state_message())
    response = session.post(
        url,
        data=body,
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
    )
    reply = client_messages.decode_message(response.content)
    assert not reply.HasField("error_response")
    assert to_dict(core.received[0].agent_description.identifying_attributes) == IDENTIFYING


# ---------------------------------------------------------------------------
# The client's own agent loop


class _Applier(OpAMPCallbacks):
    """What a distribution does with a remote config: apply it, report APPLIED."""

    def __init__(self) -> None:
        self.configs: list[bytes] = []

    def on_message(self, agent: OpAMPAgent, client: OpAMPClient, message: MessageData) -> None:
        if message.remote_config is None:
            return
        remote = message.remote_config
        self.configs.append(remote.config_hash)
        status = client.update_remote_config_status(remote.config_hash, APPLIED)
        if status is not None:
            agent.send(client.build_remote_config_status_response_message(status))


def test_the_client_agent_loop_converges_with_our_rules(
    server: tuple[_Server, str], session: Any
) -> None:
    core, url = server
    client = _client(url, session)
    callbacks = _Applier()
    agent = OpAMPAgent(interval=0.05, callbacks=callbacks, client=client, initial_backoff=0.05)
    agent.start()
    try:
        # The configuration arrives, is applied, and APPLIED comes back with our hash.
        def applied() -> bool:
            return any(
                progress(s.report().remote_config_status, CONFIG.hash) is ConfigProgress.APPLIED
                for s in core.states.values()
            )

        core.wait_for(applied)
        (uid,) = core.states
        with core.lock:
            applied_at = len(core.replies)
        core.wait_for(lambda: len(core.replies) >= applied_at + 2)  # heartbeats after that
        # Offered until applied (a heartbeat crossing the APPLIED report may
        # carry it once more), then no more.
        assert set(callbacks.configs) == {CONFIG.hash}
        assert not any(r.HasField("remote_config") for r in core.replies[applied_at:])

        # The server forgets the agent (a lost store): the next heartbeat is
        # compressed and out of step, so we ask for everything, and get it.
        with core.lock:
            core.states.clear()
            asked_at = len(core.replies)

        def answered() -> bool:
            asked = any(r.flags & ServerFlag.REPORT_FULL_STATE for r in core.replies[asked_at:])
            state = core.states.get(uid)
            return asked and state is not None and state.full_state_requests == 0

        core.wait_for(answered)
        state = core.states[uid]
        assert to_dict(state.report().agent_description.identifying_attributes) == IDENTIFYING
        assert progress(state.report().remote_config_status, CONFIG.hash) is ConfigProgress.APPLIED
    finally:
        agent.stop(timeout=5)
        atexit.unregister(agent.stop)
    assert core.received[-1].HasField("agent_disconnect")
    assert not core.states[uid].connected
