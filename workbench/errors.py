"""User-facing errors.

Every problem with a user's input (config, data file, model folder, checkpoint)
is raised as a :class:`WorkbenchError` with a one-line message that names the
problem. The CLI prints ``error: <message>`` and exits with status 2.
"""


class WorkbenchError(Exception):
    """A problem with the user's input, reported in one line (CLI exit status 2)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force one line


class ConfigError(WorkbenchError):
    """A config key that does not exist, has the wrong type, or is out of range."""


class DataError(WorkbenchError):
    """A data file that is missing, empty, or lacks a required column."""


class CheckpointError(WorkbenchError):
    """A folder that is not a model, or a checkpoint that fails its manifest."""


def warn(message: str, stacklevel: int = 3, logger: str = "workbench") -> None:
    """A problem a reader works around (a skipped checkpoint, an unreadable table): a Python
    warning (the dashboard collects them) and a log line."""
    import logging
    import warnings

    warnings.warn(message, stacklevel=stacklevel)
    logging.getLogger(logger).warning(message)


def first_line(exc: BaseException) -> str:
    """An exception as one line (its type and the first line of its message), for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
