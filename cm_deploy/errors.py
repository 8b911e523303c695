"""Errors the CLI turns into one line and an exit status (DESIGN.md section 5). Imports nothing heavy."""


class CmDeployError(Exception):
    """Base of cm-deploy's own errors."""


class UserError(CmDeployError, ValueError):
    """Bad input or usage: a missing or foreign file, wrong shapes, a missing plugin. Exit status 2."""


class CheckFailed(CmDeployError):
    """A check ran and failed (parity out of tolerance). Exit status 1."""
