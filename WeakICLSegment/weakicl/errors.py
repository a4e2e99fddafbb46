"""Errors a user can cause and fix; the command line turns them into exit code 2 with one line."""


class WeakICLError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class InputError(WeakICLError):
    """An image, prompt or option that cannot be used as given."""


class WeightsError(WeakICLError):
    """Model weights that are missing, corrupt or do not match their model card."""


class Cancelled(WeakICLError):
    """Raised by a progress callback to stop a long computation; nothing is written."""
