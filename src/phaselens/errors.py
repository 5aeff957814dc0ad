"""Errors phaselens raises for bad input; each message names the key or file at fault."""


class PhaselensError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class ConfigError(PhaselensError, ValueError):
    """A configuration key is unknown, has the wrong type, or describes an impossible shape."""


class CheckpointError(PhaselensError):
    """A checkpoint is missing, corrupt, truncated, or does not match the model."""


class RunError(PhaselensError):
    """A run directory is missing or malformed."""


class StoreError(RunError):
    """A run's metrics.sqlite is missing or damaged."""


class TrainingDiverged(PhaselensError):
    """The loss became NaN or infinite."""
