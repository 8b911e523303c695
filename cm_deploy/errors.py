"""Errors the CLI turns into one line and an exit status (DESIGN.md section 5). Imports nothing heavy."""


class CmDeployError(Exception):
    """Base of cm-deploy's own errors."""


class UserError(CmDeployError, ValueError):
    """Bad input or usage: a missing or foreign file, wrong shapes, a missing plugin. Exit status 2."""


class CheckFailed(CmDeployError):
    """A check ran and failed (parity out of tolerance). Exit status 1."""


class InputCastWarning(UserWarning):
    """Inputs were cast to the graph's types without changing their values beyond the target's
    rounding (float64 -> float32, int32 -> int64 lengths). The CLI prints it as one stderr line."""
