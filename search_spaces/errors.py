"""User-facing errors.

A `UserError` is a mistake in what the user gave (a file, a flag, an architecture): the CLI
prints its message alone and exits with code 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


class SpaceError(UserError):
    """A search-space description that cannot be loaded."""


class ArchitectureError(UserError):
    """An architecture that does not fit its search space."""
