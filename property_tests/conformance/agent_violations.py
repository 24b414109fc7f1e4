"""The agent frames a brain must refuse, by the rule that says so.

`ON_OPEN` breaks a live connection: each entry builds the offending
message(s) with the session's signer and names the close codes allowed.
`ON_HELLO` breaks the handshake of a new connection. The state machine
picks one entry per step; the entry's name is what the transcript shows.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Callable
from typing import Any, Final

import attrs

from .agent_wire import Signer, iso_now, sign
from .target import AgentTarget

__all__ = [
    "ON_HELLO",
    "ON_OPEN",
    "Refusal",
    "Violating",
    "hello_frame",
    "hello_message",
    "violations_for",
]

# What ``build(signer, max_frame_size)`` returns: one frame (dict), raw
# bytes, or a list of them to send back to back.
Build = Callable[[Signer, int], Any]


@attrs.frozen
class Violating:
    rule: str
    how: str
    codes: frozenset[int]
    build: Build


def _heartbeat(signer: Signer, buffer_size: int = 0) -> dict[str, Any]:
    return signer.frame("heartbeat", {"buffer_size": buffer_size, "dropped_events": 0})


def _signature(how: str) -> Build:
    def build(signer: Signer, _: int) -> dict[str, Any]:
        frame = _heartbeat(signer)
        if how == "no hmac":
            del frame["hmac"]
        elif how == "empty hmac":
            frame["hmac"] = ""
        elif how == "signed with another key":
            frame["hmac"] = sign(frame, secrets.token_bytes(32), signer.binding)
        elif how == "signed for another session":
            other = attrs.evolve(signer.binding, session_id=secrets.token_hex(8))
            frame["hmac"] = sign(frame, signer.key, other)
        else:  # changed after signing
            frame["payload"]["buffer_size"] = 1
        return frame

    return build


def _replay(how: str) -> Build:
    """A valid heartbeat, then one that replays or bends its replay fields."""

    def build(signer: Signer, _: int) -> list[dict[str, Any]]:
        first = _heartbeat(signer)
        frame = _heartbeat(signer, 1)
        if how == "seq repeated":
            frame["seq"] = first["seq"]
        elif how == "seq lower":
            frame["seq"] = first["seq"] - 1
        elif how == "nonce reused":
            frame["nonce"] = first["nonce"]
        elif how == "ts 2 min old":
            frame["ts"] = iso_now(-120)
        elif how == "ts 2 min ahead":
            frame["ts"] = iso_now(120)
        else:  # ts without a zone
            frame["ts"] = iso_now().removesuffix("Z")
        return [first, signer.resign(frame)]

    return build


def _oversize(signer: Signer, limit: int) -> bytes:
    """A valid heartbeat padded to one byte over max_frame_size_bytes."""
    frame = signer.frame("heartbeat", {"buffer_size": 0, "dropped_events": 0}, extra={"x_pad": ""})
    frame["x_pad"] = "x" * (limit + 1 - len(_dumps(frame)))
    return _dumps(signer.resign(frame))


def _unexpected(how: str) -> Build:
    def build(signer: Signer, _: int) -> Any:
        if how == "a second hello":
            return hello_frame("again")
        if how == "command from an agent":
            return signer.frame("command", {"action": "x", "timeout_seconds": 60})
        if how == "event_batch_ack from an agent":
            payload = {"acked_id": "x", "received": 0, "accepted": 0, "rejected": 0}
            return signer.frame("event_batch_ack", payload)
        return signer.frame("x_unknown_type", {})

    return build


def _bad_frame(how: str) -> Build:
    def build(signer: Signer, _: int) -> Any:
        if how == "not JSON":
            return b"{not json"
        if how == "invalid UTF-8":
            return b'{"type":"heartbeat","x":"\xff"}'
        if how == "a JSON array":
            return b'[{"type":"heartbeat"}]'
        if how == "no type":
            frame = _heartbeat(signer)
            del frame["type"]
            return signer.resign(frame)
        if how == "NaN":
            return b'{"v":2,"type":"heartbeat","payload":{"buffer_size":NaN}}'
        if how == "an event without id":
            return signer.frame("event_batch", {"events": [{"kind": "k"}]})
        if how == "events not a list":
            return signer.frame("event_batch", {"events": "none"})
        return signer.frame("heartbeat", {"buffer_size": "0"})  # a string for an integer

    return build


def _v1(signer: Signer, _: int) -> dict[str, Any]:
    frame = _heartbeat(signer)
    frame["v"] = 1
    return signer.resign(frame)


_SIGNATURE = ["no hmac", "empty hmac", "signed with another key", "signed for another session",
              "changed after signing"]  # fmt: skip
_REPLAY = ["seq repeated", "seq lower", "nonce reused", "ts 2 min old", "ts 2 min ahead",
           "ts without a zone"]  # fmt: skip
_UNEXPECTED = ["command from an agent", "event_batch_ack from an agent", "a second hello",
               "an unknown type"]  # fmt: skip
_BAD_FRAME = ["not JSON", "invalid UTF-8", "a JSON array", "no type", "NaN", "an event without id",
              "events not a list", "a string for an integer"]  # fmt: skip


def _entries() -> list[Violating]:
    def every(
        rule: str, code: int, variants: list[str], make: Callable[[str], Build]
    ) -> list[Violating]:
        return [Violating(rule, how, frozenset({code}), make(how)) for how in variants]

    return [
        *every("signature-rejection", 4403, _SIGNATURE, _signature),
        *every("replay-rejection", 4403, _REPLAY, _replay),
        Violating("oversize-1009", "one byte too big", frozenset({1009}), _oversize),
        *every("unexpected-frame-1002", 1002, _UNEXPECTED, _unexpected),
        *every("bad-frame-1007", 1007, _BAD_FRAME, _bad_frame),
        Violating("version-4426", "a signed frame with v 1", frozenset({4426}), _v1),
    ]


ON_OPEN: Final = {f"{v.rule}: {v.how}": v for v in _entries()}


def _over_events_rate(rate: int) -> Build:
    """One batch over the events rate.

    Judged on arrival, whatever the brain's speed: no bucket that holds a
    second's worth (``rate`` events) has room for ``rate + 1`` at once. The
    frame rate, which a slowed brain can spread out, is checked apart
    (`checks.check_frame_rate`), against a brain with a low limit.
    """

    def build(signer: Signer, _: int) -> list[dict[str, Any]]:
        events = [{"id": f"rate-{secrets.token_hex(4)}-{i}", "kind": "k"} for i in range(rate + 1)]
        return [signer.frame("event_batch", {"events": events})]

    return build


@functools.cache
def violations_for(target: AgentTarget) -> dict[str, Violating]:
    """`ON_OPEN`, plus the events rate limit when the target told us one we can exceed."""
    found = dict(ON_OPEN)
    rate = target.events_per_second
    # One batch holds at most 5000 events; a higher rate is out of reach here.
    if rate is not None and rate < 5000:
        entry = Violating(
            "rate-limit-4429", "over the events rate", frozenset({4429}), _over_events_rate(rate)
        )
        found[f"{entry.rule}: {entry.how}"] = entry
    return found


@attrs.frozen
class Refusal:
    """A connection the brain must not open: what to send first, what it may answer."""

    rule: str
    how: str
    first: Callable[[str], bytes]  # worker name -> first message
    token: str | None = None  # None: the agent's own token
    answers: frozenset[int] = frozenset()  # close codes
    http: frozenset[int] = frozenset()  # or HTTP statuses refusing the upgrade


def hello_frame(
    worker: str | None, *, version: str = "2", extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A hello as z4j agents send it (unsigned, ``ts`` null)."""
    payload: dict[str, Any] = {
        "protocol_version": version,
        "agent_version": "conformance",
        "framework": "conformance",
        "engines": [],
        "schedulers": [],
        "capabilities": {},
        "host": {"name": "conformance"},
        "worker_id": worker,
        "worker_role": None,
        "worker_pid": 1,
        "worker_started_at": iso_now(),
        **(extra or {}),
    }
    return {
        "v": 2,
        "id": f"hello-{secrets.token_hex(4)}",
        "ts": None,
        "type": "hello",
        "payload": payload,
    }


