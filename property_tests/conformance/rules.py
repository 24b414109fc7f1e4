"""The rules the suite checks, by name: one per behaviour of the protocol pages.

A `Violation` names the rule it breaks, the CLI reports per rule, and the
bite tests break one behaviour each and expect its rule to fail. The
"page" is where the behaviour is written down: docs/agent-protocol.md and
docs/ingest-protocol.md (which follow /shared/design/PROTOCOL-*.md).
"""

from __future__ import annotations

from typing import Final

import attrs

__all__ = ["RULES", "Rule"]


@attrs.frozen(kw_only=True)
class Rule:
    name: str
    protocol: str  # "agent" or "ingest"
    checks: str
    page: str  # the section of the protocol page that says so
    needs: str = ""  # what the target must provide, if anything


_AGENT = "docs/agent-protocol.md"
_INGEST = "docs/ingest-protocol.md"

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
