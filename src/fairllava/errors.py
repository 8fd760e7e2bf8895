"""One exception type for user errors: the CLI prints its message on one line and exits 2."""


class FairllavaError(ValueError):
    """A problem with the user's input (file, row, config, argument) — never a bug in fairllava."""
