"""The close-code table: wire values, their classification, and one home.

The values are the wire (docs/agent-protocol.md, "Close codes"): renumbering
a member breaks every deployed agent, so they are spelled out here again.
The classification is what docs/agents.md promises about backoff.
"""

from __future__ import annotations

import tokenize
from pathlib import Path

import pytest

from z4j.protocol.close import CLOSINGS, CloseCode, Fault, Retry, retry_after

Z4J = Path(__file__).resolve().parent.parent / "z4j"
HOME = Z4J / "protocol" / "close.py"

T, A, X = Retry.TRANSIENT, Retry.AUTH, Retry.INCOMPATIBLE
N, P, L = Fault.NONE, Fault.PEER, Fault.LOCAL

# name: (value, retry after it, retry in the handshake, fault)
PINNED = {
    "NORMAL": (1000, T, T, N),
    "GOING_AWAY": (1001, T, T, N),
    "PROTOCOL_ERROR": (1002, T, T, P),
    "UNSUPPORTED_DATA": (1003, T, T, P),
    "ABNORMAL": (1006, T, T, N),
    "INVALID_DATA": (1007, T, T, P),
    "POLICY_VIOLATION": (1008, T, T, P),
    "TOO_LARGE": (1009, T, T, P),
    "INTERNAL_ERROR": (1011, T, T, L),
    "TRY_AGAIN_LATER": (1013, T, T, L),
    "REPLACED": (4002, T, T, N),
    "REVOKED": (4003, A, A, P),
    "UNAUTHORIZED": (4401, A, A, P),
    "FORBIDDEN": (4403, T, A, P),
    "IDLE": (4408, T, T, P),
    "VERSION": (4426, X, X, P),
    "VERSION_UNSUPPORTED": (4427, X, X, P),
    "RATE_LIMITED": (4429, T, T, P),
}


def test_values_and_classification_are_pinned() -> None:
    assert {m.name: m.value for m in CloseCode} == {k: v[0] for k, v in PINNED.items()}
    for name, (value, retry, in_handshake, fault) in PINNED.items():
        code = CloseCode[name]
        assert retry_after(value, handshake=False) is retry, name
        assert retry_after(value, handshake=True) is in_handshake, name
        assert CLOSINGS[code].fault is fault, name


def test_every_member_has_one_row_with_a_meaning() -> None:
    assert list(CLOSINGS) == sorted(CloseCode)
    assert all(closing.meaning for closing in CLOSINGS.values())


@pytest.mark.parametrize("code", [1004, 1012, 3000, 4000, 4999])
def test_an_unknown_code_is_transient(code: int) -> None:
    assert retry_after(code, handshake=True) is Retry.TRANSIENT
    assert retry_after(code, handshake=False) is Retry.TRANSIENT


def _numbers(path: Path) -> list[tuple[int, int, str]]:
    """(line, value, line text) of each integer literal in ``path``'s code."""
    found = []
    with path.open("rb") as source:
        for token in tokenize.tokenize(source.readline):
            if token.type == tokenize.NUMBER and token.string.isdigit():
                found.append((token.start[0], int(token.string), token.line))
    return found


def test_no_bare_close_code_is_left_in_z4j() -> None:
    """Code names close codes through `CloseCode`; prose may keep the numbers.

    Comments, docstrings and log text are not NUMBER tokens. 1000 is also
    milliseconds and a descriptor count, so it counts only on a line that
    speaks of a code.
    """
    codes = {int(c) for c in CloseCode}
    bare = []
    for path in sorted(Z4J.rglob("*.py")):
        if path == HOME:
            continue
        for line, value, text in _numbers(path):
            if value in codes and (value != CloseCode.NORMAL or "code" in text.lower()):
                bare.append(f"{path.relative_to(Z4J.parent)}:{line}: {text.strip()}")
    assert bare == []


def test_the_literal_check_sees_code_not_prose(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text('"""Closed 4408."""\nsession.kick(4002)  # 4401\nlog("4429")\n')
    assert [value for _, value, _ in _numbers(source)] == [4002]
