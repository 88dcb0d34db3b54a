"""The one exception type for bad input: the CLI prints its message as one line and exits 2."""


class RebaseError(Exception):
    """Bad input or an unusable environment, with a message that says what is wrong and what to do."""
