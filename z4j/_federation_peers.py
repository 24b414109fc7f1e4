"""The peer regions a hub federates: their names, base URLs and tokens.

``Z4J_FEDERATION_PEERS`` names the peers and where they are
(``east=https://east.example:7700,west=https://west.example:7700``): no
secret, so it may sit in the environment, a unit file or ``z4j config``'s
output. The tokens live in ``Z4J_FEDERATION_PEERS_FILE``, a TOML file
(keep it 0600) with a table per peer::

    [east]
    token = "z4j_fed_..."              # from `z4j federation token create` on east
    ca = "/etc/z4j/east-ca.pem"        # optional: trust this CA (self-signed tests)
    url = "https://east.example:7700"  # optional: instead of Z4J_FEDERATION_PEERS

Why a file: an environment is readable far more widely than a file of
mode 0600 (``/proc/PID/environ`` to the same user, ``docker inspect``,
crash reports, the supervisor handing its children every Z4J_* variable),
and a token is replaced by editing one file. The tokens never enter
`Config`, so ``z4j config`` cannot print them, and `Peer`'s repr leaves
the token out, so no log line can carry it.

Kept free of the brain's imports: config.py checks the peer list with it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import attrs

if TYPE_CHECKING:
    from .config import Config

__all__ = ["REGION_NAME", "Peer", "check_region_name", "load_peers", "parse_peer_list"]

# A region's name: in URLs, labels and confirmations, so short and plain.
REGION_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@attrs.frozen(kw_only=True)
class Peer:
    """One peer region: its name, base URL (no trailing slash), token and CA file."""

    name: str
    url: str
    token: str = attrs.field(repr=False)
    ca: Path | None = None


def check_region_name(name: str) -> str:
    if not REGION_NAME.fullmatch(name):
        raise ValueError(
            f"a region name is 1 to 63 letters, digits, '_', '.' or '-' (starting with a "
            f"letter or digit), not {name!r}"
        )
    return name


def _check_url(name: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"peer {name}: a base URL like https://host:7700, not {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"peer {name}: the URL takes no query, fragment or credentials")
    try:
        parts.port  # noqa: B018 - a bad port raises here
    except ValueError:
        raise ValueError(f"peer {name}: a bad port in {url!r}") from None
    return url.rstrip("/")


def parse_peer_list(text: str) -> dict[str, str]:
    """``name=URL[,name=URL...]`` as {name: URL}; ValueError says what is wrong."""
    peers: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, url = part.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"each peer is NAME=URL, not {part!r}")
        check_region_name(name)
        if name in peers:
            raise ValueError(f"peer {name} is named twice")
        peers[name] = _check_url(name, url.strip())
    return peers


def load_peers(config: Config) -> tuple[Peer, ...]:
    """The peers of Z4J_FEDERATION_PEERS and Z4J_FEDERATION_PEERS_FILE, each
    with a URL and a token; `ConfigError` names what is missing or wrong."""
    from .config import ConfigError

    try:
        urls = parse_peer_list(config.federation_peers or "")
    except ValueError as exc:
        raise ConfigError(f"Z4J_FEDERATION_PEERS: {exc}") from None
    path = config.federation_peers_file
    tables: dict[str, Any] = {}
    if path is not None:
        where = f"Z4J_FEDERATION_PEERS_FILE={path}"
        try:
            tables = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{where}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    elif urls:
        raise ConfigError(
            "Z4J_FEDERATION_PEERS names peers but Z4J_FEDERATION_PEERS_FILE is unset: "
            "their tokens go in that file (docs/scaling.md)"
        )
    peers = []
    for name in dict.fromkeys([*urls, *tables]):
        where = f"Z4J_FEDERATION_PEERS_FILE={path}"
        table = tables.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        unknown = set(table) - {"token", "ca", "url"}
        if unknown:
            raise ConfigError(f"{where}: [{name}]: unknown keys {sorted(unknown)}")
        try:
            check_region_name(name)
            url = urls.get(name) or table.get("url")
            if not isinstance(url, str):
                raise ValueError(
                    f"peer {name}: no URL (in Z4J_FEDERATION_PEERS, or url in its table)"
                )
            url = _check_url(name, url)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        token = table.get("token")
        if not isinstance(token, str) or not token.startswith("z4j_fed_"):
            raise ConfigError(
                f'{where}: [{name}] needs token = "z4j_fed_..." '
                f"(`z4j federation token create` on {name})"
            )
        ca = table.get("ca")
        if ca is not None and (not isinstance(ca, str) or not Path(ca).is_file()):
            raise ConfigError(f"{where}: [{name}] ca must name a readable PEM file")
        if ca is not None and url.startswith("http://"):
            raise ConfigError(f"{where}: [{name}] has a ca but an http:// URL")
        peers.append(Peer(name=name, url=url, token=token, ca=None if ca is None else Path(ca)))
    if config.region_name in {p.name for p in peers}:
        raise ConfigError(
            f"Z4J_REGION_NAME={config.region_name} is also a peer's name: each region's is its own"
        )
    return tuple(peers)
