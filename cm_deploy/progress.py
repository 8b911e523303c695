"""Progress lines on stderr for the steps that can take more than ~2 s (export, build, profile, demo
training): shown on a terminal only, never under --quiet, so pipes and logs stay clean."""
from __future__ import annotations

import sys
import time


class Progress:
    """progress("tracing model.onnx") prints "cm-deploy: tracing model.onnx (3 s)" when enabled."""

    def __init__(self, quiet: bool = False, stream=None, prefix: str = "cm-deploy"):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = not quiet and bool(isatty and isatty())
        self.prefix = prefix
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"{self.prefix}: {message} ({time.monotonic() - self.t0:.0f} s)", file=self.stream, flush=True)


def silent(message: str) -> None:
    """The progress callback that says nothing (library default)."""