def hello_message(worker: str | None, **kwargs: Any) -> bytes:
    return _dumps(hello_frame(worker, **kwargs))


def _before_hello(kind: str) -> Callable[[str], bytes]:
    def first(_: str) -> bytes:
        frame = {"v": 2, "id": "x-1", "ts": iso_now(), "nonce": "n", "seq": 1, "type": kind}
        frame["payload"] = {"events": []} if kind == "event_batch" else {}
        return _dumps(frame)

    return first


def _hello_version(version: str) -> Callable[[str], bytes]:
    return lambda worker: hello_message(worker, version=version)


ON_HELLO: Final = {
    f"{r.rule}: {r.how}": r
    for r in [
        Refusal(
            "bad-token-refused",
            "an unknown token",
            hello_message,
            token="z4j_" + "A" * 43,
            answers=frozenset({4401, 4403}),
            http=frozenset({401, 403}),
        ),
        Refusal(
            "unexpected-frame-1002",
            "a heartbeat before hello",
            _before_hello("heartbeat"),
            answers=frozenset({1002}),
        ),
        Refusal(
            "unexpected-frame-1002",
            "an event_batch before hello",
            _before_hello("event_batch"),
            answers=frozenset({1002}),
        ),
        *[
            Refusal(
                "version-4426",
                f"hello with protocol_version {v!r}",
                _hello_version(v),
                answers=frozenset({4426}),
            )
            for v in ["1", "3", "2.0"]
        ],
    ]
}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
