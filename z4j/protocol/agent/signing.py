"""Frame signing for agent protocol v2: canonical JSON and HMAC-SHA256.

What is signed is the frame *as received* (decoded JSON object), minus its
``hmac`` key, plus the session binding (``agent_id``, ``project_id``,
``session_id`` as top-level keys), serialised as canonical JSON: sorted keys
at every level, compact separators, UTF-8 without ASCII escaping, no NaN.
Verifying over the received object, never a re-serialised model, is what
keeps unknown fields (which we ignore) from breaking signatures.

Keys are per project, derived from the brain's master secret, so the master
never leaves the brain and one project's key forges nothing in another.

Speed: the canonical form is the standard library's ``json.dumps`` (what
z4j-core signs with), but orjson is several times faster. orjson writes the
same bytes for every JSON value except floats (``1e-07`` against ``1e-7``)
and integers beyond 64 bits (which it refuses); the property tests pin that.
So we sign with orjson unless the frame holds a float orjson writes otherwise,
and verify with orjson first, falling back to the standard form when that
does not match: a frame the agent signed always verifies, and the common
frame costs the fast path.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import math
import re
import uuid
from collections.abc import Mapping
from typing import Any

import attrs
import orjson

from ..close import CloseCode
from ..errors import RemoteProtocolError

__all__ = [
    "SessionBinding",
    "canonical_json",
    "decode_secret",
    "derive_project_secret",
    "encode_secret",
    "fast_canonical_json",
    "needs_reference_form",
    "sign",
    "verify",
]

_DERIVATION_LABEL = b"z4j-project-secret-v1:"
_MIN_SECRET = 32
_URLSAFE = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")


@attrs.frozen(kw_only=True)
class SessionBinding:
    """The session a signature is bound to; strings exactly as in hello_ack."""

    agent_id: str
    project_id: str
    session_id: str


def canonical_json(obj: Any) -> bytes:
    """The reference canonical form (z4j-core's): what signatures are over."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def fast_canonical_json(obj: Any) -> bytes:
    """`canonical_json` by orjson: the same bytes unless ``obj`` holds a float
    or an integer beyond 64 bits (which raises TypeError)."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def needs_reference_form(value: object) -> bool:
    """Whether a JSON value holds a float orjson writes otherwise than the standard
    library (``1e-07`` against ``1e-7``), or one that is not finite (which the
    reference form refuses). Most floats, ``12.345`` say, read the same."""
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list | tuple):
        return isinstance(value, float) and _float_differs(value)
    for item in value:
        if isinstance(item, float):
            if _float_differs(item):
                return True
        elif isinstance(item, dict | list | tuple) and needs_reference_form(item):
            return True
    return False


def _float_differs(value: float) -> bool:
    return not math.isfinite(value) or orjson.dumps(value) != repr(value).encode()


def derive_project_secret(master: bytes, project_id: uuid.UUID, generation: int = 0) -> bytes:
    """HMAC-SHA256(master, label + project_id.bytes_le): the project's 32-byte key.

    A rotated secret is of a later ``generation``, which is appended to the
    message as 4 big-endian bytes; generation 0 is the key of before rotation.
    """
    if len(master) < _MIN_SECRET:
        raise ValueError(f"the master secret must be at least {_MIN_SECRET} bytes")
    if not 0 <= generation < 2**31:
        raise ValueError(f"a secret generation is from 0 to 2**31 - 1, not {generation}")
    message = _DERIVATION_LABEL + project_id.bytes_le
    if generation:
        message += generation.to_bytes(4, "big")
    return hmac.new(master, message, hashlib.sha256).digest()


def encode_secret(secret: bytes) -> str:
    """The form agents are given: URL-safe base64 (with padding)."""
    return base64.urlsafe_b64encode(secret).decode("ascii")


def decode_secret(text: str) -> bytes:
    """Read a project secret as agents do: URL-safe base64, padding optional."""
    text = text.strip()
    if not text or not _URLSAFE.match(text):
        raise ValueError("a project secret is URL-safe base64 (A-Z a-z 0-9 - _)")
    try:
        secret = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64: {exc}") from None
    if len(secret) < _MIN_SECRET:
        raise ValueError(f"a project secret decodes to at least {_MIN_SECRET} bytes")
    return secret


def _signed_body(frame: Mapping[str, Any], binding: SessionBinding) -> dict[str, Any]:
    body = {k: v for k, v in frame.items() if k != "hmac"}
    body["agent_id"] = binding.agent_id
    body["project_id"] = binding.project_id
    body["session_id"] = binding.session_id
    return body


# hashlib lets go of the GIL while it hashes 2048 bytes or more at once;
# getting it back behind busy threads (drains, the buffer's writer) costs far
# more than hashing a frame, so we feed it less at a time.
_GIL_FREE_HASH_BYTES = 2047


def _hmac_hex(key: bytes, data: bytes) -> str:
    if len(data) <= _GIL_FREE_HASH_BYTES:
        return hmac.new(key, data, hashlib.sha256).hexdigest()
    mac = hmac.new(key, digestmod=hashlib.sha256)
    view = memoryview(data)
    for start in range(0, len(data), _GIL_FREE_HASH_BYTES):
        mac.update(view[start : start + _GIL_FREE_HASH_BYTES])
    return mac.hexdigest()


def sign(
    frame: Mapping[str, Any], key: bytes, binding: SessionBinding, *, float_free: bool = False
) -> str:
    """The lowercase hex HMAC of ``frame`` (its ``hmac`` key, if any, is left out).

    ``float_free``: the caller knows the frame holds no float (our own acks),
    so the check for one is skipped.
    """
    body = _signed_body(frame, binding)
    if float_free or not needs_reference_form(body):
        try:
            return _hmac_hex(key, fast_canonical_json(body))
        except TypeError:  # an integer beyond 64 bits: the reference form below
            pass
    return _hmac_hex(key, canonical_json(body))


def verify(frame: Mapping[str, Any], key: bytes, binding: SessionBinding) -> None:
    """Check ``frame["hmac"]``; raise `RemoteProtocolError` (4403) if it is wrong."""
    provided = frame.get("hmac")
    if not isinstance(provided, str) or not provided:
        raise RemoteProtocolError(
            "frame is not signed", reason="unsigned", close_code=CloseCode.FORBIDDEN
        )
    body = _signed_body(frame, binding)
    with contextlib.suppress(TypeError):
        if _matches(provided, _hmac_hex(key, fast_canonical_json(body))):
            return
    try:
        expected = _hmac_hex(key, canonical_json(body))
    except (TypeError, ValueError) as exc:  # NaN, unserialisable values
        raise RemoteProtocolError(
            f"frame cannot be canonicalised: {exc}",
            reason="bad_signature",
            close_code=CloseCode.FORBIDDEN,
        ) from None
    if not _matches(provided, expected):
        raise RemoteProtocolError(
            "frame signature does not match", reason="bad_signature", close_code=CloseCode.FORBIDDEN
        )


def _matches(provided: str, expected: str) -> bool:
    return len(provided) == len(expected) and hmac.compare_digest(provided, expected)
