"""Error types. Every error a user can cause is a HubconvError with a message naming the file, tensor or field."""


class HubconvError(Exception):
    """Base class for errors reported to the user without a traceback."""


class CheckpointError(HubconvError):
    """The source checkpoint is missing, corrupt or not in the expected format."""


class MappingError(HubconvError):
    """A tensor could not be mapped: unknown key, missing key, wrong shape."""


class ModelArgsError(HubconvError):
    """Model hyperparameters are missing or contradict the checkpoint's tensor shapes."""


class OutputError(HubconvError):
    """The output cannot be written (exists, disk full, permissions)."""
