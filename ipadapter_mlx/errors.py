"""The one exception type the CLI turns into a single clean line on stderr."""

import math


class UserError(Exception):
    """Bad input: a missing file, a corrupt checkpoint, a shape that does not fit, a bad flag value."""


def finite(name: str, value: float) -> float:
    """A number that must be finite (NaN or Inf would give a black picture): the value, or a UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value!r:.60}")
    return float(value)
