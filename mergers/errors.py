"""Errors in domain terms: each names the file, key or value at fault.

The UI shows ``str(error)``; the CLI prints it and exits non-zero. Nothing else
should escape from the library, so callers catch :class:`MergeError` alone.
"""


class MergeError(Exception):
    """Base of every error this package raises on purpose."""


class CheckpointError(MergeError):
    """A checkpoint file cannot be read: missing, truncated, bad header, bad data."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint would need to run code to load."""


class ArchitectureError(MergeError):
    """The models' architecture is unknown, unsupported, or the inputs do not match."""


class WeightsError(MergeError, ValueError):
    """A block-weight string (numbers, preset name or readable form) is invalid."""


class RecipeError(MergeError, ValueError):
    """A recipe field is missing or invalid."""


class OutputError(MergeError):
    """The output cannot be written where asked (exists, is an input, disk full)."""


class MergeCancelled(MergeError):
    """The merge was stopped by its cancel token."""


class NonFiniteError(MergeError):
    """A merged key holds NaN or Inf; the message names the key, the method and where it came from."""

    def __init__(self, message: str, *, key: str = "", method: str = ""):
        super().__init__(message)
        self.key = key
        self.method = method
