"""A Trio agent for z4j brains: stream events, answer commands.

The public face is `Agent`; its module, `z4j.agent._agent`, documents the
delivery guarantees and the reconnect policy. The underscore modules are
internal and may change without notice: `_spool` (events until acked,
sans-IO), `_backoff` (when to reconnect, sans-IO), `_commands` (handlers,
dedupe, results), `_session` (one connection's nursery and tasks).
"""

from ._agent import MAX_EVENT_BYTES as MAX_EVENT_BYTES
from ._agent import Agent as Agent
from ._agent import AgentStatistics as AgentStatistics
from ._agent import Backoff as Backoff
from ._agent import CommandHandler as CommandHandler
from ._agent import SpoolFull as SpoolFull

__all__ = ["Agent", "AgentStatistics", "Backoff", "CommandHandler", "SpoolFull"]

# Show the public names where users import them (trio's fixup_module_metadata):
# tracebacks and reprs read `z4j.agent.SpoolFull`, as before the package split.
for _obj in (Agent, AgentStatistics, Backoff, SpoolFull):
    _obj.__module__ = __name__
del _obj
