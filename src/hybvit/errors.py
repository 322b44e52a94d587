"""The one exception type for bad input: the CLI prints its message on one line and exits with status 2."""


class HybvitError(Exception):
    """A user-facing error whose message names the problem and the fix."""
