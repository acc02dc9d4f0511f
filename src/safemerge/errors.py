"""One exception type for every user-facing problem, so the CLI can print it as a single line."""


class SafeMergeError(Exception):
    """A problem with the user's input (a file, a config, a model) that names what is wrong."""
