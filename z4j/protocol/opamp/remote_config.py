"""A remote configuration, its hash, and how far an agent got in applying it.

OpAMP leaves the hash to the server: the agent only stores it and sends it
back in ``RemoteConfigStatus.last_remote_config_hash``. Ours must not depend
on how the files were listed, or a configuration saved twice would look new
and be pushed again to every agent: `config_hash` sorts the files by name
and length-prefixes every field, so no two different configurations can
feed SHA-256 the same bytes. The leading tag names the scheme, so that a
future scheme cannot collide with this one.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from typing import Final

import attrs

from . import opamp_pb2 as pb

__all__ = [
    "ConfigFile",
    "ConfigProgress",
    "RemoteConfig",
    "config_hash",
    "progress",
]

_HASH_TAG: Final = b"z4j.opamp.config_hash.v1\x00"


@attrs.frozen(kw_only=True)
class ConfigFile:
    """One named file of a configuration: raw bytes and an optional MIME type."""

    body: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))
    content_type: str = attrs.field(default="", validator=attrs.validators.instance_of(str))


def _sorted_files(files: Mapping[str, ConfigFile]) -> tuple[tuple[str, ConfigFile], ...]:
    for name, file in files.items():
        if not isinstance(name, str) or not isinstance(file, ConfigFile):
            raise TypeError(f"files maps names to ConfigFile, not {name!r}: {file!r}")
    return tuple(sorted(files.items()))


def config_hash(files: Mapping[str, ConfigFile]) -> bytes:
    """SHA-256 (32 bytes) of the files, whatever order they are given in."""
    digest = hashlib.sha256(_HASH_TAG)
    for name, file in _sorted_files(files):
        for field in (name.encode(), file.content_type.encode(), file.body):
            digest.update(len(field).to_bytes(8, "big"))
            digest.update(field)
    return digest.digest()


@attrs.frozen
class RemoteConfig:
    """A configuration to offer agents: files by name, and their `config_hash`.

    With a single file its name may be empty, as OpAMP allows.
    """

    files: tuple[tuple[str, ConfigFile], ...] = attrs.field(converter=_sorted_files)
    hash: bytes = attrs.field(init=False)

    @hash.default
    def _hash(self) -> bytes:
        return config_hash(dict(self.files))

    def to_message(self) -> pb.AgentRemoteConfig:
        """The ``ServerToAgent.remote_config`` offering it."""
        message = pb.AgentRemoteConfig(config_hash=self.hash)
        for name, file in self.files:
            entry = message.config.config_map[name]
            entry.body = file.body
            entry.content_type = file.content_type
        return message


class ConfigProgress(enum.Enum):
    """Where one agent is with one configuration, from what it last reported."""

    PENDING = "pending"  # it has not reported this hash yet
    APPLYING = "applying"
    APPLIED = "applied"
    FAILED = "failed"  # its error_message says why


_PROGRESS: Final = {
    pb.RemoteConfigStatus.STATUS_APPLYING: ConfigProgress.APPLYING,
    pb.RemoteConfigStatus.STATUS_APPLIED: ConfigProgress.APPLIED,
    pb.RemoteConfigStatus.STATUS_FAILED: ConfigProgress.FAILED,
}


def progress(reported: pb.RemoteConfigStatus | None, config_hash: bytes) -> ConfigProgress:
    """How far the agent got with the configuration hashed ``config_hash``.

    A status about another hash says nothing about this one: still pending.
    """
    if reported is None or reported.last_remote_config_hash != config_hash:
        return ConfigProgress.PENDING
    return _PROGRESS.get(reported.status, ConfigProgress.PENDING)
