"""Descriptors: take the whole allowance, then give each port a share of it.

Every connection holds a descriptor. Left to themselves, a flood on one port
takes them all (EMFILE), and the other port, the buffer file, the store and
the log stop working with it. So at start the soft RLIMIT_NOFILE goes up to
the hard limit, a reserve stays aside for everything that is not a
connection, and each listener's cap is lowered, if need be, to fit what is
left: a port at its cap refuses its own clients, never the other port's.
"""

from __future__ import annotations

import logging
import resource

import attrs

from ._net import REFUSAL_SLOTS
from .config import Config

__all__ = ["fit_connection_caps", "raise_nofile_limit", "with_descriptor_caps"]

log = logging.getLogger("z4j.brain")

RESERVE_FRACTION = 0.10
# Buffer and store files (with their WAL), listeners, Trio's wakeup pipe,
# log files, the CLI's standard streams, and a margin; plus one per pooled
# Postgres connection.
RESERVE_MIN = 64
# A cap below this after fitting is worth a warning.
LOW_CAP = 1000


def raise_nofile_limit() -> int | None:
    """Raise the soft descriptor limit to the hard one; the limit now, None if unlimited."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return None if soft == resource.RLIM_INFINITY else soft


def fit_connection_caps(config: Config, limit: int) -> Config:
    """``config`` with connection caps that fit ``limit`` descriptors, reserve kept.

    A port that asks for less than an even split leaves the rest to the
    other; each cap also leaves room for `REFUSAL_SLOTS` being refused.
    """
    reserve = max(int(limit * RESERVE_FRACTION), RESERVE_MIN + config.db_pool_size)
    left = max(2, limit - reserve - 2 * REFUSAL_SLOTS)
    http, ingest = config.http_max_connections, config.ingest_max_connections
    if http + ingest <= left:
        return config
    http_cap = max(1, min(http, max(left // 2, left - ingest)))
    ingest_cap = max(1, min(ingest, left - http_cap))
    return attrs.evolve(config, http_max_connections=http_cap, ingest_max_connections=ingest_cap)


def with_descriptor_caps(config: Config) -> Config:
    """Raise the limit and fit the caps to it, saying so when they were lowered."""
    limit = raise_nofile_limit()
    if limit is None:
        return config
    fitted = fit_connection_caps(config, limit)
    if fitted != config:
        # Common limits (20,000; 65,536) lower the 10,000-each defaults a
        # little: worth a line, not an alarm. A low limit is one.
        low = min(fitted.http_max_connections, fitted.ingest_max_connections) < LOW_CAP
        log.log(
            logging.WARNING if low else logging.INFO,
            "descriptor limit %d: connection caps lowered to fit it with a reserve: "
            "http %d (Z4J_HTTP_MAX_CONNECTIONS=%d), ingest %d (Z4J_INGEST_MAX_CONNECTIONS=%d); "
            "raise the hard limit (ulimit -Hn, LimitNOFILE=) to serve more",
            limit,
            fitted.http_max_connections,
            config.http_max_connections,
            fitted.ingest_max_connections,
            config.ingest_max_connections,
        )
    return fitted
