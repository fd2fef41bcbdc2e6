"""The one exception type the CLI turns into a single clean line on stderr."""


class UserError(Exception):
    """Bad input: a missing file, a corrupt checkpoint, a shape that does not fit, a bad flag value."""
