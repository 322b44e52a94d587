"""The exception for bad input: the CLI prints its message on one line and exits with status 2 (CannotWrite: the
kind raised where a file or folder cannot be written, which callers with a fallback catch)."""


class HybvitError(Exception):
    """A user-facing error whose message names the problem and the fix."""


class CannotWrite(HybvitError):
    """A file or folder hybvit was asked to create could not be written (a full disk, a read-only place)."""
