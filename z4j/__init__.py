"""z4j: a Trio-native control plane and telemetry pipeline for Python services.

Run a brain inside a Trio program::

    brain = await nursery.start(z4j.serve_brain, z4j.Config())
    await brain.commands.send(agent_id, "schedule.resync")
"""

from ._version import __version__ as __version__
from .brain import Brain as Brain
from .brain import serve_brain as serve_brain
from .brain.links import CommandError as CommandError
from .config import Config as Config
from .config import ConfigError as ConfigError
from .config import load_config as load_config
from .stats import BrainStats as BrainStats
