"""One exception type for every user-facing error: the CLI prints its message on one line."""


class VeridraftError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
