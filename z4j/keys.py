"""The brain's master secret, agent tokens and project signing keys.

- The master secret (Z4J_SECRET, or a file generated once in the data
  directory) never leaves the brain. Replicas must share it.
- An agent token is shown once, at creation; the store keeps only a keyed
  hash of it (HMAC-SHA256 under the master secret, domain-separated), and
  connections are matched by that hash, never by the plain token.
- A project's signing key is derived from the master secret, the project
  id (agent protocol v2) and its generation (moved on by each rotation), so
  it need not be stored either.
- Admin API tokens, dashboard sessions, OpAMP bearer tokens and federation
  tokens are kept the same way as agent tokens: keyed hashes only, each kind
  under its own label.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import uuid
from pathlib import Path

from ._datadir import private_dir
from .config import Config
from .protocol.agent.signing import derive_project_secret, encode_secret

__all__ = [
    "api_session_hash",
    "api_token_hash",
    "federation_token_hash",
    "master_secret",
    "new_agent_token",
    "new_api_session",
    "new_api_token",
    "new_federation_token",
    "new_opamp_token",
    "new_user_session",
    "new_user_token",
    "opamp_token_hash",
    "project_key",
    "project_secret_text",
    "setup_code",
    "token_hash",
    "user_token_hash",
]

log = logging.getLogger("z4j.keys")

_TOKEN_LABEL = b"z4j-agent-token-v1:"
_API_TOKEN_LABEL = b"z4j-api-token-v1:"
_API_SESSION_LABEL = b"z4j-api-session-v1:"
_OPAMP_TOKEN_LABEL = b"z4j-opamp-token-v1:"
_USER_TOKEN_LABEL = b"z4j-user-token-v1:"
_SETUP_LABEL = b"z4j-setup-v1:"
_FEDERATION_TOKEN_LABEL = b"z4j-federation-token-v1:"
TOKEN_PREFIX = "z4j_"
API_TOKEN_PREFIX = "z4j_admin_"
OPAMP_TOKEN_PREFIX = "z4j_opamp_"
USER_TOKEN_PREFIX = "z4j_pat_"
FEDERATION_TOKEN_PREFIX = "z4j_fed_"
# A user's session id starts so, an admin token's does not: one lookup either way.
USER_SESSION_PREFIX = "u."


def master_secret(config: Config) -> bytes:
    """Z4J_SECRET, or DATA_DIR/secret (created, mode 0600, on first use)."""
    if config.secret is not None:
        return config.secret.encode()
    path = Path(config.data_dir) / "secret"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    private_dir(path.parent)
    value = secrets.token_urlsafe(48).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value + b"\n")
    if config.database_url is not None:
        log.warning(
            "generated a master secret in %s; replicas sharing this database must all use "
            "the same one: set Z4J_SECRET on each",
            path,
        )
    return value


def new_agent_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(master: bytes, token: str) -> bytes:
    """What the store keeps of a token, and what connections are looked up by."""
    return hmac.new(master, _TOKEN_LABEL + token.encode(), hashlib.sha256).digest()


def project_key(master: bytes, project_id: uuid.UUID, generation: int = 0) -> bytes:
    """The project's signing key of that generation (it moves on at each rotation)."""
    return derive_project_secret(master, project_id, generation)


def project_secret_text(master: bytes, project_id: uuid.UUID, generation: int = 0) -> str:
    """The project key as agents are given it (Z4J_HMAC_SECRET for z4j-bare)."""
    return encode_secret(project_key(master, project_id, generation))


def new_api_token() -> str:
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def api_token_hash(master: bytes, token: str) -> bytes:
    return hmac.new(master, _API_TOKEN_LABEL + token.encode(), hashlib.sha256).digest()


def new_api_session() -> str:
    return secrets.token_urlsafe(32)


def api_session_hash(master: bytes, session: str) -> bytes:
    return hmac.new(master, _API_SESSION_LABEL + session.encode(), hashlib.sha256).digest()


def new_opamp_token() -> str:
    return OPAMP_TOKEN_PREFIX + secrets.token_urlsafe(32)


def opamp_token_hash(master: bytes, token: str) -> bytes:
    """What the store keeps of an OpAMP bearer token (its own label: a token of
    one kind never passes for another)."""
    return hmac.new(master, _OPAMP_TOKEN_LABEL + token.encode(), hashlib.sha256).digest()


def new_user_token() -> str:
    """A personal API token (a user's, with a scope)."""
    return USER_TOKEN_PREFIX + secrets.token_urlsafe(32)


def user_token_hash(master: bytes, token: str) -> bytes:
    return hmac.new(master, _USER_TOKEN_LABEL + token.encode(), hashlib.sha256).digest()


def new_federation_token() -> str:
    """A token a peer region's hub reads this region with (`z4j federation token create`)."""
    return FEDERATION_TOKEN_PREFIX + secrets.token_urlsafe(32)


def federation_token_hash(master: bytes, token: str) -> bytes:
    """What the store keeps of a federation token (its own label: it never
    passes for an admin, personal, agent or OpAMP token, nor they for it)."""
    return hmac.new(master, _FEDERATION_TOKEN_LABEL + token.encode(), hashlib.sha256).digest()


def new_user_session() -> str:
    return USER_SESSION_PREFIX + secrets.token_urlsafe(32)


def setup_code(master: bytes) -> str:
    """The first-run setup code: derived, so nothing is stored; it creates the
    first admin and is worth nothing once any user exists."""
    digest = hmac.new(master, _SETUP_LABEL, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
