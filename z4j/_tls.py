"""The brain's server-side TLS context, from Z4J_TLS_CERT_FILE and Z4J_TLS_KEY_FILE.

One pair of files serves both ports: HTTPS/WSS on the HTTP port (which
advertises ALPN ``http/1.1``) and TLS on the ingest port (no ALPN: ingest
clients, NightOwl's among them, offer none). Here, not in either server,
because neither server may import the other.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from .config import Config, ConfigError

__all__ = ["server_tls_context"]


def server_tls_context(config: Config, *, alpn: Sequence[str] = ()) -> ssl.SSLContext | None:
    """A TLS 1.2+ server context with the configured chain and key; None without them.

    Raises `ConfigError` naming both settings when only one is set or the
    files do not load, so a brain refuses to start rather than serve plain.
    """
    if config.tls_cert_file is None and config.tls_key_file is None:
        return None
    if config.tls_cert_file is None or config.tls_key_file is None:
        raise ConfigError(
            "Z4J_TLS_CERT_FILE and Z4J_TLS_KEY_FILE go together: set both (HTTPS and WSS "
            "on the HTTP port, TLS on the ingest port) or neither"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        context.set_alpn_protocols(list(alpn))
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"Z4J_TLS_CERT_FILE={config.tls_cert_file}, Z4J_TLS_KEY_FILE={config.tls_key_file}: "
            f"cannot load the certificate and key: {exc}"
        ) from None
    return context
