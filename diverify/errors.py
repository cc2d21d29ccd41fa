"""The one exception type diverify raises for bad user input.

The CLI turns a :class:`DiverifyError` into a single line on stderr and a
non-zero exit code; anything else is a bug and keeps its traceback.
"""


class DiverifyError(ValueError):
    """Bad input (checkpoint, shape, specification, ...) with a message for the user."""


class UnsupportedPrimitiveError(DiverifyError):
    """The bound engine met a JAX primitive it has no relaxation for."""
