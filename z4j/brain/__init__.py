"""The server: every service of a brain, and the root that assembles them.

Internal. Nothing here is public interface except what ``z4j`` re-exports
(`serve_brain`, `Brain`); module names and signatures may change between
releases. The public surface is ``z4j``, ``z4j.agent``, ``z4j.ingest`` and
``z4j.testing`` (pinned by tests/test_exports.py).

What lives where (docs/architecture.md draws it):

- ``_root``: the composition root. Builds every service, nests their
  nurseries, reports a `Brain`. It only assembles.
- ``links``: the small objects services share, so no service holds another.
- one module per service, each with ``serve(..., *, shutdown, task_status)``:
  ``ingest`` (TCP ingest port), ``agents`` (``/ws/agent``), ``commands``,
  ``registry`` (sessions across replicas), ``drain``, ``heartbeat``,
  ``maintenance``; and ``dashboard_hub`` (``/ws/dashboard``), an endpoint
  the HTTP server hands connections to, with no tasks of its own.
- ``http/``: the HTTP port (``server``, ``websocket``) and the application it
  serves (``api``, ``auth``, ``openapi``, ``resources``, ``dashboard_page``).
- ``metrics`` and ``ratelimit``: what the services count and how they throttle.
"""

from ._root import Brain as Brain
from ._root import serve_brain as serve_brain

__all__ = ["Brain", "serve_brain"]
