"""Errors a user can cause and fix; the command line turns each into one line on stderr and its exit code.

Exit codes (the README's table): 0 success, 1 internal error (a bug), 2 bad input or an output that
exists, 3 the output could not be written (disk full, quota, file-size limit, permissions).
"""


class WeakICLError(Exception):
    """Base of every error caused by the user's input or machine rather than by a bug."""

    exit_code = 2


class InputError(WeakICLError):
    """An image, prompt or option that cannot be used as given."""


class OutputExists(InputError):
    """The output file exists (or appeared during the run, e.g. a concurrent run's) and --overwrite was not given."""


class WriteError(WeakICLError):
    """The output could not be written; any earlier file at that path is unchanged."""

    exit_code = 3


class WeightsError(WeakICLError):
    """Model weights that are missing, corrupt or do not match their model card."""


class Cancelled(WeakICLError):
    """Raised by a progress callback to stop a long computation; nothing is written."""
