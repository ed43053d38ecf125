"""fedweights: federated, privacy-preserving weight exchange on Flower."""

from .config import RunConfig, load_config
from .errors import ConfigError, RunFailed, UserError
from .flower.round_loop import RunResult
from .flower.simulation import simulate
from .task import Task

__version__ = "0.1.0"

__all__ = ["ConfigError", "RunConfig", "RunFailed", "RunResult", "Task", "UserError", "load_config", "simulate"]
