"""The rules the suite checks, by name: one per behaviour of the protocol pages.

A `Violation` names the rule it breaks, the CLI reports per rule, and the
bite tests break one behaviour each and expect its rule to fail. The
"page" is where the behaviour is written down: docs/agent-protocol.md and
docs/ingest-protocol.md (which follow /shared/design/PROTOCOL-*.md), and
for OpAMP the specification (opamp-spec's specification.md), or
docs/opamp.md for the rules only z4j promises (``z4j``: checked only when
the target says it is a z4j brain, ``--z4j-opamp``).
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = ["RULES", "Rule"]


@attrs.frozen(kw_only=True)
class Rule:
    name: str
    protocol: str  # "agent", "ingest" or "opamp"
    checks: str
    page: str  # the section of the protocol page that says so
    needs: str = ""  # what the target must provide, if anything
    z4j: bool = False  # z4j's own policy, beyond the protocol: checked when asked


_AGENT = "docs/agent-protocol.md"
_INGEST = "docs/ingest-protocol.md"
_OPAMP = "opamp-spec specification.md"
_Z4J_OPAMP = "docs/opamp.md"

RULES: Final[dict[str, Rule]] = {
    rule.name: rule
    for rule in [
        Rule(
            name="handshake",
            protocol="agent",
            checks="hello is answered by an unsigned hello_ack with protocol_version '2', "
            "agent_id, project_id, a session_id new for every connection, "
            "heartbeat_interval_seconds and max_frame_size_bytes",
            page=f"{_AGENT}#handshake",
        ),
        Rule(
            name="brain-frames-signed",
            protocol="agent",
            checks="every frame the brain sends after hello_ack is v 2, of a brain-to-agent "
            "type, signed over the session binding with the project key, with a fresh "
            "nonce and a ts within 60 s",
            page=f"{_AGENT}#signed-frames",
        ),
        Rule(
            name="seq-monotonicity",
            protocol="agent",
            checks="the brain accepts our seq with gaps, and numbers its own frames with "
            "strictly increasing seq in each session",
            page=f"{_AGENT}#replay-guard",
        ),
        Rule(
            name="signature-rejection",
            protocol="agent",
            checks="a signed frame with no hmac, a wrong one, one bound to another session or "
            "changed after signing closes the connection with 4403",
            page=f"{_AGENT}#the-signature",
        ),
        Rule(
            name="replay-rejection",
            protocol="agent",
            checks="a frame with a seq not above the last, a nonce used before, a ts outside "
            "±60 s or without a zone closes the connection with 4403",
            page=f"{_AGENT}#replay-guard",
        ),
        Rule(
            name="batch-acked-once",
            protocol="agent",
            checks="every event_batch gets exactly one event_batch_ack (acked_id = its frame id, "
            "received = accepted = its events, rejected 0) while the connection is open, "
            "and no ack names a batch not sent",
            page=f"{_AGENT}#events",
        ),
        Rule(
            name="resent-events-land-once",
            protocol="agent",
            checks="every event of an acknowledged batch is stored exactly once, as sent, "
            "however often and on whichever connection it was sent again",
            page=f"{_AGENT}#events",
            needs="a way to read stored events (--events-command or --z4j-store)",
        ),
        Rule(
            name="oversize-1009",
            protocol="agent",
            checks="a message larger than hello_ack's max_frame_size_bytes closes with 1009",
            page=f"{_AGENT}#limits",
        ),
        Rule(
            name="unknown-fields-ignored",
            protocol="agent",
            checks="unknown fields in hello, in a signed envelope, in payloads and in events "
            "change nothing: the connection stays open and batches are acknowledged",
            page=f"{_AGENT}#frame-types",
        ),
        Rule(
            name="unexpected-frame-1002",
            protocol="agent",
            checks="a first frame that is not hello, a type in the wrong direction or an "
            "unknown type closes with 1002",
            page=f"{_AGENT}#close-codes",
        ),
        Rule(
            name="bad-frame-1007",
            protocol="agent",
            checks="a message that is not JSON, not an object, has no type, or whose payload "
            "does not fit its type closes with 1007",
            page=f"{_AGENT}#close-codes",
        ),
        Rule(
            name="version-4426",
            protocol="agent",
            checks="hello with a protocol_version other than '2', or a signed frame whose v "
            "is not 2, closes with 4426",
            page=f"{_AGENT}#close-codes",
        ),
        Rule(
            name="bad-token-refused",
            protocol="agent",
            checks="an unknown token never gets hello_ack: HTTP 401/403, or a close with 4401 "
            "or 4403",
            page=f"{_AGENT}#connection",
        ),
        Rule(
            name="replaced-4002",
            protocol="agent",
            checks="a new connection of the same worker gets hello_ack and the older one is "
            "closed with 4002",
            page=f"{_AGENT}#workers",
        ),
        Rule(
            name="worker-cap-4429",
            protocol="agent",
            checks="a connection for one more worker than the per-agent cap closes with 4429 "
            "before hello_ack; replacing a live worker is still allowed",
            page=f"{_AGENT}#workers",
            needs="the cap (--worker-cap; 64 by default)",
        ),
        Rule(
            name="rate-limit-4429",
            protocol="agent",
            checks="a connection sending frames or events well over its rate closes with 4429 "
            "(an error frame may come first)",
            page=f"{_AGENT}#limits",
            needs="the rates (--frames-per-second, --events-per-second), low enough to exceed",
        ),
        Rule(
            name="idle-4408",
            protocol="agent",
            checks="a connection that sends nothing for 3 heartbeat intervals closes with 4408",
            page=f"{_AGENT}#heartbeats-and-idle-connections",
            needs="a heartbeat interval short enough to wait for (--max-idle-wait)",
        ),
        Rule(
            name="command-delivered-once",
            protocol="agent",
            checks="a minted command reaches a live worker as a signed command frame whose id is "
            "the command id, at most once per connection, and never again once acknowledged",
            page=f"{_AGENT}#delivery",
            needs="a way to mint commands (--mint-command or --z4j-store)",
        ),
        Rule(
            name="command-final-state",
            protocol="agent",
            checks="a command_result moves its command to completed or failed, and no "
            "command is left pending or dispatched once answered",
            page=f"{_AGENT}#states",
            needs="a way to mint commands and read their state",
        ),
        Rule(
            name="revoked-4003",
            protocol="agent",
            checks="the live connections of a revoked agent close with 4003, and its token "
            "is refused afterwards",
            page=f"{_AGENT}#workers",
            needs="a way to revoke the agent (--revoke-command or --z4j-store); runs last",
        ),
        Rule(
            name="opamp-echo-uid",
            protocol="opamp",
            checks="every valid AgentToServer is answered (HTTP 200) with a ServerToAgent "
            "without error_response whose instance_uid is the message's 16 bytes",
            page=f"{_OPAMP}: ServerToAgent.instance_uid",
        ),
        Rule(
            name="opamp-server-capabilities",
            protocol="opamp",
            checks="every HTTP reply carries the server's capabilities, AcceptsStatus set",
            page=f"{_OPAMP}: ServerToAgent.capabilities",
        ),
        Rule(
            name="opamp-bad-request",
            protocol="opamp",
            checks="bytes that are not an AgentToServer with a 16-byte instance_uid (random, "
            "cut short, invalid UTF-8, a wrong wire type, bad gzip) get a ServerToAgent whose "
            "error_response is BAD_REQUEST, never a 5xx",
            page=f"{_OPAMP}: Throttling and errors, ServerErrorResponse",
        ),
        Rule(
            name="opamp-full-state",
            protocol="opamp",
            checks="a compressed report after a sequence gap (or the first heard, with seq > 0) "
            "gets ReportFullState; a full report in sequence does not",
            page=f"{_OPAMP}: Agent Status Compression, AgentToServer.sequence_num",
        ),
        Rule(
            name="opamp-new-instance-uid",
            protocol="opamp",
            checks="RequestInstanceUid is answered with agent_identification carrying a new "
            "16-byte instance_uid, under which the agent is then answered",
            page=f"{_OPAMP}: AgentToServer.flags, AgentIdentification",
        ),
        Rule(
            name="opamp-disconnect-idempotent",
            protocol="opamp",
            checks="agent_disconnect is answered without error, and so is a second one",
            page=f"{_OPAMP}: AgentDisconnect",
        ),
        Rule(
            name="opamp-remote-config-accepted-only",
            protocol="opamp",
            checks="no reply to an agent whose capabilities lack AcceptsRemoteConfig carries "
            "remote_config",
            page=f"{_OPAMP}: AgentCapabilities, AgentRemoteConfig",
        ),
        Rule(
            name="opamp-unauthorized-401",
            protocol="opamp",
            checks="a request without the bearer token, or with an unknown one, gets 401",
            page=f"{_Z4J_OPAMP}#pointing-a-client-at-the-brain",
            needs="an HTTP target and its token (--opamp-url, --opamp-token)",
        ),
        Rule(
            name="opamp-content-type-415",
            protocol="opamp",
            checks="a Content-Type other than application/x-protobuf (or none) gets 415",
            page=f"{_OPAMP}: Plain HTTP Transport",
            needs="an HTTP target",
        ),
        Rule(
            name="opamp-too-large-413",
            protocol="opamp",
            checks="a body over the server's message limit, or a gzip body inflating past it, "
            "gets 413",
            page=f"{_Z4J_OPAMP}#limits",
            needs="an HTTP target and its limit (--opamp-max-message-bytes, 10 MiB by default)",
        ),
        Rule(
            name="opamp-z4j-full-state-policy",
            protocol="opamp",
            checks="ReportFullState exactly as z4j's rule table says: a suspect agent is asked "
            "in up to 3 replies in a row, then one goes without; a first message with seq 0, "
            "a full report, or one in sequence with the description ends it; messages in "
            "sequence are not asked; a disconnect is never asked (one brain process)",
            page="z4j/protocol/opamp/state.py (rule 5)",
            needs="a z4j brain (--z4j-opamp)",
            z4j=True,
        ),
        Rule(
            name="opamp-z4j-remote-config-offered",
            protocol="opamp",
            checks="once a configuration is desired for an agent that accepts one, every reply "
            "to it offers that configuration (its hash) until the agent reports it APPLIED, "
            "and none after; none to an agent sending agent_disconnect",
            page=f"{_Z4J_OPAMP}#remote-configuration",
            needs="a z4j brain (--z4j-opamp) and a way to push configurations "
            "(--opamp-config-command, or --z4j-store with --opamp-token)",
            z4j=True,
        ),
        Rule(
            name="opamp-z4j-bad-request-200",
            protocol="opamp",
            checks="the BAD_REQUEST ServerToAgent comes with HTTP 200 (clients read a "
            "ServerToAgent only from a 200)",
            page=f"{_Z4J_OPAMP}#pointing-a-client-at-the-brain",
            needs="a z4j brain (--z4j-opamp)",
            z4j=True,
        ),
        Rule(
            name="ingest-replies-in-order",
            protocol="ingest",
            checks="every valid payload, [] and PING gets exactly one 2:OK, in frame order, "
            "pipelined or not and however the bytes are cut, on a connection that stays open",
            page=f"{_INGEST}#replies",
        ),
        Rule(
            name="ingest-content-error",
            protocol="ingest",
            checks="a whole frame with bad content (version, token, JSON, not an array, a bad "
            "record, bad gzip, too deep, NUL) gets 5:ERROR and the connection reads on",
            page=f"{_INGEST}#errors-which-close-the-connection",
        ),
        Rule(
            name="ingest-framing-error",
            protocol="ingest",
            checks="a frame whose length is not a number, has a leading zero, is over the frame "
            "limit, or is cut by end of stream gets 5:ERROR, then the connection closes",
            page=f"{_INGEST}#errors-which-close-the-connection",
        ),
        Rule(
            name="ingest-acked-land-once",
            protocol="ingest",
            checks="every record of a payload answered 2:OK is stored exactly once, as sent",
            page=f"{_INGEST}#what-becomes-of-a-payload",
            needs="a way to read stored events (--events-command or --z4j-store)",
        ),
        Rule(
            name="ingest-backpressure",
            protocol="ingest",
            checks="once the buffer holds its capacity, payloads get 5:ERROR while PING and [] "
            "still get 2:OK, the connection stays open, and no more than the capacity is "
            "ever accepted",
            page=f"{_INGEST}#errors-which-close-the-connection",
            needs="a brain whose drains do not run, and its capacity (--backpressure-ingest, "
            "--backpressure-capacity)",
        ),
    ]
}
