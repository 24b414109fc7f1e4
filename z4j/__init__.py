"""z4j: a Trio-native control plane and telemetry pipeline for Python services.

Run a brain inside a Trio program::

    brain = await nursery.start(z4j.serve_brain, z4j.Config())
    await brain.commands.send(agent_id, "schedule.resync")

The names below are imported on first use (PEP 562), so ``z4j --version``
and ``z4j send`` do not pay for the whole brain (Trio, Hypercorn, psycopg):
they started in about 0.1 s instead of 1.4 s.
"""

import importlib as _importlib
import typing as _typing

from ._version import __version__ as __version__

if _typing.TYPE_CHECKING:
    from .brain import Brain as Brain
    from .brain import serve_brain as serve_brain
    from .brain.links import CommandError as CommandError
    from .config import Config as Config
    from .config import ConfigError as ConfigError
    from .config import load_config as load_config
    from .stats import BrainStats as BrainStats

__all__ = [
    "Brain",
    "BrainStats",
    "CommandError",
    "Config",
    "ConfigError",
    "__version__",
    "load_config",
    "serve_brain",
]

# Each public name and the module it lives in.
_HOMES = {
    "Brain": ".brain",
    "serve_brain": ".brain",
    "CommandError": ".brain.links",
    "Config": ".config",
    "ConfigError": ".config",
    "load_config": ".config",
    "BrainStats": ".stats",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'z4j' has no attribute {name!r}")
    value = getattr(_importlib.import_module(home, __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
