"""Password hashes: argon2id (argon2-cffi), off the Trio loop and bounded.

A hash costs tens of milliseconds of CPU and `MEMORY_KIB` of memory by
design, so it runs on a worker thread, at most `CONCURRENT_HASHES` at a
time: a burst of sign-ins waits its turn instead of stalling the loop or
taking hundreds of MiB. An unknown account is checked against a dummy hash,
so the answer takes as long whether or not the name exists.
"""

from __future__ import annotations

import functools
from typing import Final

import trio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from .limits import PASSWORD_CHARS

__all__ = [
    "MAX_PASSWORD_CHARS",
    "MIN_PASSWORD_CHARS",
    "check_new_password",
    "hash_password",
    "verify_password",
]

MIN_PASSWORD_CHARS, MAX_PASSWORD_CHARS = PASSWORD_CHARS
MEMORY_KIB: Final = 64 * 1024
CONCURRENT_HASHES: Final = 2

_hasher = PasswordHasher(time_cost=3, memory_cost=MEMORY_KIB, parallelism=1)
_limiter: trio.CapacityLimiter | None = None


def _limit() -> trio.CapacityLimiter:
    global _limiter
    if _limiter is None:
        _limiter = trio.CapacityLimiter(CONCURRENT_HASHES)
    return _limiter


def check_new_password(password: object) -> str | None:
    """Why ``password`` cannot be set (None: it can)."""
    if not isinstance(password, str):
        return "password: a string"
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        return f"password: {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"
    return None


async def hash_password(password: str) -> str:
    return await trio.to_thread.run_sync(_hasher.hash, password, limiter=_limit())


@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash("z4j: no such account")


def _verify(stored: str | None, password: str) -> bool:
    try:
        matched = _hasher.verify(stored if stored is not None else _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return False
    return matched and stored is not None


async def verify_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches the ``stored`` hash (None: an unknown account,
    checked against a dummy hash all the same, and never matching)."""
    if len(password) > MAX_PASSWORD_CHARS:
        return False
    return await trio.to_thread.run_sync(_verify, stored, password, limiter=_limit())
