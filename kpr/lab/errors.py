"""The lab's two errors: one for setting it up or tearing it down, one for a command run inside it."""

from __future__ import annotations

import subprocess


class LabError(RuntimeError):
    """The lab could not be set up (or torn down) as asked."""


class RunError(subprocess.CalledProcessError):
    """A command run with Lab.run(check=True) failed; str() includes its stderr."""

    def __str__(self) -> str:
        text = super().__str__()
        err = self.stderr.strip() if isinstance(self.stderr, str) else ""
        return f"{text}\nstderr: {err[-2000:]}" if err else text
