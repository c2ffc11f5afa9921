"""Where a run writes: the command's stdout for its own lines, migrate's lines kept whole."""

from __future__ import annotations

import sys
from typing import Any

from tenantsafe.options import RunOptions


class LineTracker:
    """sys.stdout for migrate's output, remembering whether its last line is unfinished.

    migrate writes "  Applying x..." and " OK" separately; a failure in between leaves the
    line open, and whatever is written next would be glued to it.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.open_line = False

    def write(self, text: str) -> int:
        if text:
            self.open_line = not text.endswith("\n")
        return int(self._stream.write(text) or 0)

    def close_line(self) -> None:
        if self.open_line:
            self.write("\n")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def say(opts: RunOptions, text: str) -> None:
    """A line of the run's own (not migrate's), at verbosity 1 and more."""
    if opts.verbosity >= 1:
        stream = opts.stdout if opts.stdout is not None else sys.stdout
        stream.write(f"migrate_schemas_safe: {text}\n")
