"""Errors raised by fxquant. Every message names the pass or module path and what was expected."""


class FxquantError(Exception):
    """Base class of every error fxquant raises on purpose."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" if it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def describe(e: BaseException) -> str:
    """``"TypeName: first line"`` (or just the type name) of a foreign exception we re-raise."""
    line = first_line(e)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def is_int(v: object, low: int = 0) -> bool:
    """Whether ``v`` is an integer >= ``low`` (a bool is not), for argument checks."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def is_fraction(v: object) -> bool:
    """Whether ``v`` is a number in [0, 1] (a bool is not), for argument checks."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0


class RecipeError(FxquantError, ValueError):
    """A recipe has an unknown key, a bad value, or a rule that matches no layer."""


class TraceError(FxquantError):
    """The model could not be traced to an FX graph."""


class CalibrationError(FxquantError, ValueError):
    """Calibration inputs are missing, malformed, or produce non-finite activations."""


class PassError(FxquantError):
    """A pass found the graph in a state it cannot work with (a missing precondition)."""


class FormatError(FxquantError, ValueError):
    """A saved artifact or packed tensor is malformed."""


class MissingDependencyError(FxquantError, ImportError):
    """An optional dependency a feature needs is not installed (the message names the package)."""


class LoraError(FxquantError, ValueError):
    """A LoRA file or adapter is malformed or does not fit the module: an unmatched key, a shape
    mismatch, an unsupported layout, an unknown or duplicate adapter name."""
