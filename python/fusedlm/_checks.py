"""Input checks shared by the public APIs."""
import numbers


def is_real_number(value) -> bool:
    """A real Python number (int, float, numpy scalar), not a bool: ``True`` as a temperature
    or an epsilon is a mistake, not 1."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
